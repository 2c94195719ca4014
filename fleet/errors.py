"""The fleet's user errors: part of edgepeft's one family (EdgePeftError), so the CLI prints
them as one line."""
from __future__ import annotations

from edgepeft.errors import EdgePeftError


class FleetError(EdgePeftError):
    """A fleet run cannot go on as configured: a reply or adapter from another bundle, a fleet
    adapter that does not verify, a setting out of range. The message says what to do."""
