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
        cache: false                # true: train from the cached_activations asset (written once, reused)
        cache_dtype: bfloat16       # storage dtype of that cache: float16, bfloat16 or float32
        sweep: ["k=16,32"]          # one-pass sweep: every combination is a variant (same syntax as --sweep)
        init_seeds: [0, 1]          # ... and every seed (sparsify's name)

Everything is validated when the file is read, so a typo fails at the sensor tick or at the start of a step
with a message that names the file, the entry and the field, rather than an hour into training. Whether a
model or a dataset actually exists is only known when the tokenize step loads it: that fails that model's run
alone.
"""

import difflib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from sae_core.config import RunConfig, SaeConfig
from sae_core.errors import ConfigError

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
    # The assets read one SAE per hookpoint from the run folder, trained from the tokenized dataset.
    "activations": "the pipeline (set `cache: true` on the entry to train from the cached_activations asset)",
    "sweep": "the entry's `sweep` (evaluation and publishing take every variant)",
    "init_seeds": "the entry's `init_seeds` (evaluation and publishing take every variant)",
}
MODEL_HINT = "a Hub id, a local folder, or smollm2-135m"


class RegistryError(ValueError):
    """The registry file is missing or malformed; the message names the file, the entry and the field."""


# Validation errors: a field's type says in words what it must be (`_must_be`), and our own checks raise
# `_invalid` with their whole text; `_one_line` turns either into the one-line message of a RegistryError.


def _invalid(text: str) -> PydanticCustomError:
    return PydanticCustomError("registry", "{text}", {"text": text})


def _requirement(what: str) -> PydanticCustomError:
    return PydanticCustomError("requirement", "must be {what}", {"what": what})


def _must_be(what: str) -> WrapValidator:
    """Report any failure of the annotated type as "must be <what>" (the message adds the field and value)."""

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise _requirement(what) from None

    return WrapValidator(validate)


def _a_list(value: Any) -> Any:
    # A tuple field would also take a string or a set; the registry's YAML must say a list.
    if value is not None and not isinstance(value, list):
        raise _requirement("a list")
    return value


def _required_model(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _invalid(f"`model` is required ({MODEL_HINT})")
    return value.strip()


def _model_key(value: Any) -> str:
    try:
        return check_model_key(value)
    except PartitionKeyError as e:
        raise _invalid(str(e)) from None


Text = Annotated[str, Field(strict=True), _must_be("a str")]
StrideCount = Annotated[int, Field(strict=True, ge=1), _must_be("an integer >= 1")]
NonNegativeLimit = Annotated[
    Annotated[float, Field(strict=True, ge=0)] | None, _must_be("a non-negative number or null")
]
PositiveSetting = Annotated[Annotated[int, Field(strict=True, gt=0)] | None, _must_be("a positive integer")]
CacheDtype = Annotated[
    Literal["float16", "bfloat16", "float32"], _must_be("one of float16, bfloat16, float32")
]


class _Strict(BaseModel):
    """Unknown keys are errors (a typo must not silently mean the default), and entries never change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Thresholds(_Strict):
    """Quality bars of the blocking checks on `sae_evaluation`: the worst hookpoint must stay at or below
    each.

    None turns a check into a pass that says no threshold is set.
    """

    max_fvu: NonNegativeLimit = 0.5
    max_dead_pct: NonNegativeLimit = 50.0
    max_delta_ce: NonNegativeLimit = 1.0
    max_kl: NonNegativeLimit = 1.0


class EvalSettings(_Strict):
    """How `sae_evaluation` measures (a run's config may override each)."""

    max_tokens: PositiveSetting = 16_384
    batch_size: PositiveSetting = 8


