"""chunk_and_tokenize and dataset loading."""

import json

import pytest
import torch
from datasets import Dataset, DatasetDict

from sae_core import ConfigError
from sae_core.data import (
    DatasetLoadError,
    chunk_and_tokenize,
    load_text_dataset,
    sequence_rows,
    sequence_shape,
)
from tests.support.tiny import make_text, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("batch_size, num_proc", [(7, 1), (50, 2)])
def test_chunks_keep_every_token_across_map_batches(tok, batch_size, num_proc):
    docs = make_text(120, seed=1)
    out = chunk_and_tokenize(
        Dataset.from_dict({"text": docs}),
        tok,
        max_seq_len=33,
        batch_size=batch_size,
        num_proc=num_proc,
        load_from_cache_file=False,
    )
    rows = out[:]["input_ids"].tolist()
    assert all(len(r) == 33 and r[0] == tok.bos_token_id for r in rows)
    stream = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    body = [t for r in rows for t in r[1:]]
    assert len(stream) - len(body) < 32  # only the final partial chunk is missing
    assert body == stream[: len(body)]  # and nothing in the middle was dropped or reordered


def test_return_final_batch_pads_the_tail(tok):
    docs = make_text(10, seed=2)
    full = chunk_and_tokenize(Dataset.from_dict({"text": docs}), tok, max_seq_len=40, return_final_batch=True)
    cut = chunk_and_tokenize(Dataset.from_dict({"text": docs}), tok, max_seq_len=40)
    assert len(full) == len(cut) + 1
    assert full[len(full) - 1]["input_ids"].tolist()[-1] == tok.pad_token_id


def test_missing_text_column_lists_the_columns(tok):
    with pytest.raises(ConfigError, match=r"text column 'text' not found.*\['body'\]"):
        chunk_and_tokenize(Dataset.from_dict({"body": ["a b"]}), tok)


def test_local_sources(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["one", "two", "three"])
    )
    assert load_text_dataset(str(tmp_path / "a.jsonl"), shuffle_seed=None)["text"] == ["one", "two", "three"]

    txt = tmp_path / "txt"
    txt.mkdir()
    (txt / "1.txt").write_text("alpha\nbeta\n")
    (txt / "2.txt").write_text("gamma\n")
    assert sorted(load_text_dataset(str(txt))["text"]) == ["alpha", "beta", "gamma"]

    DatasetDict(
        {"train": Dataset.from_dict({"text": ["x"] * 5}), "validation": Dataset.from_dict({"text": ["y"]})}
    ).save_to_disk(str(tmp_path / "saved"))
    assert load_text_dataset(str(tmp_path / "saved"), split="validation")["text"] == ["y"]
    assert len(load_text_dataset(str(tmp_path / "saved"), max_examples=3)) == 3
    with pytest.raises(ConfigError, match=r"split 'test' not found; it has splits \['train', 'validation'\]"):
        load_text_dataset(str(tmp_path / "saved"), split="test")
    with pytest.raises(ConfigError, match=r"text column 'content' not found .*\['text'\]"):
        load_text_dataset(str(tmp_path / "a.jsonl"), text_column="content")


def test_unknown_dataset_is_one_clear_line():
    with pytest.raises(DatasetLoadError) as err:
        load_text_dataset("no-such-user/no-such-dataset-xyz")
    msg = str(err.value)
    assert "no-such-user/no-such-dataset-xyz" in msg and "\n" not in msg and "save_to_disk" in msg


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
def test_other_inputs_are_a_one_line_config_error(bad, message):
    with pytest.raises(ConfigError) as e:
        sequence_shape(bad)
    assert message in str(e.value) and "\n" not in str(e.value)
