"""End-to-end losses (--loss_fn kl|ce): the loss and its gradient against ones computed by hand with the
reconstructions spliced in by the test's own hooks, training lowers them, accumulation equals one big batch,
the refusals; and the Multi-TopK loss (--multi_topk) against its formula."""

import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from sae_core import ConfigError, Sae, SaeConfig, SaeTrainer, TrainConfig
from sae_core.config import RunConfig
from sae_core.e2e import EndToEndLoss
from sae_core.models import hookpoint_module
from sae_core.run import main
from tests.support.tiny import tiny_model
from tests.support.training import Tok, params, token_data

HOOKPOINTS = ["layers.0", "layers.1.mlp"]  # a block output and a module inside a deeper block
EXCLUDED = torch.tensor([0, 2])  # Tok's BOS and pad


def peaked_model(n_layers: int = 2):
    """A tiny Llama whose next-token distributions are peaked (a random one's are nearly uniform, so that a
    splice barely moves them)."""
    model = tiny_model(n_layers=n_layers)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return model


def data_with_pads(n_seq: int = 16, seq_len: int = 16):
    """token_data with pads (excluded) in the middle of some sequences: batches keep different counts."""
    ids = token_data(n_seq, seq_len)
    ids[::3, 5] = 2
    ids[1::4, 9:11] = 2
    return ids


def e2e_trainer(tmp_path, loss_fn="kl", model=None, data=None, run_name="run", resume=False, **kw):
    cfg = TrainConfig(
        SaeConfig(expansion_factor=2, k=4),
        **{
            "loss_fn": loss_fn,
            "hookpoints": HOOKPOINTS,
            "batch_size": 4,
            "lr_warmup_steps": 1,
            "save_dir": str(tmp_path),
            "run_name": run_name,
            **kw,
        },
    )
    return SaeTrainer(
        cfg,
        data if data is not None else data_with_pads(),
        model or peaked_model(),
        tokenizer=Tok(),
        progress=False,
        resume=resume,
    )