class ModelEntry(_Strict):
    """One model of the registry: where it and its data come from, and how its SAEs are trained and judged."""

    name: Annotated[str, BeforeValidator(_model_key)]
    model: Annotated[str, BeforeValidator(_required_model)]
    dataset: Text = "embedded"
    split: Text = "train"
    text_column: Text = "text"
    data_args: Annotated[dict[Any, Any], Field(strict=True), _must_be("a dict")] = {}
    max_examples: Annotated[Annotated[int, Field(strict=True, ge=1)] | None, _must_be("an integer >= 1")] = (
        None
    )
    shuffle_seed: Annotated[int | None, Field(strict=True), _must_be("a int")] = 42
    ctx_len: Annotated[int, Field(strict=True, ge=2), _must_be("an integer >= 2")] = 256
    strides: Annotated[tuple[StrideCount, ...] | None, BeforeValidator(_a_list)] = None
    train: Annotated[dict[str, Any], Field(strict=True), _must_be("a dict")] = {}
    eval: EvalSettings = EvalSettings()
    thresholds: Thresholds = Thresholds()
    cache: Annotated[bool, Field(strict=True), _must_be("true or false")] = False
    cache_dtype: CacheDtype = "bfloat16"
    sweep: Annotated[
        tuple[Annotated[str, Field(strict=True)], ...] | None,
        _must_be("a list of 'field=value,value' strings (quote each in YAML)"),
        BeforeValidator(_a_list),
    ] = None
    init_seeds: Annotated[
        tuple[Annotated[int, Field(strict=True)], ...] | None,
        _must_be("a list of integers"),
        BeforeValidator(_a_list),
    ] = None

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, item: Any) -> Any:
        """The name defaults to one derived from the model; an empty section means its defaults."""
        if not isinstance(item, dict):
            return item
        item = {k: v for k, v in item.items() if not (k in ("train", "eval", "thresholds") and v is None)}
        item.setdefault("model", None)  # so that a missing model gets the message that says what to write
        if "name" not in item:
            try:
                item["name"] = model_key_for(_required_model(item["model"]))
            except PartitionKeyError as e:
                raise _invalid(str(e)) from None
        return item

    @field_validator("data_args")
    @classmethod
    def _as_strings(cls, data_args: dict[Any, Any]) -> dict[str, str]:
        return {str(k): str(v) for k, v in data_args.items()}

    @field_validator("strides")
    @classmethod
    def _sorted_unique(cls, strides: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if strides is not None and not strides:
            raise _invalid("`strides` is empty; omit it to train every stride")
        return None if strides is None else tuple(sorted(set(strides)))

    @field_validator("train")
    @classmethod
    def _train_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        _check_train_options(options)
        return dict(options)

    @model_validator(mode="after")
    def _sweep_variants(self) -> "ModelEntry":
        """Every variant of the sweep must be valid with the entry's training options (sae_core's check)."""
        bare = [item for item in self.sweep or () if "=" not in item]
        if bare:  # YAML's [k=16,32] is two items, 'k=16' and '32'
            raise _invalid(
                f"sweep item {bare[0]!r} is not field=value,value: quote each item in YAML, e.g. "
                'sweep: ["k=16,32"]'
            )
        if self.sweep or self.init_seeds:
            from sae_core.sweep import check_sweep

            try:
                check_sweep(_run_config(self.train), self.sweep or (), self.init_seeds or ())
            except ConfigError as e:
                raise _invalid(f"sweep: {e}") from None
        return self

    def sweep_args(self) -> list[str]:
        """The entry's sweep as `python -m sae_core` flags ([] without one)."""
        args = ["--sweep", *self.sweep] if self.sweep else []
        return args + (["--init_seeds", *map(str, self.init_seeds)] if self.init_seeds else [])

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
            "model": self.model,
            "dataset": self.dataset,
            "split": self.split,
            "text_column": self.text_column,
            "data_args": dict(self.data_args),
            "max_examples": self.max_examples,
            "shuffle_seed": self.shuffle_seed,
            "ctx_len": self.ctx_len,
        }


def _check_train_options(options: dict[str, Any]) -> None:
    """Check training options against sae_core's own config classes, so a bad value fails at registry load."""
    for key in options:
        if key in RESERVED_TRAIN_OPTIONS:
            raise _invalid(f"train.{key} is set by {RESERVED_TRAIN_OPTIONS[key]}, not here")
    sae_fields = {f.name for f in fields(SaeConfig)}
    run_fields = {f.name for f in fields(RunConfig)} - {"sae"}
    for key in options:
        if key not in sae_fields | run_fields:
            raise _invalid(f"train: {_unknown_key(key, sae_fields | run_fields)}")
    try:
        _run_config(options)
    except (ConfigError, TypeError) as e:
        raise _invalid(f"train: {e}") from None


def _run_config(options: dict[str, Any]) -> RunConfig:
    sae_fields = {f.name for f in fields(SaeConfig)}
    sae = SaeConfig(**{k: v for k, v in options.items() if k in sae_fields})
    return RunConfig(sae=sae, **{k: v for k, v in options.items() if k not in sae_fields})


def _unknown_key(key: Any, known: set[str]) -> str:
    close = difflib.get_close_matches(str(key), sorted(known), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(known))})"
    return f"unknown key {key!r}{hint}"


def _one_line(error: ValidationError, where: str) -> str:
    """The first problem of a ModelEntry's validation, as "<where>: <what is wrong with which field>"."""
    # Unknown keys first: a misspelt key is the likelier cause of any other error.
    problems = sorted(error.errors(), key=lambda p: p["type"] != "extra_forbidden")
    problem = problems[0]
    fields_path = [str(part) for part in problem["loc"] if isinstance(part, str)]
    if problem["type"] == "registry":
        return f"{where}: {problem['ctx']['text']}"
    if problem["type"] == "extra_forbidden":
        known = set(_section_at(fields_path[:-1]).model_fields)
        section = f"{'.'.join(fields_path[:-1])}: " if len(fields_path) > 1 else ""
        return f"{where}: {section}{_unknown_key(fields_path[-1], known)}"
    field = f"`{fields_path[0]}`" if len(fields_path) == 1 else ".".join(fields_path)
    if problem["type"] in ("requirement", "model_type"):  # model_type: a section that is not a mapping
        what = problem["ctx"]["what"] if problem["type"] == "requirement" else "a dict"
        return f"{where}: {field} must be {what}, got {problem['input']!r}"
    if problem["type"] == "missing":
        return f"{where}: {field} is required"
    return f"{where}: {field}: {problem['msg']}"


def _section_at(path: list[str]) -> type[BaseModel]:
    section: type[BaseModel] = ModelEntry
    for name in path:
        section = section.model_fields[name].annotation
    return section


def _flag_value(value: Any) -> str:
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Registry:
    path: Path
    entries: dict[str, ModelEntry]

    def __iter__(self) -> Iterator[ModelEntry]:
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
    try:
        return ModelEntry.model_validate(item)
    except ValidationError as e:
        raise RegistryError(_one_line(e, _where_with_name(item, where))) from None


def _where_with_name(item: dict[str, Any], where: str) -> str:
    """`where` with the entry's name, when it has a valid one."""
    try:
        name = (
            check_model_key(item["name"])
            if "name" in item
            else model_key_for(_required_model(item.get("model")))
        )
    except (PartitionKeyError, PydanticCustomError, KeyError):
        return where
    return f"{where} ({name!r})"
