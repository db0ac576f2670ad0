"""Which sequences a run did not train on (sae_core.heldout); end to end in test_evaluate.py."""

import json

import pytest

from sae_core.errors import EvalError
from sae_core.heldout import read_run_json


def test_run_json_missing_is_empty_and_corrupt_is_an_eval_error(tmp_path):
    assert read_run_json(tmp_path / "run.json") == {}
    (tmp_path / "run.json").write_text(json.dumps([1, 2]))
    assert read_run_json(tmp_path / "run.json") == {}
    (tmp_path / "run.json").write_text('{"model": "x"')
    with pytest.raises(EvalError, match="not valid JSON"):
        read_run_json(tmp_path / "run.json")
