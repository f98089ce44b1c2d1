"""Why an update command failed, split the way an operator acts on it (python-tuf's split):
the repository could not be reached (retry later) versus the repository lied (stop, alert).

Kept free of heavy imports: the API server maps these to HTTP codes.
"""

from __future__ import annotations

from kiln.core.errors import KilnError


class UpdateError(KilnError):
    """Base for every update failure; the message names the file, role or field."""


class RepositoryUnreachable(UpdateError):
    """Network trouble: connection refused, timeout, HTTP error, a body cut short."""


class UntrustedUpdate(UpdateError):
    """The repository served something TUF or the manifest does not vouch for: a bad
    signature, a version rollback, a length or hash mismatch, a malformed manifest."""


class MetadataExpired(UntrustedUpdate):
    """Signed metadata past its expiry (a frozen or neglected repository)."""


class NotAllowed(UpdateError):
    """The command is not allowed in the current update state (HTTP 409)."""


class Busy(UpdateError):
    """Another update command is running (HTTP 423)."""


class NothingChosen(UpdateError):
    """No update chosen or staged for the command to act on (HTTP 404)."""
