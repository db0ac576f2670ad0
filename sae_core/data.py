"""Text datasets: finding them (Hub, local files, saved folders, the embedded corpus) and cutting them into
fixed-length token sequences.

`chunk_and_tokenize` joins documents with EOS and cuts the token stream into `max_seq_len` chunks. Tokenizing
runs batched and in parallel; cutting runs as one ordered pass that carries the tail of every batch over to
the next, so no tokens are dropped except the final partial chunk (EleutherAI's version dropped the tail of
every map batch).
"""

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk
from torch import Tensor

from .embedded import embedded_corpus
from .errors import ConfigError, DatasetLoadError
from .utils import first_line, missing_local_path

DATA_FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
EMBEDDED_DATASET_NAMES = ("embedded", "python-docs")


def chunk_and_tokenize(
    data: Dataset,
    tokenizer: Any,
    *,
    format: str = "torch",
    num_proc: int | None = None,
    text_key: str = "text",
    max_seq_len: int = 2048,
    return_final_batch: bool = False,
    load_from_cache_file: bool = True,
    batch_size: int = 2048,
) -> Dataset:
    """Tokenize `data[text_key]` and cut it into rows of exactly `max_seq_len` token ids ("input_ids").

    Documents are separated by the tokenizer's EOS token. When the tokenizer has a BOS token, every chunk
    starts with it (the model expects one at position 0; BOS is excluded from SAE training by default).
    `return_final_batch` keeps the last partial chunk, padded with the pad (or EOS) token.
    """
    if max_seq_len < 2:
        raise ConfigError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if text_key not in data.column_names:
        raise ConfigError(f"text column {text_key!r} not found; the dataset has columns {data.column_names}")
    if num_proc is None:
        # Worker processes only pay off on large datasets.
        num_proc = min(max((os.cpu_count() or 1) // 2, 1), max(len(data) // 5000, 1))
    eos = tokenizer.eos_token_id
    bos = tokenizer.bos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        ids = tokenizer(batch[text_key], add_special_tokens=False, return_attention_mask=False)["input_ids"]
        if eos is not None:
            ids = [doc + [eos] for doc in ids]
        return {"ids": ids}

    tokenized = data.map(
        tokenize,
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=data.column_names,
        load_from_cache_file=load_from_cache_file,
        desc="Tokenizing",
    )
    body = max_seq_len - 1 if bos is not None else max_seq_len
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)

    def chunks():
        carry = np.zeros(0, dtype=np.int64)
        for batch in tokenized.with_format("numpy").iter(batch_size=batch_size):
            docs = [np.asarray(d, dtype=np.int64) for d in batch["ids"]]
            stream = np.concatenate([carry, *docs]) if docs else carry
            n = len(stream) // body
            rows = stream[: n * body].reshape(n, body)
            carry = stream[n * body :]
            for row in rows:
                yield {"input_ids": _with_bos(row, bos)}
        if return_final_batch and len(carry):
            row = np.concatenate([carry, np.full(body - len(carry), pad, dtype=np.int64)])
            yield {"input_ids": _with_bos(row, bos)}

    out = Dataset.from_generator(chunks, gen_kwargs=None, cache_dir=None, keep_in_memory=False)
    return out.with_format(format, columns=["input_ids"]) if format else out


def _with_bos(row: np.ndarray, bos: int | None) -> np.ndarray:
    return np.concatenate([[bos], row]) if bos is not None else row


def load_text_dataset(
    name: str | None,
    *,
    split: str = "train",
    text_column: str = "text",
    data_args: dict[str, Any] | None = None,
    max_examples: int | None = None,
    shuffle_seed: int | None = None,
    token: str | None = None,
) -> Dataset:
    """Open a dataset by Hub name, local folder/file, or the embedded corpus (None or 'embedded').

    Local forms: a folder written by `Dataset.save_to_disk` (or a DatasetDict folder, with `split`), a
    `.txt`/`.jsonl`/`.json`/`.parquet`/`.csv` file, or a folder of such files. A dataset that already has an
    `input_ids` column (e.g. the output of `chunk_and_tokenize` saved to disk) is returned as is.
    """
    if name is None or name in EMBEDDED_DATASET_NAMES:
        ds = embedded_corpus()
    elif os.path.exists(name):
        ds = _load_local(Path(name), split)
    elif missing := missing_local_path(name):
        raise DatasetLoadError(f"cannot load dataset {name!r}: {missing}")
    else:
        try:
            ds = load_dataset(name, split=split, token=token, **(data_args or {}))
        except Exception as e:  # datasets raises many types for "not found / offline"
            raise DatasetLoadError(
                f"cannot load dataset {name!r}: not a local path, and the Hub gave: {first_line(e)}. "
                "Pass a Hub dataset id, a folder written by Dataset.save_to_disk, "
                "a .txt/.jsonl/.parquet file or folder, or 'embedded'"
            ) from None
    if "input_ids" not in ds.column_names and text_column not in ds.column_names:
        raise ConfigError(
            f"text column {text_column!r} not found in {name or 'embedded'}; columns: {ds.column_names}"
        )
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    if max_examples is not None:
        if max_examples <= 0:
            raise ConfigError(f"max_examples must be positive, got {max_examples}")
        ds = ds.select(range(min(max_examples, len(ds))))
    return ds


class PreparedDataset(NamedTuple):
    sequences: Dataset  # rows of exactly ctx_len token ids ("input_ids", torch format)
    documents: int  # documents read (after max_examples)
    fingerprint: str | None  # the source's datasets fingerprint, when it has one


def prepare_dataset(
    name: str | None,
    tokenizer: Any,
    *,
    ctx_len: int,
    split: str = "train",
    text_column: str = "text",
    data_args: dict[str, Any] | str | None = None,
    max_examples: int | None = None,
    shuffle_seed: int | None = None,
    num_proc: int | None = None,
    token: str | None = None,
) -> PreparedDataset:
    """Open `name` (see `load_text_dataset`) and cut it into `ctx_len`-token rows, unless it already holds
    `input_ids`. The one path from a dataset name to training rows: the CLI and the pipeline both use it."""
    if isinstance(data_args, str):
        data_args = parse_data_args(data_args)
    texts = load_text_dataset(
        name,
        split=split,
        text_column=text_column,
        data_args=data_args,
        max_examples=max_examples,
        shuffle_seed=shuffle_seed,
        token=token,
    )
    if "input_ids" in texts.column_names:
        sequences = texts.with_format("torch", columns=["input_ids"])
    else:
        sequences = chunk_and_tokenize(
            texts, tokenizer, text_key=text_column, max_seq_len=ctx_len, num_proc=num_proc
        )
    return PreparedDataset(sequences, len(texts), getattr(texts, "_fingerprint", None))


def parse_data_args(text: str) -> dict[str, str]:
    """`--data_args` text (`key=value,key=value`) as load_dataset keyword arguments."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise ConfigError(f"--data_args expects key=value pairs separated by commas, got {part!r}")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _load_local(path: Path, split: str) -> Dataset:
    if path.is_dir() and any(
        (path / f).exists() for f in ("state.json", "dataset_dict.json", "dataset_info.json")
    ):
        try:
            ds = load_from_disk(str(path))
        except Exception as e:
            raise DatasetLoadError(
                f"{path}: not a readable saved dataset (corrupt or partial?): {first_line(e)}"
            ) from None
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise ConfigError(f"{path}: split {split!r} not found; it has splits {list(ds)}")
            ds = ds[split]
        return ds
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in DATA_FILE_BUILDERS)
    if not files:
        raise DatasetLoadError(
            f"{path}: no data files found "
            "(expected .txt, .jsonl, .json, .parquet or .csv, or a saved dataset)"
        )
    kinds = {DATA_FILE_BUILDERS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        raise DatasetLoadError(f"{path}: mixed or unsupported file types {sorted({p.suffix for p in files})}")
    try:
        return load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train")
    except Exception as e:
        raise DatasetLoadError(f"{path}: cannot read data files: {first_line(e)}") from None


def sequence_shape(input_ids: Any) -> tuple[int, int]:
    """(sequences, tokens per sequence) of a [n, T] tensor or a Dataset with an "input_ids" column."""
    if isinstance(input_ids, Tensor):
        if input_ids.ndim != 2:
            shape = tuple(input_ids.shape)
            raise ConfigError(f"token ids must be a [sequences, tokens] tensor, got shape {shape}")
        return input_ids.shape[0], input_ids.shape[1]
    if "input_ids" not in getattr(input_ids, "column_names", []):
        raise ConfigError(
            "token ids must be a tensor or a Dataset with an 'input_ids' column (tokenize text with "
            "sae_core.data.chunk_and_tokenize)"
        )
    n = len(input_ids)
    return n, (len(input_ids[0]["input_ids"]) if n else 0)


def sequence_rows(input_ids: Any, start: int, stop: int, order: Tensor | None = None) -> Tensor:
    """Sequences start .. stop-1 as a [stop - start, T] long tensor; with `order`, the sequences
    order[start:stop] instead."""
    if order is not None:
        index = order[start:stop]
        if isinstance(input_ids, Tensor):
            return input_ids[index].long()
        rows = input_ids[index.tolist()]["input_ids"]
    elif isinstance(input_ids, Tensor):
        return input_ids[start:stop].long()
    else:
        rows = input_ids[start:stop]["input_ids"]
    return rows.long() if isinstance(rows, Tensor) else torch.tensor(rows, dtype=torch.long)
