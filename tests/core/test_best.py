"""--save_best: each hookpoint's SAE at its lowest running FVU, kept in run_dir/best/<hookpoint>/."""

import json
import math

import pytest
import torch

from sae_core import Sae, SaeConfig
from sae_core.best import BestSaes
from tests.support.tiny import tiny_model
from tests.support.training import make_trainer

D = 32


def test_a_checkpoint_replaces_the_best_only_when_its_running_fvu_is_lower(tmp_path):
    torch.manual_seed(0)
    sae = Sae(D, SaeConfig(num_latents=64, k=4), hookpoint="layers.0")
    best = BestSaes(["layers.0"])
    folder = tmp_path / "best" / "layers.0"
    states = []
    for step, fvus in ((2, [0.6, 0.4]), (4, [0.7, math.nan]), (6, [0.3, 0.3])):
        with torch.no_grad():
            sae.W_dec.add_(0.1)  # the SAE changes between checkpoints
        states.append({k: v.clone() for k, v in sae.state_dict().items()})
        for fvu in fvus:
            best.observe({"fvu/layers.0": fvu, "fvu/layers.1": 0.0})
        best.save({"layers.0": sae}, tmp_path, step, {"layers.0": 1.0})
        saved = json.loads((folder / "best.json").read_text())
        kept = Sae.load_from_disk(folder).state_dict()
        expected = {2: (0.5, 2, 2, 0), 4: (0.5, 2, 2, 0), 6: (0.3, 6, 2, 2)}[step]  # a NaN step counts not
        assert (saved["fvu"], saved["step"], saved["steps_averaged"]) == pytest.approx(expected[:3])
        for name, tensor in states[expected[3]].items():
            assert torch.equal(kept[name], tensor), (step, name)


def test_training_keeps_the_sae_of_the_best_window_and_resume_carries_the_best_on(tmp_path):
    model = tiny_model("llama", n_layers=1, d=D)
    trainer = make_trainer(tmp_path, model, layers=[0], save_every=2, save_best=True, log_every=1)
    snapshots = {}
    for stop in (2, 4, 6, 8):
        trainer.fit(max_steps=stop)
        # What the checkpoint saved (schedule-free Adam saves its average, not the weights it trains on).
        snapshots[stop] = Sae.load_from_disk(tmp_path / "run" / "layers.0").state_dict()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fvu = [r["fvu/layers.0"] for r in records if "fvu/layers.0" in r]
    assert len(fvu) == 8
    windows = {stop: sum(fvu[stop - 2 : stop]) / 2 for stop in (2, 4, 6, 8)}
    best_step = min(windows, key=windows.get)
    saved = json.loads((tmp_path / "run" / "best" / "layers.0" / "best.json").read_text())
    assert saved["step"] == best_step and saved["fvu"] == pytest.approx(windows[best_step], rel=1e-6)
    kept = Sae.load_from_disk(tmp_path / "run" / "best" / "layers.0").state_dict()
    for name, tensor in snapshots[best_step].items():
        assert torch.equal(kept[name], tensor), name
    assert list(Sae.load_many_from_disk(tmp_path / "run")) == ["layers.0"]  # best/ is not a hookpoint

    resumed = make_trainer(
        tmp_path, model, layers=[0], save_every=2, save_best=True, log_every=1, resume=True
    )
    assert resumed.best.best == pytest.approx({"layers.0": windows[best_step]})
