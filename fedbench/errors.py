"""The one exception family for mistakes a user can fix.

The CLI prints a :class:`FedbenchError` as a single message and exits with code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations


class FedbenchError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class SpecError(FedbenchError):
    """A spec string or parameter that cannot be parsed or does not validate."""


class UnknownComponentError(SpecError):
    """A component name that no loaded plugin registers; the message lists the known names."""


class DataError(FedbenchError):
    """A dataset that cannot be found, loaded or partitioned as asked."""


def one_line(error: BaseException) -> str:
    """``Type: first line of the message``: how fedbench reports an exception it did not raise itself
    (a plugin's, a dataset loader's) in a store record, a listing or an error message."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first}".rstrip(": ")
