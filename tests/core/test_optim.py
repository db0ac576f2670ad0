"""Optimizers (adam, schedule_free_adam, signum, muon), their default learning rates, the schedule."""

import json

import pytest
import torch

from sae_core import Sae
from sae_core.optim import ScheduleFreeAdam, Signum, default_lr, lr_at, warmup_steps
from tests.support.training import make_trainer, params, token_data


def test_warmup_never_exceeds_a_tenth_of_the_run():
    # The old trap: 1000 warm-up steps on a 29-step run peaked at 2.9% of the learning rate and never decayed.
    assert warmup_steps(1000, 29) == 2
    assert warmup_steps(5, 100) == 5 and warmup_steps(50, 100) == 10
    assert warmup_steps(3, 5) == 1  # a run shorter than 10 steps still warms up one step when asked
    assert warmup_steps(0, 100) == 0


def test_schedule_warms_up_then_decays_to_exactly_zero():
    lrs = [lr_at(s, 20, 2, 1e-3) for s in range(20)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == lrs[2] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    assert lr_at(20, 20, 2, 1e-3) == 0.0 and lrs[-1] > 0
    assert lr_at(0, 20, 0, 1e-3) == pytest.approx(1e-3)  # no warm-up: the peak at once


def test_default_learning_rates_scale_with_width_except_muon():
    assert default_lr("adam", 2**14) == pytest.approx(3.2e-3)
    assert default_lr("adam", 2**16) == pytest.approx(1.6e-3)
    assert default_lr("adam", 4608) == pytest.approx(6.03e-3, rel=1e-3)  # the width it was measured at
    assert default_lr("adam", 128) == default_lr("signum", 128) == 1e-2  # capped below the measured widths
    assert default_lr("signum", 2**14) == pytest.approx(5e-3)
    assert default_lr("schedule_free_adam", 4608) == pytest.approx(5.5e-3, rel=2e-3)
    assert default_lr("muon", 2**14) == default_lr("muon", 2**18) == pytest.approx(2e-3)


def test_schedule_free_adam_follows_the_reference_implementation():
    """Against the `schedulefree` package's plain reference (it stores x, y and z; ours stores z and derives
    x from y), with a warm-up made by our schedule: the training weights y every step, the average x after."""
    from schedulefree import AdamWScheduleFreeReference

    torch.manual_seed(0)
    ours, theirs = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.zeros(5, 3))
    theirs.data.copy_(ours.data)
    opt = ScheduleFreeAdam([ours], lr=1e-2)
    ref = AdamWScheduleFreeReference([theirs], lr=1e-2, warmup_steps=0, weight_decay=0.0)
    ref.train()
    for step in range(6):
        lr = lr_at(step, 6, 3, 1e-2, decay=False)  # 3.3e-3, 6.7e-3, then 1e-2
        grad = torch.randn(5, 3)
        for o, p in ((opt, ours), (ref, theirs)):
            o.param_groups[0]["lr"] = lr
            p.grad = grad.clone()
            o.step()
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-5, atol=1e-7)
    average = opt.average(ours)
    ref.eval()
    torch.testing.assert_close(average, theirs.detach(), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(average, ours.detach())  # y and x differ: what is saved is not what trains


def test_schedule_free_saves_the_average_and_ends_holding_it(tmp_path):
    kw = {"optimizer": "schedule_free_adam", "lr": 3e-3, "save_every": 3}
    trainer = make_trainer(tmp_path, data=token_data(n_seq=48, vocab=40), **kw)
    trainer.fit(max_steps=3)
    sae, opt = trainer.saes["layers.0"], trainer.optimizers["layers.0"]
    part = opt.parts["schedule_free_adam"]
    saved = Sae.load_from_disk(tmp_path / "run" / "layers.0")
    training = {name: p.detach().clone() for name, p in sae.named_parameters()}
    for (name, p), (_, q) in zip(sae.named_parameters(), saved.named_parameters()):
        torch.testing.assert_close(q, part.average(p), rtol=0, atol=0, msg=name)  # the file holds x
        assert torch.equal(p, training[name])  # and training goes on from y, untouched by the save
    assert not torch.equal(saved.W_dec, sae.W_dec)
    assert lr_at(10, 12, 1, 3e-3, decay=False) == 3e-3  # no decay: the average anneals
    trainer.fit()
    saved = Sae.load_from_disk(tmp_path / "run" / "layers.0")
    for (name, p), (_, q) in zip(trainer.saes["layers.0"].named_parameters(), saved.named_parameters()):
        assert torch.equal(p, q), name  # after the run, the trainer's SAEs are the saved ones


def test_signum_steps_by_the_sign_of_the_momentum_average():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Signum([p], lr=0.1, momentum=0.5)
    for grad in ([1.0, -2.0, 0.0], [-3.0, -1.0, 0.0]):
        p.grad = torch.tensor(grad)
        opt.step()
    # momentum averages: [0.5, -1, 0] then [-1.25, -1, 0]; steps -0.1 * sign of each
    torch.testing.assert_close(p.detach(), torch.tensor([0.0, 0.2, 0.0]))


def test_short_run_reaches_its_learning_rate_and_records_it(tmp_path):
    # 12 optimizer steps asked to warm up for 1000: warm-up is capped at 1 step, so the peak is reached.
    trainer = make_trainer(tmp_path, data=token_data(n_seq=48), lr=1e-3, lr_warmup_steps=1000)
    assert trainer.total_steps == 12 and trainer.warmup_steps == 1
    trainer.fit()
    info = json.loads((tmp_path / "run" / "run.json").read_text())["learning_rate"]
    assert info == {
        "optimizer": "schedule_free_adam",
        "peak": 1e-3,
        "peak_reached": pytest.approx(1e-3),
        "warmup_steps": 1,
    }


# Learning rates for a 128-latent SAE on d=32: the defaults scale by 1/sqrt(width) for thousands of latents.
@pytest.mark.parametrize(
    "optimizer, lr", [("adam", 3e-3), ("schedule_free_adam", 3e-3), ("signum", 5e-3), ("muon", 1e-2)]
)
def test_every_optimizer_trains_and_resumes_exactly(tmp_path, optimizer, lr):
    data = token_data(n_seq=96, vocab=40)
    kw = {"optimizer": optimizer, "lr": lr, "lr_warmup_steps": 2, "log_every": 1, "save_every": 100}
    full = make_trainer(tmp_path, data=data, run_name="full", **kw)
    full.fit()
    fvu = [
        json.loads(line)["fvu/layers.0"]
        for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    ]
    assert fvu[-1] < 0.85 * fvu[0], (optimizer, fvu)
    first = make_trainer(tmp_path, data=data, run_name="split", **kw)
    first.fit(max_steps=7)
    second = make_trainer(tmp_path, data=data, run_name="split", resume=True, **kw)
    second.fit()
    for name, value in params(full).items():
        torch.testing.assert_close(params(second)[name], value, rtol=0, atol=0, msg=name)


def test_resume_of_a_checkpoint_written_before_optimizers_were_selectable(tmp_path):
    trainer = make_trainer(tmp_path, data=token_data(n_seq=48), save_every=2)
    trainer.fit(max_steps=2)
    # Rewrite the saved config as older versions wrote it: no `optimizer` field (it meant Adam).
    (state_file,) = (tmp_path / "run" / "trainer_state").glob("*.pt")
    state = torch.load(state_file, weights_only=False)
    config = json.loads(state["config"])
    del config["optimizer"]
    state["config"] = json.dumps(config, sort_keys=True)
    torch.save(state, state_file)
    resumed = make_trainer(tmp_path, data=token_data(n_seq=48), resume=True, save_every=2)
    assert resumed.step == 2
