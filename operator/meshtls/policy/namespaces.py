"""Reading what the API server says about a namespace going away: an expected end, never an error to retry."""

from __future__ import annotations


def namespace_terminating(status: int, message: str) -> bool:
    """The API server refuses new objects in a namespace being deleted with 403 Forbidden and this wording; the
    objects already there are removed by the namespace controller, so there is nothing left to do."""
    return status == 403 and "because it is being terminated" in message