def spliced_by_hand(model, saes, ids):
    """Logits with every hookpoint's output replaced by its SAE's reconstruction at the kept tokens."""
    keep = ~torch.isin(ids, EXCLUDED)

    def hook_for(sae):
        def hook(_module, _args, output):
            y = output[0] if isinstance(output, tuple) else output
            out = y.clone()
            out[keep] = sae(y[keep]).sae_out
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    handles = [hookpoint_module(model, h).register_forward_hook(hook_for(s)) for h, s in saes.items()]
    try:
        return model(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()


def kl_by_hand(model, saes, ids):
    """(sum of KL(clean || spliced) over the positions whose token and next token are kept, their count)."""
    keep = ~torch.isin(ids, EXCLUDED)
    positions = keep[:, :-1] & keep[:, 1:]
    with torch.no_grad():
        clean = F.log_softmax(model(input_ids=ids).logits[:, :-1][positions], -1)
    spliced = F.log_softmax(spliced_by_hand(model, saes, ids)[:, :-1][positions], -1)
    return (clean.exp() * (clean - spliced)).sum(), int(positions.sum())


def test_kl_and_its_gradient_equal_those_with_the_reconstructions_spliced_by_hand(tmp_path):
    trainer = e2e_trainer(tmp_path, auxk_alpha=0)  # the gradient is then the KL's alone
    trainer._train_step()  # step 0 also sets b_dec: compare on step 1, from the weights it starts with
    trainer.step += 1
    before = {h: copy.deepcopy(sae) for h, sae in trainer.saes.items()}
    grads = gradients_at_each_step(trainer)
    metrics = trainer._train_step().metrics
    ids = trainer.dataset[4:8]  # batch 1
    kl, count = kl_by_hand(trainer.model, before, ids)
    assert count < 4 * 15  # the pads were left out
    assert metrics["kl"] == pytest.approx(kl.item() / count, rel=1e-5)
    assert metrics["kl"] > 0.01  # the splice matters on this model
    # The optimizer steps with the gradient of the mean KL over the step's positions, the radial part of
    # the decoder rows' gradients removed.
    (kl / count).backward()
    for h, sae in before.items():
        sae.remove_gradient_parallel_to_decoder_directions()
        for name, p in sae.named_parameters():
            torch.testing.assert_close(grads[0][f"{h}/{name}"], p.grad, rtol=1e-4, atol=1e-8, msg=name)
    assert {"fvu/layers.0", "fvu/layers.1.mlp", "auxk/layers.0", "dead_pct/layers.1.mlp"} <= set(metrics)


def test_ce_metric_equals_the_lms_cross_entropy_with_the_reconstructions_spliced_by_hand(tmp_path):
    trainer = e2e_trainer(tmp_path, "ce")
    trainer._train_step()
    trainer.step += 1
    before = {h: copy.deepcopy(sae) for h, sae in trainer.saes.items()}
    metrics = trainer._train_step().metrics
    ids = trainer.dataset[4:8]
    keep = ~torch.isin(ids, EXCLUDED)
    positions = keep[:, :-1] & keep[:, 1:]
    with torch.no_grad():
        logits = spliced_by_hand(trainer.model, before, ids)[:, :-1][positions]
        ce = F.cross_entropy(logits, ids[:, 1:][positions])
    assert metrics["ce"] == pytest.approx(ce.item(), rel=1e-5)


def test_gradient_reaches_every_sae_through_the_frozen_lm_as_the_hand_spliced_kl_gives_it():
    model = peaked_model()
    torch.manual_seed(0)
    saes = {h: Sae(32, SaeConfig(expansion_factor=2, k=4)) for h in HOOKPOINTS}
    by_hand = {h: copy.deepcopy(sae) for h, sae in saes.items()}
    ids = data_with_pads()[:4]
    loss = EndToEndLoss(model, "kl", HOOKPOINTS, transcode=False, micro_acc_steps=2)
    total, count = loss.batch(ids, EXCLUDED, lambda h, x, y: saes[h](x, target=y).sae_out)

    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    kl, expected_count = kl_by_hand(model, by_hand, ids)
    kl.backward()
    assert count == expected_count and total == pytest.approx(kl.item(), rel=1e-5)
    for h in HOOKPOINTS:
        for name, p in saes[h].named_parameters():
            reference = dict(by_hand[h].named_parameters())[name].grad
            assert reference.abs().sum() > 0, (h, name)
            torch.testing.assert_close(p.grad, reference, rtol=1e-4, atol=1e-7, msg=f"{h} {name}")


@pytest.mark.parametrize("loss_fn", ["kl", "ce"])
def test_a_few_steps_of_training_lower_the_loss(tmp_path, loss_fn):
    # One batch seen again and again: each step's loss is measured on the same tokens.
    trainer = e2e_trainer(
        tmp_path, loss_fn, data=data_with_pads(4).repeat(8, 1), hookpoints=["layers.0"], lr=3e-3
    )
    losses = []
    for _ in range(8):
        losses.append(trainer._train_step().metrics[loss_fn])
        trainer.step += 1
    assert losses[-1] < 0.8 * losses[0], losses


def test_accumulation_and_micro_batches_give_the_update_of_one_big_batch(tmp_path):
    model = peaked_model()
    # dead_feature_threshold 16: from step 1 on AuxK trains the latents that did not fire in step 0.
    common = {"lr": 1e-3, "dead_feature_threshold": 16, "model": model}
    big = e2e_trainer(tmp_path, run_name="big", batch_size=4, **common)
    acc = e2e_trainer(tmp_path, run_name="acc", batch_size=2, grad_acc_steps=2, **common)
    micro = e2e_trainer(tmp_path, run_name="micro", batch_size=4, micro_acc_steps=3, **common)
    # Adam's first steps hardly depend on the gradient's scale: compare the gradients it is given too.
    grads = {t.run_dir.name: gradients_at_each_step(t) for t in (big, acc, micro)}
    last = [t.fit(max_steps=2) for t in (big, acc, micro)][0]
    assert any(v > 0 for k, v in last.items() if k.startswith("auxk/"))  # AuxK took part
    ref = params(big)
    for other in (acc, micro):
        for name, p in params(other).items():
            torch.testing.assert_close(p, ref[name], rtol=1e-4, atol=1e-5, msg=name)
        assert len(grads["big"]) == 2 and len(grads["big"][1]) == 2 * 4  # 2 steps, 2 SAEs of 4 tensors
        for step, (got, expected) in enumerate(zip(grads[other.run_dir.name], grads["big"], strict=True)):
            for name, g in got.items():
                torch.testing.assert_close(g, expected[name], rtol=1e-4, atol=1e-7, msg=f"{step} {name}")


def test_an_interrupted_kl_run_resumes_to_the_uninterrupted_runs_weights(tmp_path):
    model = peaked_model()
    full = e2e_trainer(tmp_path, model=model, run_name="full", dead_feature_threshold=16)
    full.fit()
    e2e_trainer(tmp_path, model=model, run_name="part", dead_feature_threshold=16).fit(max_steps=2)
    resumed = e2e_trainer(tmp_path, model=model, run_name="part", dead_feature_threshold=16, resume=True)
    assert resumed.step == 2
    resumed.fit()
    for name, p in params(full).items():
        assert torch.equal(p, params(resumed)[name]), name


def gradients_at_each_step(trainer):
    """A list that receives, at every optimizer step of every SAE, the gradients it steps with."""
    seen = []
    for h, optimizer in trainer.optimizers.items():
        names = {id(p): f"{h}/{n}" for n, p in trainer.saes[h].named_parameters()}

        def record(opt, _args, _kwargs, names=names):
            grads = {names[id(p)]: p.grad.clone() for group in opt.param_groups for p in group["params"]}
            if not seen or set(grads) <= set(seen[-1]):
                seen.append({})  # the first SAE of a new step
            seen[-1].update(grads)

        for part in optimizer.parts.values():
            part.register_step_pre_hook(record)
    return seen


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"loss_fn": "mse"}, "loss_fn must be one of fvu, kl, ce, got 'mse'"),
        ({"loss_fn": "kl", "distribute_layers": True}, "cannot be combined with --distribute_layers"),
        ({"loss_fn": "ce", "shard_latents": 2}, "--loss_fn ce is not supported with --shard_latents"),
        ({"loss_fn": "kl", "multi_topk": True}, "use it with --loss_fn fvu"),
        ({"multi_topk": True, "shard_latents": 2}, "--multi_topk is not supported with --shard_latents"),
        ({"loss_fn": "kl", "activations": "cache"}, "--loss_fn kl cannot train from --activations"),
        ({"loss_fn": "kl", "sweep": ["k=4,8"]}, "cannot be combined with --sweep or --init_seeds"),
        ({"loss_fn": "ce", "init_seeds": [1, 2]}, "cannot be combined with --sweep or --init_seeds"),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError) as e:
        RunConfig(**settings)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_cli_refuses_before_loading_the_model(tmp_path, capsys):
    # The model folder does not exist: the refusal comes from the configuration alone.
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "no-model"), "embedded", "--loss_fn", "kl", "--distribute_layers"])
    text = str(e.value.code) if not isinstance(e.value.code, int) else capsys.readouterr().err
    assert "--loss_fn kl cannot be combined with --distribute_layers" in text
    assert text.strip().count("\n") == 0, text


