"""Errors raised while finding, converting or running a target model.

Each one carries a message meant for a person: it names the file, value or architecture at fault,
so the CLI can print it as one line instead of a traceback.
"""


class ModelError(Exception):
    """Base class of every model-side error the CLI reports as one line."""


class ModelNotFoundError(ModelError):
    """The model path or name does not point at anything usable."""


class CorruptModelError(ModelError):
    """A weights, GGUF or config file exists but cannot be read (truncated, bad header, ...)."""


class UnsupportedArchitectureError(ModelError):
    """The checkpoint's architecture is not one the lean decoder implements."""


class ContextTooLongError(ModelError):
    """A prompt (or prompt plus draft tree) does not fit the model's or the cache's context."""
