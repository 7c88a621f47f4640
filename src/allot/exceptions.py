"""One exception hierarchy: every error allot raises on bad input is an `AllotError`.

The CLI prints an `AllotError` as one line and exits with code 2; anything else is a bug.
Messages say what is wrong and what to do about it.
"""


class AllotError(Exception):
    """Base of every error allot raises on bad input or impossible requests."""


class ConfigError(AllotError):
    """A scheme, method or option has an invalid value."""


class BudgetError(AllotError):
    """A budget cannot be met by any plan on the candidate grid, or cannot be parsed."""


class PlanError(AllotError):
    """A plan is malformed, or does not fit the model it is applied to."""


class ArtifactError(AllotError):
    """An artifact directory is missing, corrupt, truncated, or does not fit its model."""


class ModelError(AllotError):
    """An unknown model name, a factory that fails, or weights that do not match the model."""


class DataError(AllotError):
    """An unknown data set, empty calibration data, or data that does not fit the model."""


def shown(text: str, limit: int = 60) -> str:
    """A name read from an untrusted file, fit for a one-line message: as is when printable,
    else its repr (a newline in a tensor name must not break the line), cut at `limit`."""
    text = text if text.isprintable() else repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ExportError(AllotError):
    """A compressed layer has no form in the requested export format, or the export failed."""
