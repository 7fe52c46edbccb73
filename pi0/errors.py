"""The project's own exceptions for input a caller got wrong, apart from programming errors: a server answers a
BadRequest with its message (the key, what was expected, what came) and anything else with an error id only."""

from __future__ import annotations


class BadRequest(ValueError):
    """An observation, request or option that is wrong; the message names the key, the expected and the actual
    value, and how to fix it."""


class MissingKey(BadRequest, KeyError):
    """A required key is absent from an observation."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file, keys and shapes."""


class NoActions(Exception):
    """The model answered, but its answer holds no action chunk (π0-FAST tokens that do not decode into one): neither
    the client's fault nor a bug; the message says what the tokens held. A server answers it as an error and counts
    it (`pi0_requests{outcome="no_actions"}`); it never becomes a zero action."""
