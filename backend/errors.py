"""The sonoseg error tree.

Every error a user can act on is a :class:`SonosegError` subclass with a message that says what
went wrong and what to do. Only ``backend.api.errors`` maps these to HTTP statuses and only the
CLI maps them to exit codes; the core never imports Flask.
"""

from __future__ import annotations


class SonosegError(Exception):
    """Base class: an error with a message meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(SonosegError):
    """The caller sent something we cannot use (bad file, bad JSON, unknown label...)."""


class InvalidImage(InvalidInput):
    """A file is not a readable image: wrong format, truncated, no pixel data, too large."""


class UnknownLabel(InvalidInput):
    """A label name or class index that the project's class map does not know."""


class InvalidLabelConfig(InvalidInput):
    """A Label Studio label config we cannot parse or that has no BrushLabels/Image pair."""


class Unauthorized(SonosegError):
    """Missing or wrong credentials."""


class NotFound(SonosegError):
    """A row, file or version that does not exist."""


class Conflict(SonosegError):
    """The request clashes with the current state (e.g. a second serving model)."""


class PayloadTooLarge(InvalidInput):
    """A request body or file beyond the configured size limit."""


class NotReady(SonosegError):
    """A precondition is missing: un-migrated database, no model yet, feature not built yet."""


class CheckpointError(SonosegError):
    """A checkpoint file that is corrupt, has the wrong sha256, or does not match the expected model."""


class UpstreamError(SonosegError):
    """Label Studio (or another upstream service) failed or refused us."""
