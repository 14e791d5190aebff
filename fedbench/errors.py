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
