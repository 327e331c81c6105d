"""The project's own error types.

An error in the user's input (a config key, a file, a checkpoint, a dataset) raises ``UserError`` or a
subclass: the CLI prints it as one line, ``error: ...``, and exits with status 2. The message names the
key or file and says what to change. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """An error in the user's input: printed as one line by the CLI (exit 2), naming what to change."""


class CheckpointError(UserError):
    """A checkpoint or model directory that is missing, incomplete, corrupt or does not fit the run."""


class DataError(UserError):
    """A corpus, prepared dataset or shard that is missing, corrupt or does not fit the run."""


class ConfigError(UserError):
    """A user-facing configuration error: the message says which key is wrong and what to change
    (importable from llmtrain.config too)."""
