"""lrwatch's exceptions.

    LrwatchError                 root: the CLI shows it as one line, exit code 1
     ├── ConfigError             a bad setting, raised when the object is built
     ├── ControlFileError        a control file that cannot be trusted (hook warns, applies nothing)
     ├── EventFileError          an event file that cannot be read at all
     └── RunGone                 a run directory that vanished (permanent, unlike a missing record)

At runtime the hook never lets any of these reach the user's training step.
"""

from __future__ import annotations


class LrwatchError(Exception):
    """Root of every error lrwatch raises on purpose."""


class ConfigError(LrwatchError, ValueError):
    """A setting is invalid; the message names the fix."""


class ControlFileError(LrwatchError):
    """A control file is malformed, hostile or from a newer major version."""


class EventFileError(LrwatchError):
    """An event file cannot be read."""


class RunGone(LrwatchError):
    """A run directory disappeared; it will not come back by waiting."""
