"""Errors that fastdecode raises for bad input: each derives from FastdecodeError, whose
message the CLI prints as one line before exiting with status 2, instead of a traceback."""


class FastdecodeError(Exception):
    """Base class for errors caused by bad input or a bad environment."""


class ConfigError(FastdecodeError, ValueError):
    """A configuration value is out of range or inconsistent."""


class ModelLoadError(FastdecodeError):
    """A model name is unknown, or its files are missing or malformed."""


class InputError(FastdecodeError, ValueError):
    """A prompt, token sequence or data source cannot be used."""


class DeviceError(FastdecodeError):
    """The requested device or dtype cannot run here."""


class OutputError(FastdecodeError):
    """An output path cannot be written, or writing it would destroy data."""


class NonFiniteError(FastdecodeError, FloatingPointError):
    """A model produced NaN or Inf logits (a broken checkpoint, or an overflow)."""
