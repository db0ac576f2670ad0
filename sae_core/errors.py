"""Every error the library raises on purpose: one base class, so callers can tell bad input from a bug.

A `SaeCoreError` carries a one-line message that names what is wrong and what would be right. The CLIs print
it and exit with status 2; anything else (a real bug) keeps its traceback. Subclassing ValueError keeps
`except ValueError` in users' code working.
"""


class SaeCoreError(ValueError):
    """Bad input or a state the library cannot continue from; the message is one line."""


class ConfigError(SaeCoreError):
    """A configuration value is wrong; the message says which and what would be right."""


class ModelLoadError(SaeCoreError):
    """The language model (or its tokenizer) cannot be loaded or understood."""


class DatasetLoadError(SaeCoreError):
    """The dataset cannot be found, read or tokenized as asked."""


class SaeLoadError(SaeCoreError):
    """A saved SAE is missing, corrupt or inconsistent; the message names the file."""


class CheckpointError(SaeCoreError):
    """A checkpoint is missing, corrupt or does not match the run; the message names the file."""


class EvalError(SaeCoreError):
    """The evaluation cannot run as asked; the message says why and what to pass instead."""


class HubError(SaeCoreError):
    """The Hub (or a local publish target) refused or could not serve a request; the message has no
    secrets."""


class TrainingDivergedError(SaeCoreError):
    """Training cannot go on: its loss or gradients stayed NaN/Inf, or its weights are no longer finite."""