def test_a_trainer_given_an_activation_cache_refuses_an_end_to_end_loss(tmp_path):
    from tests.core.test_cache import cache_of

    cfg = TrainConfig(loss_fn="ce", save_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--loss_fn ce cannot train from --activations") as e:
        SaeTrainer(cfg, cache_of(tmp_path / "c"), None, progress=False)
    assert "\n" not in str(e.value)


def dense_multi_topk(sae, x):
    """FVU(top k) + FVU(top 4k) / 8 from the dense pre-activations (Gao et al. §5.3), as sums of squares."""
    pre = F.relu((x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias)

    def recon(k):
        acts, idx = pre.topk(k, dim=1)
        return torch.zeros_like(pre).scatter(1, idx, acts) @ sae.W_dec + sae.b_dec

    return (x - recon(sae.cfg.k)).pow(2).sum(), (x - recon(4 * sae.cfg.k)).pow(2).sum()


def test_multi_topk_loss_equals_its_formula_and_so_does_the_trainers_gradient(tmp_path):
    torch.manual_seed(0)
    sae = Sae(32, SaeConfig(num_latents=64, k=4), dtype=torch.float64)
    x = torch.randn(40, 32, dtype=torch.float64)
    out = sae(x, total_variance=1.0, multi_topk=True)
    fvu, wide = dense_multi_topk(sae, x)
    assert out.fvu.item() == pytest.approx(fvu.item(), rel=1e-6)  # the losses are summed in float32
    assert out.multi_topk_fvu.item() == pytest.approx(wide.item(), rel=1e-6)
    assert wide < fvu  # 4k latents reconstruct better
    assert sae(x).multi_topk_fvu is None  # and cost nothing unless asked

    # The trainer backpropagates FVU + FVU(4k) / 8 (sums of squares; AuxK is 0 at step 0, nothing dead).
    cfg = TrainConfig(
        SaeConfig(num_latents=64, k=4), multi_topk=True, hookpoints=["layers.1"], save_dir=str(tmp_path)
    )
    trainer = SaeTrainer(cfg, token_data(), tiny_model(), tokenizer=Tok(), progress=False)
    trainer.b_dec_initialised = True  # the weights the step starts from are the ones copied here
    sae = trainer.saes["layers.1"]
    reference = copy.deepcopy(sae).double()
    grads = {}
    for name, p in sae.named_parameters():
        p.register_hook(lambda g, name=name: grads.__setitem__(name, g.clone()))
    x = trainer.activations.batch(0).inputs["layers.1"].double()
    trainer._train_step()
    fvu, wide = dense_multi_topk(reference, x)
    (fvu + wide / 8).backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name].double(), p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_auxk_gradient_reaches_only_its_own_sae_and_adds_to_the_rescaled_loss_gradient():
    from sae_core.e2e import AuxGradients

    torch.manual_seed(0)
    upstream, sae = Sae(32, SaeConfig(num_latents=64, k=4)), Sae(32, SaeConfig(num_latents=64, k=4))
    x = upstream(torch.randn(20, 32)).sae_out  # the input of a deeper SAE depends on a shallower one
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::2] = True
    out = sae(x, dead, total_variance=1.0)
    aux = AuxGradients()
    aux.add("deep", sae, out.auxk_loss)
    assert all(p.grad is None for p in upstream.parameters())
    out.sae_out.pow(2).sum().backward()  # stands for the end-to-end loss
    loss_grads = [p.grad.clone() for p in sae.parameters()]
    aux.merge("deep", sae, scale=0.5)

    alone = copy.deepcopy(sae)
    alone.zero_grad(set_to_none=True)
    alone(x.detach(), dead, total_variance=1.0).auxk_loss.backward()
    for p, g, a in zip(sae.parameters(), loss_grads, alone.parameters(), strict=True):
        expected = 0.5 * g + (a.grad if a.grad is not None else 0)
        torch.testing.assert_close(p.grad, expected)
    assert alone.encoder.weight.grad.abs().sum() > 0  # AuxK had a gradient to add


