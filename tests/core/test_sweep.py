"""One-pass sweeps: every variant equals its own run, while the LM runs once per batch for all of them."""

import json
import sys

import pytest
import torch

from sae_core import SaeConfig, SaeTrainer, TrainConfig
from sae_core.cache import ActivationCache, write_cache
from sae_core.errors import ConfigError
from sae_core.sweep import SweepTrainer, parse_sweep
from tests.support.tiny import tiny_model
from tests.support.training import COMMON, Tok, check, params, run, sae_params, token_data, torchrun


def sweep_trainer(tmp_path, data, model, sweep=("k=2,4",), init_seeds=(0, 1), resume=False, loggers=(), **kw):
    cfg = TrainConfig(
        SaeConfig(expansion_factor=4, k=4),
        **{"batch_size": 4, "lr_warmup_steps": 2, "save_dir": str(tmp_path), "run_name": "sweep", **kw},
    )
    return SweepTrainer(
        cfg,
        data,
        model,
        sweep=sweep,
        init_seeds=init_seeds,
        tokenizer=Tok(),
        progress=False,
        resume=resume,
        loggers=loggers,
    )


@pytest.mark.parametrize("extra", [{}, {"grad_acc_steps": 2, "micro_acc_steps": 2}])
def test_every_variant_equals_its_own_run_and_the_lm_runs_once_per_batch(tmp_path, extra):
    model = tiny_model()
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    records = []
    sweep = sweep_trainer(tmp_path, token_data(), model, loggers=[records.append], log_every=1, **extra)
    assert sweep.variants == ["k2_seed0", "k2_seed1", "k4_seed0", "k4_seed1"]
    sweep.fit()
    per_step = extra.get("grad_acc_steps", 1)
    assert [r["variant"] for r in records[:4]] == sweep.variants and len(records) == 4 * sweep.total_steps
    assert len(forwards) == sweep.total_steps * per_step  # once per batch, not once per variant
    for trainer in sweep.trainers:
        k, seed = trainer.cfg.sae.k, trainer.cfg.seed
        cfg = TrainConfig(
            SaeConfig(expansion_factor=4, k=k),
            **{"batch_size": 4, "lr_warmup_steps": 2, "save_dir": str(tmp_path / "alone"), **extra},
            run_name=trainer.run_dir.name,
            seed=seed,
        )
        alone = SaeTrainer(cfg, token_data(), tiny_model(), tokenizer=Tok(), progress=False)
        alone.fit()
        a, b = params(alone), params(trainer)
        for name in a:
            assert torch.equal(a[name], b[name]), (trainer.run_dir.name, name)
    # Each variant is a run folder of its own: SAEs, run.json (with its settings), metrics.
    folder = tmp_path / "sweep" / "k2_seed1"
    assert (folder / "layers.0" / "sae.safetensors").exists() and (folder / "metrics.jsonl").exists()
    info = json.loads((folder / "run.json").read_text())
    assert info["config"]["sae"]["k"] == 2 and info["config"]["seed"] == 1
    assert json.loads((folder / "layers.0" / "cfg.json").read_text())["k"] == 2


def test_a_sweep_from_the_cache_equals_the_live_sweep(tmp_path):
    write_cache(tiny_model(), Tok(), token_data(), tmp_path / "c", dtype="float32", progress=False)
    live = sweep_trainer(tmp_path / "live", token_data(), tiny_model(), sweep=("expansion_factor=2,4",))
    cached = sweep_trainer(
        tmp_path / "cached",
        ActivationCache(tmp_path / "c"),
        None,
        sweep=("expansion_factor=2,4",),
        cache_shuffle_shards=0,
    )
    live.fit()
    cached.fit()
    for a, b in zip(live.trainers, cached.trainers):
        pa, pb = params(a), params(b)
        for name in pa:
            torch.testing.assert_close(pa[name], pb[name], rtol=1e-5, atol=1e-6)


