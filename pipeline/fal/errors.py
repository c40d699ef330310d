"""Errors of the remote (fal) path. Every message is redacted of the fal key before it is built."""

from __future__ import annotations

from ..errors import FieldError, GenerationCancelled, SDXLCNError
from ..folders import write_error_text
from ..request_log import fetch_command


class FalError(SDXLCNError):
    """Base class of every fal failure. ``request_id`` is set once fal accepted the request."""

    def __init__(self, message: str, request_id: str | None = None):
        self.request_id = request_id
        super().__init__(message)


class FalKeyMissing(FalError):
    """No fal key was found (environment or key file)."""


class FalAuthError(FalError):
    """fal refused the key (HTTP 401/403); the message carries fal's own ``detail`` verbatim."""

    def __init__(self, message: str, status_code: int, detail: str, request_id: str | None = None):
        self.status_code = status_code
        self.detail = detail
        super().__init__(message, request_id)


class FalValidationError(FieldError, FalError, ValueError):
    """fal rejected a field (HTTP 422), or a value cannot be sent to fal: ``FalValidationError(field, detail,
    request_id=None)``."""


class FalRateLimited(FalError):
    """HTTP 429 still after the allowed retries."""


class FalServerError(FalError):
    """HTTP 5xx still after the allowed retries, or another unexpected HTTP status."""

    def __init__(self, message: str, status_code: int | None = None, request_id: str | None = None):
        self.status_code = status_code
        super().__init__(message, request_id)


class FalUnexpectedAnswer(FalServerError):
    """An answer that is not fal's queue protocol, still after the allowed retries: a body that is not JSON, cannot be
    decoded or lacks fields fal always sends, a status fal does not have, a redirect of a submission."""


class FalTimeout(FalError, TimeoutError):
    """Waiting for fal took longer than allowed. The request may still finish: fetch it by id."""


class FalConnectionError(FalError, ConnectionError):
    """The connection to fal failed or dropped (still after the allowed retries)."""


class FalRequestFailed(FalError):
    """fal ran the request and reported an error for it."""


class FalNoImages(FalError):
    """fal's result holds no images."""


class FalImageDownloadError(FalError):
    """A result image could not be downloaded or decoded."""


class FalResultNotSaved(FalError):
    """A fetched (paid) result could not be written to ``folder``: its id stays pending, to be fetched again.
    ``recovery``: how to fetch it again, one sentence (default: by its id, the fal node's way included)."""

    def __init__(self, request_id: str, folder, exc: OSError, recovery: str | None = None):
        self.folder = folder
        recovery = recovery or (f"It stays pending (paid, nothing is lost): fetch it with {fetch_command(request_id)} "
                                "(or the fal node's request_id input).")
        super().__init__(
            f"could not write the result of fal request {request_id} into {folder}: {write_error_text(exc, folder)}; "
            f"choose another folder or free this one. {recovery}", request_id)


class FalCancelled(FalError, GenerationCancelled):
    """The user cancelled; fal was asked to cancel the request."""


class FalBatchIncomplete(FalError):
    """Some requests of a batch completed and some failed. ``results[i]`` is request i's result (None where it
    failed), ``errors[i]`` its failure (None where it completed): the completed results were paid for."""

    def __init__(self, results: list, errors: list):
        self.results, self.errors = results, errors
        failed = [f"#{i + 1}: {e}" for i, e in enumerate(errors) if e is not None]
        done = sum(r is not None for r in results)
        super().__init__(f"{done} of {len(results)} fal requests completed; {len(failed)} failed: " + "; ".join(failed))