def test_a_sweep_built_in_code_refuses_an_end_to_end_loss(tmp_path):
    from sae_core.sweep import SweepTrainer

    cfg = TrainConfig(loss_fn="kl", save_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="--loss_fn kl cannot be swept") as e:
        SweepTrainer(cfg, token_data(), tiny_model(), sweep=["k=4,8"], tokenizer=Tok(), progress=False)
    assert "\n" not in str(e.value)


def test_transcoders_trained_end_to_end_replace_their_modules_and_lower_the_kl(tmp_path):
    from tests.core.test_transcode import llama

    cfg = TrainConfig(
        SaeConfig(expansion_factor=2, k=4, transcode=True, skip_connection=True),
        loss_fn="kl",
        hookpoints=["layers.*.mlp"],
        batch_size=4,
        lr=3e-3,
        lr_warmup_steps=1,
        save_dir=str(tmp_path),
    )
    trainer = SaeTrainer(cfg, data_with_pads(4).repeat(8, 1), llama(), tokenizer=Tok(), progress=False)
    losses = []
    for _ in range(6):
        losses.append(trainer._train_step().metrics["kl"])
        trainer.step += 1
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_cli_trains_with_the_kl_loss_the_saes_load_and_two_ranks_equal_one(
    tmp_path, tiny_model_dir, tiny_text_file
):
    from tests.support.training import COMMON, check, run, sae_params, torchrun

    args = [str(tiny_model_dir), str(tiny_text_file), *COMMON, "--loss_fn", "kl", "--layers", "0", "2"]
    args += ["--max_tokens", "600", "--dead_feature_threshold", "64", "--save_dir", str(tmp_path)]
    check(run([sys.executable, "-m", "sae_core", *args, "--batch_size", "4", "--run_name", "one"]))
    record = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["kl"] >= 0 and {"fvu/layers.0", "fvu/layers.2"} <= set(record)
    assert record["auxk/layers.0"] > 0  # AuxK took part
    assert json.loads((tmp_path / "one" / "run.json").read_text())["config"]["loss_fn"] == "kl"
    for h in ("layers.0", "layers.2"):
        sae = Sae.load_from_disk(tmp_path / "one" / h)
        assert sae.d_in == 32 and all(torch.isfinite(p).all() for p in sae.parameters())

    # Data parallel: two ranks of 2 sequences train the SAEs one process trains on batches of 4.
    check(run(torchrun(2, *args, "--batch_size", "2", "--run_name", "two")))
    one, two = sae_params(tmp_path / "one"), sae_params(tmp_path / "two")
    assert sorted(one) == sorted(two)
    for name, p in one.items():
        torch.testing.assert_close(two[name], p, rtol=1e-4, atol=1e-5, msg=name)
