"""Which sequences a run did not train on (sae_core.heldout); end to end in test_evaluate.py."""

import json

import pytest
import torch
from datasets import Dataset

from sae_core.errors import EvalError
from sae_core.heldout import read_run_json, sequence_rows, sequence_shape


def test_sequences_are_a_tensor_or_a_dataset_with_input_ids():
    ids = torch.arange(12).view(3, 4)
    ds = Dataset.from_dict({"input_ids": ids.tolist()})
    assert sequence_shape(ids) == sequence_shape(ds) == (3, 4)
    assert (
        torch.equal(sequence_rows(ids.int(), 1, 3), ids[1:3])
        and sequence_rows(ids.int(), 0, 1).dtype == torch.long
    )
    assert torch.equal(sequence_rows(ds, 1, 3), ids[1:3])
    assert torch.equal(sequence_rows(ds.with_format("torch"), 0, 2), ids[:2])
    assert sequence_shape(Dataset.from_dict({"input_ids": []})) == (0, 0)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2, 3, 4), "must be a [sequences, tokens] tensor, got shape (2, 3, 4)"),
        (Dataset.from_dict({"text": ["a"]}), "a Dataset with an 'input_ids' column"),
    ],
)
def test_other_inputs_are_a_one_line_eval_error(bad, message):
    with pytest.raises(EvalError) as e:
        sequence_shape(bad)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_run_json_missing_is_empty_and_corrupt_is_an_eval_error(tmp_path):
    assert read_run_json(tmp_path / "run.json") == {}
    (tmp_path / "run.json").write_text(json.dumps([1, 2]))
    assert read_run_json(tmp_path / "run.json") == {}
    (tmp_path / "run.json").write_text('{"model": "x"')
    with pytest.raises(EvalError, match="not valid JSON"):
        read_run_json(tmp_path / "run.json")