def test_a_sweep_resumes_every_variant(tmp_path):
    full = sweep_trainer(tmp_path / "full", token_data(), tiny_model())
    full.fit()
    part = sweep_trainer(tmp_path / "part", token_data(), tiny_model())
    part.fit(max_steps=3)
    resumed = sweep_trainer(tmp_path / "part", token_data(), tiny_model(), resume=True)
    resumed.fit()
    for a, b in zip(full.trainers, resumed.trainers):
        pa, pb = params(a), params(b)
        for name in pa:
            assert torch.equal(pa[name], pb[name]), name


@pytest.mark.parametrize(
    "sweep, message",
    [
        (["width=2,4"], "--sweep: 'width' cannot be swept; choose from k, expansion_factor"),
        (["batch_size=2,4"], "--sweep: 'batch_size' cannot be swept"),
        (["k=2,abc"], "--sweep 'k=2,abc': a value is not a valid k"),
        (["k"], "--sweep expects field=value,value"),
        (["k=2", "k=4"], "--sweep names 'k' twice"),
        (["k=0,4"], "sweep variant k0: k must be a positive integer"),
        (["k=4,500"], "sweep variant k500: k=500 exceeds the 128 latents"),
    ],
)
def test_bad_sweeps_are_one_line_errors(tmp_path, sweep, message):
    with pytest.raises(ConfigError, match=message) as e:
        sweep_trainer(tmp_path, token_data(), tiny_model(), sweep=sweep, init_seeds=())
    assert "\n" not in str(e.value)


def test_a_bad_sweep_fails_before_the_model_loads(tmp_path):
    from sae_core.config import RunConfig
    from sae_core.run import run

    with pytest.raises(ConfigError, match="sweep variant k0: k must be a positive integer"):
        run(RunConfig(model=str(tmp_path / "no-such-model"), sweep=["k=0,4"], device="cpu"))
    with pytest.raises(ConfigError, match=r"--init_seeds repeats a value: \[1, 1\]"):
        run(RunConfig(model=str(tmp_path / "no-such-model"), init_seeds=[1, 1], device="cpu"))


def test_parse_sweep_gives_every_combination():
    assert parse_sweep(["k=16,32", "expansion_factor=8,16"], [0, 1]) == [
        {"k": k, "expansion_factor": e, "seed": s} for k in (16, 32) for e in (8, 16) for s in (0, 1)
    ]


@pytest.mark.slow
def test_cli_sweep_with_torchrun_distribute_layers_equals_one_process(
    tmp_path, tiny_model_dir, tiny_text_file
):
    args = [str(tiny_model_dir), str(tiny_text_file), *COMMON, "--max_tokens", "1200", "--run_name", "r"]
    args += ["--layers", "0", "2", "--sweep", "k=2,4", "--init_seeds", "0"]
    p = run([sys.executable, "-m", "sae_core", *args, "--batch_size", "4", "--save_dir", str(tmp_path / "1")])
    check(p)
    check(
        run(torchrun(2, *args, "--batch_size", "2", "--distribute_layers", "--save_dir", str(tmp_path / "2")))
    )
    for variant in ("k2_seed0", "k4_seed0"):
        one, two = sae_params(tmp_path / "1" / "r" / variant), sae_params(tmp_path / "2" / "r" / variant)
        assert sorted(one) == sorted(two) and len(one) == 2 * 4
        for name in one:
            torch.testing.assert_close(one[name], two[name], rtol=1e-4, atol=1e-5, msg=f"{variant} {name}")


def test_evaluating_a_sweep_folder_evaluates_every_variant(tmp_path, tiny_model_dir, tiny_text_file, capsys):
    from transformers import AutoModelForCausalLM

    from sae_core.evaluate import main as evaluate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    sweep_trainer(tmp_path, token_data(), model, sweep=("k=2,4",), init_seeds=(), layers=[1]).fit()
    evaluate(
        [
            str(tiny_model_dir),
            str(tmp_path / "sweep"),
            "--max_tokens",
            "64",
            "--offset",
            "0",
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    for variant in ("k2", "k4"):
        report = json.loads((tmp_path / "sweep" / variant / "eval" / "report.json").read_text())
        assert list(report["hookpoints"]) == ["layers.1"] and f"## {variant}" in printed
