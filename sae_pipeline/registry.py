"""The model registry: a YAML file listing the models whose SAEs the pipeline keeps trained and published.

    models:
      - name: smollm2-135m          # the partition key (default: derived from `model`, 'org/x' -> 'org--x')
        model: smollm2-135m         # Hub id, local folder, or 'smollm2-135m' (the embedded model)
        dataset: embedded           # Hub id, local file/folder, or 'embedded' (the embedded corpus)
        max_examples: 2000          # documents to tokenize (default: all)
        ctx_len: 128                # tokens per sequence
        strides: [2, 4]             # layer strides to train (default: every stride partition)
        train: {expansion_factor: 8, k: 32, max_tokens: 20000}   # any `python -m sae_core` option
        eval: {max_tokens: 4096}
        thresholds: {max_fvu: 0.5, max_dead_pct: 50, max_delta_ce: 1.0, max_kl: 1.0}   # blocking checks

Everything is validated when the file is read, so a typo fails at the sensor tick or at the start of a step
with a message that names the file, the entry and the field, rather than an hour into training. Whether a
model or a dataset actually exists is only known when the tokenize step loads it: that fails that model's run
alone.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .partitions import PartitionKeyError, check_model_key, model_key_for

REGISTRY_ENV = "SAE_PIPELINE_REGISTRY"
DEFAULT_REGISTRY = Path(__file__).with_name("models.yaml")

# sae_core options the pipeline sets itself: the partition picks the layers, the artefact store the folders,
# the tokenize asset the data, and a token must never sit in a file.
RESERVED_TRAIN_OPTIONS = {
    "model": "the entry's `model`",
    "dataset": "the entry's `dataset` (training reads the tokenized dataset)",
    "save_dir": "the artefact store",
    "run_name": "the artefact store",
    "resume": "the pipeline (it resumes an unfinished checkpoint by itself)",
    "layer_stride": "the stride partition",
    "layers": "the stride partition",
    "hookpoints": "the stride partition",
    "ctx_len": "the entry's `ctx_len`",
    "split": "the entry's `split`",
    "text_column": "the entry's `text_column`",
    "max_examples": "the entry's `max_examples`",
    "data_args": "the entry's `data_args`",
    "shuffle_seed": "the entry's `shuffle_seed`",
    "hf_token": "the HF_TOKEN environment variable (a token must never be written to the registry)",
}


class RegistryError(ValueError):
    """The registry file is missing or malformed; the message names the file, the entry and the field."""


@dataclass(frozen=True)
class Thresholds:
    """Quality bars of the blocking checks on `sae_evaluation`: the worst hookpoint must stay at or below
    each.

    None turns a check into a pass that says no threshold is set.
    """

    max_fvu: float | None = 0.5
    max_dead_pct: float | None = 50.0
    max_delta_ce: float | None = 1.0
    max_kl: float | None = 1.0


@dataclass(frozen=True)
class EvalSettings:
    max_tokens: int = 16_384
    batch_size: int = 8


@dataclass(frozen=True)
class ModelEntry:
    """One model of the registry: where it and its data come from, and how its SAEs are trained and judged."""

    name: str
    model: str
    dataset: str = "embedded"
    split: str = "train"
    text_column: str = "text"
    data_args: dict[str, str] = field(default_factory=dict)
    max_examples: int | None = None
    shuffle_seed: int | None = 42
    ctx_len: int = 256
    strides: tuple[int, ...] | None = None
    train: dict[str, Any] = field(default_factory=dict)
    eval: EvalSettings = field(default_factory=EvalSettings)
    thresholds: Thresholds = field(default_factory=Thresholds)

    def train_args(self) -> list[str]:
        """The entry's training options as `python -m sae_core` flags (the pipeline adds model, data,
        folders)."""
        args: list[str] = []
        for key, value in self.train.items():
            args.append(f"--{key}")
            if isinstance(value, (list, tuple)):
                args.extend(str(v) for v in value)
            else:
                args.append(_flag_value(value))
        return args

    def tokenization_settings(self) -> dict[str, Any]:
        """What decides the tokenized dataset: when it changes, the model needs tokenizing again."""
        return {
            "model": self.model, "dataset": self.dataset, "split": self.split,
            "text_column": self.text_column, "data_args": dict(self.data_args),
            "max_examples": self.max_examples, "shuffle_seed": self.shuffle_seed, "ctx_len": self.ctx_len,
        }


def _flag_value(value: Any) -> str:
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Registry:
    path: Path
    entries: dict[str, ModelEntry]

    def __iter__(self):
        return iter(self.entries.values())

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> ModelEntry:
        try:
            return self.entries[name]
        except KeyError:
            known = ", ".join(sorted(self.entries)) or "none"
            raise RegistryError(
                f"model {name!r} is not in the registry {self.path} (it lists: {known}); add it there, or "
                "delete the partition if the model was retired"
            ) from None


def registry_path(path: str | os.PathLike[str] | None = None) -> Path:
    """The registry file: `path`, else $SAE_PIPELINE_REGISTRY, else the packaged default (the embedded
    model)."""
    chosen = path or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY
    return Path(chosen).expanduser()


def load_registry(path: str | os.PathLike[str] | None = None) -> Registry:
    """Read and validate the registry (see the module docstring for the format)."""
    path = registry_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RegistryError(
            f"model registry {path} does not exist (set {REGISTRY_ENV} or the registry resource's path)"
        ) from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise RegistryError(f"model registry {path}: cannot read it: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("models"), list):
        raise RegistryError(f"model registry {path}: expected a mapping with a list under `models:`")
    unknown = set(raw) - {"models"}
    if unknown:
        raise RegistryError(f"model registry {path}: unknown top-level keys {sorted(unknown)}, only models:")
    entries: dict[str, ModelEntry] = {}
    for i, item in enumerate(raw["models"]):
        where = f"model registry {path}: models[{i}]"
        entry = parse_entry(item, where)
        if entry.name in entries:
            raise RegistryError(f"{where}: duplicate name {entry.name!r} (names are partition keys: unique)")
        entries[entry.name] = entry
    return Registry(path, entries)


def parse_entry(item: Any, where: str = "registry entry") -> ModelEntry:
    """Validate one registry entry (a mapping read from YAML) into a ModelEntry."""
    if not isinstance(item, dict):
        raise RegistryError(f"{where}: expected a mapping with at least `model:`, got {type(item).__name__}")
    _reject_unknown(item, {f.name for f in fields(ModelEntry)}, where)
    model = item.get("model")
    if not isinstance(model, str) or not model.strip():
        raise RegistryError(f"{where}: `model` is required (a Hub id, a local folder, or smollm2-135m)")
    try:
        name = check_model_key(item["name"]) if "name" in item else model_key_for(model)
    except PartitionKeyError as e:
        raise RegistryError(f"{where}: {e}") from None
    where = f"{where} ({name!r})"

    kwargs: dict[str, Any] = {"name": name, "model": model.strip()}
    for key in ("dataset", "split", "text_column"):
        if key in item:
            kwargs[key] = _typed(item[key], str, where, key)
    if "data_args" in item:
        data_args = _typed(item["data_args"], dict, where, "data_args")
        kwargs["data_args"] = {str(k): str(v) for k, v in data_args.items()}
    if item.get("max_examples") is not None:
        kwargs["max_examples"] = _positive_int(item["max_examples"], where, "max_examples")
    if "shuffle_seed" in item:
        seed = item["shuffle_seed"]
        kwargs["shuffle_seed"] = None if seed is None else _typed(seed, int, where, "shuffle_seed")
    if "ctx_len" in item:
        kwargs["ctx_len"] = _positive_int(item["ctx_len"], where, "ctx_len", minimum=2)
    if item.get("strides") is not None:
        strides = _typed(item["strides"], list, where, "strides")
        kwargs["strides"] = tuple(sorted({_positive_int(s, where, "strides") for s in strides}))
        if not kwargs["strides"]:
            raise RegistryError(f"{where}: `strides` is empty; omit it to train every stride")
    kwargs["train"] = _train_options(item.get("train") or {}, where)
    kwargs["eval"] = _section(item.get("eval") or {}, EvalSettings, where, "eval")
    kwargs["thresholds"] = _section(item.get("thresholds") or {}, Thresholds, where, "thresholds")
    return ModelEntry(**kwargs)


def _train_options(options: Any, where: str) -> dict[str, Any]:
    """Check training options against sae_core's own config classes, so a bad value fails at registry load."""
    from sae_core.config import ConfigError, RunConfig, SaeConfig

    options = _typed(options, dict, f"{where}: train", "train")
    for key in options:
        if key in RESERVED_TRAIN_OPTIONS:
            raise RegistryError(f"{where}: train.{key} is set by {RESERVED_TRAIN_OPTIONS[key]}, not here")
    sae_fields = {f.name for f in fields(SaeConfig)}
    run_fields = {f.name for f in fields(RunConfig)} - {"sae"}
    _reject_unknown(options, sae_fields | run_fields, f"{where}: train")
    try:
        sae = SaeConfig(**{k: v for k, v in options.items() if k in sae_fields})
        RunConfig(sae=sae, **{k: v for k, v in options.items() if k in run_fields})
    except (ConfigError, TypeError) as e:
        raise RegistryError(f"{where}: train: {e}") from None
    return dict(options)


def _section(options: Any, cls: type, where: str, name: str) -> Any:
    options = _typed(options, dict, where, name)
    _reject_unknown(options, {f.name for f in fields(cls)}, f"{where}: {name}")
    for f in fields(cls):
        value = options.get(f.name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise RegistryError(
                f"{where}: {name}.{f.name} must be a non-negative number or null, got {value!r}"
            )
        if cls is EvalSettings and (not isinstance(value, int) or value == 0):
            raise RegistryError(f"{where}: {name}.{f.name} must be a positive integer, got {value!r}")
    return cls(**options)


def _reject_unknown(mapping: dict[str, Any], known: set[str], where: str) -> None:
    for key in mapping:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
            raise RegistryError(f"{where}: unknown key {key!r}{hint}")


def _typed(value: Any, kind: type, where: str, key: str) -> Any:
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise RegistryError(f"{where}: `{key}` must be a {kind.__name__}, got {value!r}")
    return value


def _positive_int(value: Any, where: str, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RegistryError(f"{where}: `{key}` must be an integer >= {minimum}, got {value!r}")
    return value
