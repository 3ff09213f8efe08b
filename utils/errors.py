"""Errors that the entry scripts turn into one clear line (``error: ...``) and exit code 2.

Raise these for bad user input: a missing data path, a corrupt file, a pickle for another
architecture, an out-of-range flag, a NaN loss. Anything else is a bug and keeps its traceback.
"""


class ToolkitError(Exception):
    """Base class: the message is shown to the user as a single line."""


class ConfigError(ToolkitError):
    """A flag or config value is missing, malformed or out of range."""


class DataError(ToolkitError):
    """A data file or folder is missing, truncated or of the wrong kind."""


class ParamsError(ToolkitError):
    """A params pickle is unsafe, corrupt, or does not fit the network."""


class TrainingError(ToolkitError):
    """Training cannot go on (for example the loss became NaN)."""
