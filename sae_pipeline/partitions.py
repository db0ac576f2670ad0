"""Partitions: every model of the registry is a partition, every layer stride another dimension.

    tokenized_dataset                            per model             key "smollm2-135m"
    sae_checkpoints, sae_evaluation, ...         per model x stride    key "smollm2-135m|2"

Dagster joins the keys of a multi-partition with "|" in the alphabetical order of the dimension names (model,
stride), and it does not validate the keys of a dynamic partition set: a model key holding "|" or "," would
make keys ambiguous. Keys are therefore checked here (`check_model_key`) before they become partitions, and
they double as folder names under the artefact root, so they also exclude "/", "..", and anything a shell or a
filesystem would trip on.
"""

import os
import re
from typing import NamedTuple

import dagster as dg

MODEL_DIMENSION = "model"
STRIDE_DIMENSION = "stride"
DEFAULT_STRIDES = ("1", "2", "4")
STRIDES_ENV = "SAE_PIPELINE_STRIDES"

# A letter or digit, then letters, digits, ".", "_" or "-": a valid folder name that can never be "." or "..",
# and none of the characters Dagster uses to join or list keys ("|", ",", "[", "]").
_MODEL_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class PartitionKeyError(ValueError):
    """A model key or partition key is malformed; the message says what is allowed."""


def check_model_key(key: str) -> str:
    """Return `key` if it may be a model partition key (and a folder name), else raise PartitionKeyError."""
    if not isinstance(key, str) or not _MODEL_KEY.fullmatch(key):
        raise PartitionKeyError(
            f"invalid model key {key!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (no '/', '|', ',', '[', ']', spaces or '..'); a Hub id 'org/name' becomes 'org--name'"
        )
    return key


def model_key_for(model: str) -> str:
    """The partition key derived from a model id or path: 'EleutherAI/pythia-70m' -> 'EleutherAI--pythia-70m'.

    Local paths use their last folder name. The result is checked, so an id with characters that cannot be
    part of a key fails here with a message asking for an explicit `name`.
    """
    text = model.strip().rstrip("/")
    if os.path.isabs(text) or text.startswith((".", "~")):
        text = os.path.basename(text)
    return check_model_key(text.replace("/", "--"))


def strides_from_env() -> list[str]:
    """The static stride keys: $SAE_PIPELINE_STRIDES (comma-separated positive integers) or 1, 2, 4."""
    raw = os.environ.get(STRIDES_ENV, "").strip()
    if not raw:
        return list(DEFAULT_STRIDES)
    strides = [s.strip() for s in raw.split(",") if s.strip()]
    if not strides or not all(s.isdigit() and int(s) > 0 and s == str(int(s)) for s in strides):
        raise PartitionKeyError(
            f"{STRIDES_ENV}={raw!r}: expected comma-separated positive integers, e.g. '1,2,4'"
        )
    return sorted(set(strides), key=int)


model_partitions = dg.DynamicPartitionsDefinition(name="models")
stride_partitions = dg.StaticPartitionsDefinition(strides_from_env())
model_stride_partitions = dg.MultiPartitionsDefinition(
    {MODEL_DIMENSION: model_partitions, STRIDE_DIMENSION: stride_partitions}
)


class ModelStride(NamedTuple):
    model: str
    stride: int

    @property
    def partition_key(self) -> dg.MultiPartitionKey:
        return dg.MultiPartitionKey({MODEL_DIMENSION: self.model, STRIDE_DIMENSION: str(self.stride)})


def parse_model_stride(partition_key: str) -> ModelStride:
    """Split a model x stride key, given as a MultiPartitionKey or as the plain string "model|stride".

    `dagster job execute --tags '{"dagster/partition": "m|2"}'` yields the plain string unless the
    per-dimension tags are given too, so both forms are accepted.
    """
    if isinstance(partition_key, dg.MultiPartitionKey):
        parts = partition_key.keys_by_dimension
        model, stride = parts.get(MODEL_DIMENSION, ""), parts.get(STRIDE_DIMENSION, "")
    else:
        model, sep, stride = str(partition_key).partition("|")
        if not sep:
            raise PartitionKeyError(
                f"partition key {partition_key!r} is not a model x stride key: expected 'MODEL|STRIDE', e.g. "
                "'smollm2-135m|2'"
            )
    check_model_key(model)
    if not stride.isdigit() or int(stride) <= 0:
        raise PartitionKeyError(f"partition key {partition_key!r}: the stride must be a positive integer")
    return ModelStride(model, int(stride))
