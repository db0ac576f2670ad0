"""--k_decay_steps: k falls linearly from a larger start to k over the first optimizer steps (as sparsify)."""

import json

import pytest

from sae_core import ConfigError, SaeConfig, TrainConfig
from sae_core.trainer import decayed_k
from tests.support.training import make_trainer, token_data


def test_k_falls_linearly_from_the_start_to_k_then_stays():
    assert [decayed_k(step, 4, 100, 4) for step in range(6)] == [100, 76, 52, 28, 4, 4]
    assert decayed_k(0, 0, 100, 4) == 4  # no decay


def test_training_encodes_with_the_decayed_k_and_saves_the_final_one(tmp_path):
    # d=32, 4x expansion: 128 latents; the default start is min(latents, 10 x d_in) = 128.
    trainer = make_trainer(tmp_path, data=token_data(n_seq=24), k_decay_steps=4, log_every=1)
    widths = []
    for sae in trainer.saes.values():
        forward = sae.forward

        def spy(*args, forward=forward, **kwargs):
            out = forward(*args, **kwargs)
            widths.append(out.latent_indices.shape[1])
            return out

        sae.forward = spy
    trainer.fit()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["k"] for line in lines] == [128, 97, 66, 35, 4, 4]
    per_step = len(trainer.saes)
    assert widths == [k for k in (128, 97, 66, 35, 4, 4) for _ in range(per_step)]
    for h, sae in trainer.saes.items():
        assert sae.k == 4 and json.loads((tmp_path / "run" / h / "cfg.json").read_text())["k"] == 4


def test_a_start_below_k_is_refused():
    with pytest.raises(ConfigError, match="k_decay_start=2 is below k=4"):
        TrainConfig(SaeConfig(k=4), k_decay_steps=10, k_decay_start=2)
    with pytest.raises(ConfigError, match="k_decay_steps must be >= 0"):
        TrainConfig(SaeConfig(k=4), k_decay_steps=-1)
