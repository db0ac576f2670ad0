"""Reading trainer states back: only a step that every writing rank completed counts."""

import json

import pytest
import torch

from sae_core.checkpoint import (
    CheckpointError,
    latest_complete_step,
    newest_complete_states,
    save_state,
    state_writers,
)


def write_state(run_dir, rank, step, world_size=2, distribute_layers=True):
    state = {
        "step": step,
        "saes": {},
        "world_size": world_size,
        "distribute_layers": distribute_layers,
        "tokens_since_fired": {f"layers.{rank}": torch.full((4,), step)},
    }
    save_state(run_dir, rank, step, state)


def test_state_writers_are_every_rank_only_with_distribute_layers():
    assert state_writers(4, True) == 4
    assert state_writers(4, False) == 1
    assert state_writers(1, True) == 1


@pytest.mark.parametrize("run_json", [True, False])
def test_a_step_that_one_rank_did_not_finish_saving_is_passed_over(tmp_path, run_json):
    if run_json:
        (tmp_path / "run.json").write_text(json.dumps({"world_size": 2, "distribute_layers": True}))
    for rank in (0, 1):
        write_state(tmp_path, rank, 3)
    write_state(tmp_path, 0, 5)  # the crash came before rank 1 wrote step 5
    assert latest_complete_step(tmp_path, 2) == 3
    states = newest_complete_states(tmp_path)
    assert [s["step"] for s in states] == [3, 3]
    assert [list(s["tokens_since_fired"]) for s in states] == [["layers.0"], ["layers.1"]]


def test_one_writer_reads_the_newest_step_of_rank_0(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"world_size": 2, "distribute_layers": False}))
    write_state(tmp_path, 0, 1, distribute_layers=False)
    write_state(tmp_path, 0, 2, distribute_layers=False)
    assert [s["step"] for s in newest_complete_states(tmp_path)] == [2]


def test_no_states_is_empty_and_no_complete_step_is_an_error(tmp_path):
    assert newest_complete_states(tmp_path) == []
    write_state(tmp_path, 1, 4)  # rank 0 never wrote
    with pytest.raises(CheckpointError, match="no step has the trainer states of all 2 writing ranks"):
        newest_complete_states(tmp_path)
