"""Which sequences a training run did not train on: the evaluation's held-out tokens.

When the evaluation dataset is the run's own (default: the dataset in run.json, else the embedded corpus) and
so is the split, it is loaded and tokenized as in training (split, shuffle seed, max_examples, data_args, text
column), and evaluation starts after the tokens training consumed (run.json's `train_sequences`; at another
ctx_len, after every sequence that overlaps them). A given `offset` or another split overrides that. The
returned settings say which choice was made ("held_out"), so a report can tell.
"""

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .data import EMBEDDED_DATASET_NAMES, chunk_and_tokenize, load_text_dataset, parse_data_args
from .errors import EvalError

# Without run.json the training context length is unknown: a common one, capped by the model's.
FALLBACK_CTX_LEN = 1024


def read_run_json(path: Path) -> dict[str, Any]:
    """A run folder's run.json as a dict; {} when there is none (or it is not an object)."""
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvalError(f"{path}: not valid JSON (corrupt or truncated?): {e}") from None
    return run if isinstance(run, dict) else {}


def held_out_sequences(
    run: Mapping[str, Any],
    tokenizer: Any,
    dataset: str | None,
    *,
    split: str | None,
    offset: int | None,
    ctx_len: int | None,
    text_column: str | None,
    max_tokens: int,
    model_max: int | None,
    token: str | None,
) -> tuple[Any, dict[str, Any]]:
    """The evaluation sequences (a slice of a tokenized Dataset) and the settings that say which they are.

    `run` is the run's run.json ({} when unknown); `dataset` None means the run's own.
    """
    cfg = run.get("config") or {}
    trained_on = _dataset_name(run.get("dataset")) if run else None
    name = _dataset_name(dataset) if dataset is not None else (trained_on or "embedded")
    same_data = bool(run) and _same_dataset(name, trained_on)
    train_split = cfg.get("split", "train")
    split = split or (train_split if same_data else "train")

    # The training data is loaded as in training, so that its token stream is the same one.
    text_column = text_column or (cfg.get("text_column", "text") if same_data else "text")
    ds = load_text_dataset(
        None if name == "embedded" else name,
        split=split,
        text_column=text_column,
        data_args=parse_data_args(cfg.get("data_args", "")) if same_data else None,
        max_examples=cfg.get("max_examples") if same_data else None,
        shuffle_seed=cfg.get("shuffle_seed", 42) if same_data else 42,
        token=token,
    )
    train_len = run.get("seq_len") or cfg.get("ctx_len")
    if "input_ids" in ds.column_names:  # already tokenized: its sequence length is fixed
        ds = ds.with_format("torch", columns=["input_ids"])
    else:
        ctx_len = ctx_len or train_len or min(FALLBACK_CTX_LEN, model_max or FALLBACK_CTX_LEN)
        if model_max is not None and ctx_len > model_max:
            raise EvalError(f"ctx_len={ctx_len} exceeds the model's maximum context of {model_max} tokens")
        ds = chunk_and_tokenize(ds, tokenizer, text_key=text_column, max_seq_len=ctx_len)
    seq_len = len(ds[0]["input_ids"]) if len(ds) else (ctx_len or 0)

    if offset is not None:
        start, held_out = offset, f"from sequence {offset} (given offset)"
    elif same_data and split == train_split and "train_sequences" in run:
        # Training consumed the first train_sequences chunks of the stream, each one BOS (if the tokenizer
        # has one) + train_len - 1 text tokens. At another ctx_len, skip every chunk that overlaps them.
        bos = 1 if tokenizer.bos_token_id is not None else 0
        used = run["train_sequences"] * ((train_len or seq_len) - bos)
        start = math.ceil(used / max(seq_len - bos, 1))
        held_out = (
            f"sequences after the {run['train_sequences']} training sequences of the same dataset "
            f"and split (from sequence {start})"
        )
    elif same_data and split != train_split:
        start, held_out = 0, f"split {split!r}; training used split {train_split!r}"
    elif same_data:
        start, held_out = 0, "unknown: run.json does not record train_sequences; from sequence 0"
    elif run:
        start, held_out = 0, f"a dataset other than the training one ({trained_on})"
    else:
        start, held_out = 0, "unknown: no run.json tells the training data; from sequence 0"
    available = len(ds) - start
    if available <= 0:
        raise EvalError(
            f"no held-out tokens left: {name} (split {split!r}) has {len(ds)} sequences of {seq_len} tokens "
            f"and evaluation starts at sequence {start} ({held_out}); use more data, another --split, or "
            "--offset"
        )
    n_seq = min(available, max(1, math.ceil(max_tokens / max(seq_len, 1))))
    settings = {"dataset": name, "split": split, "offset": start, "held_out": held_out}
    return ds.select(range(start, start + n_seq)), settings


def _same_dataset(a: str, b: str | None) -> bool:
    """Same name, or two spellings of one local path (run.json keeps the path as the trainer got it)."""
    if b is None:
        return False
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _dataset_name(name: str | None) -> str:

    return "embedded" if name is None or name in EMBEDDED_DATASET_NAMES else str(name)
