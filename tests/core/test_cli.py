"""The command line: flags from the configs, one-line errors for bad input, secrets kept out of outputs."""

import json
import subprocess
import sys

import pytest

from sae_core.run import main, parse_run_config
from tests.support.tiny import child_env

TINY = ["--ctx_len", "32", "--batch_size", "4", "--expansion_factor", "2", "--k", "4"]


def test_every_config_field_is_a_flag_with_help(capsys):
    with pytest.raises(SystemExit) as e:
        parse_run_config(["--help"])
    text = capsys.readouterr().out
    assert e.value.code == 0
    for flag in (
        "--expansion_factor",
        "--k",
        "--num_latents",
        "--layers",
        "--layer_stride",
        "--grad_acc_steps",
        "--micro_acc_steps",
        "--distribute_layers",
        "--load_in_8bit",
        "--auxk_alpha",
        "--resume",
        "--exclude_tokens",
        "--save_every",
        "--run_name",
        "--dead_feature_threshold",
    ):
        assert flag in text
    assert "Number of latents kept active per token" in text  # the field's docstring
    assert "Shuffle documents with this seed before tokenizing" in text


def test_flag_values_parse_like_the_seed_cli():
    cfg = parse_run_config(
        [
            "m",
            "d",
            "--layers",
            "16",
            "24",
            "--distribute_layers",
            "--normalize_decoder",
            "false",
            "--lr",
            "1e-3",
            "--k",
            "64",
            "--max_tokens",
            "none",
        ]
    )
    assert (cfg.model, cfg.dataset, cfg.layers, cfg.distribute_layers) == ("m", "d", [16, 24], True)
    assert (
        cfg.sae.normalize_decoder is False and cfg.sae.k == 64 and cfg.lr == 1e-3 and cfg.max_tokens is None
    )
    demo = parse_run_config([])
    assert demo.model is None and demo.ctx_len == 256 and demo.sae.expansion_factor == 16


def test_typo_in_a_flag_is_one_line_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as e:
        parse_run_config(["m", "--lyers", "3"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err
    assert "--lyers (did you mean --layers?)" in err


def test_abbreviated_flags_are_refused_not_guessed(capsys):
    # argparse's default would read --lr_warmup 3 as --lr_warmup_steps 3, silently.
    with pytest.raises(SystemExit) as e:
        parse_run_config(["m", "--lr_warmup", "3"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "--lr_warmup (did you mean --lr_warmup_steps?)" in err


def test_optional_values_accept_none_and_demo_defaults_yield_to_flags():
    cfg = parse_run_config(["m", "--shuffle_seed", "none", "--lr", "null", "--exclude_tokens", "1", "2"])
    assert cfg.shuffle_seed is None and cfg.lr is None and cfg.exclude_tokens == [1, 2]
    assert parse_run_config(["m"]).shuffle_seed == 42
    demo = parse_run_config(["--batch_size", "3", "--k", "8"])
    assert demo.batch_size == 3 and demo.sae.k == 8 and demo.ctx_len == 256 and demo.lr_warmup_steps == 5


def test_config_values_are_checked_at_parse_time_in_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_run_config(["m", "--batch_size", "0"])
    err = capsys.readouterr().err.strip()
    assert (
        e.value.code == 2 and err.endswith("batch_size must be a positive integer, got 0") and "\n" not in err
    )


def test_half_precision_sae_weights_are_refused_with_the_working_alternative(capsys):
    with pytest.raises(SystemExit):
        parse_run_config(["m", "--sae_dtype", "bfloat16"])
    err = capsys.readouterr().err.strip()
    assert (
        "half-precision weights lose small updates" in err
        and "--autocast bfloat16" in err
        and "\n" not in err
    )


def test_the_token_is_never_serialised():
    cfg = parse_run_config(["m", "--hf_token", "hf_SECRET"])
    assert cfg.hf_token == "hf_SECRET" and "hf_token" not in cfg.to_dict()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--k", "0"], "k must be a positive integer"),
        (["--expansion_factor", "0"], "expansion_factor must be a positive integer"),
        (["--k", "100"], "k=100 exceeds the 64 latents"),
        (["--layers", "7"], "layer index 7 out of range: this model has 3 layers"),
        (["--ctx_len", "100000"], "ctx_len=100000 exceeds the model's maximum context of 512"),
        (["--text_column", "body"], "text column 'body' not found"),
        (["--batch_size", "100000"], "dataset too small for one optimizer step"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, tiny_model_dir, tiny_text_file, args, message):
    with pytest.raises(SystemExit) as e:
        main([str(tiny_model_dir), str(tiny_text_file), *TINY, "--save_dir", str(tmp_path), *args])
    text = str(e.value.code) if not isinstance(e.value.code, int) else capsys.readouterr().err
    assert message in text and text.strip().count("\n") == 0, text


@pytest.mark.parametrize("which", ["model", "dataset"])
@pytest.mark.parametrize("spelling", ["./nope", "nope.jsonl", "{tmp}/nope"])
def test_a_missing_local_path_says_so_in_one_line(tmp_path, monkeypatch, tiny_model_dir, which, spelling):
    # Not "the Hub rejected './nope' as a repo id": what the user meant was a local path.
    monkeypatch.chdir(tmp_path)
    missing = spelling.format(tmp=tmp_path)
    source = [missing, "embedded"] if which == "model" else [str(tiny_model_dir), missing]
    with pytest.raises(SystemExit) as e:
        main([*source, *TINY, "--save_dir", str(tmp_path)])
    message = str(e.value.code)
    assert f"cannot load {which} {missing!r}: there is no file or folder at {tmp_path / 'nope'}" in message
    assert "\n" not in message and "Hub" not in message


def test_cli_trains_saves_eleuther_layout_and_never_writes_the_token(
    tmp_path, tiny_model_dir, tiny_text_file
):
    secret = "hf_SECRETtokenVALUE1234567890"
    env = child_env(HF_TOKEN=secret, OMP_NUM_THREADS="1")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "sae_core",
            str(tiny_model_dir),
            str(tiny_text_file),
            *TINY,
            "--layer_stride",
            "2",
            "--max_tokens",
            "600",
            "--save_dir",
            str(tmp_path),
            "--run_name",
            "r",
            "--hf_token",
            secret,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    run = tmp_path / "r"
    assert sorted(x.name for x in run.iterdir()) == [
        "layers.0",
        "layers.2",
        "metrics.jsonl",
        "run.json",
        "trainer_state",
    ]
    cfg = json.loads((run / "layers.2" / "cfg.json").read_text())
    assert cfg["hookpoint"] == "layers.2" and cfg["d_in"] == 32 and cfg["expansion_factor"] == 2
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"fvu/layers.0", "dead_pct/layers.2", "auxk/layers.0", "lr", "tokens"} <= set(metrics)
    assert secret not in p.stdout + p.stderr
    for f in run.rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
