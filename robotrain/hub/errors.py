"""How the Hub's failures are told: huggingface_hub's and the HTTP layer's errors about bad input,
auth or reachability become one-line `UserError`s (`hub_errors`), and a failed upload becomes an
`UploadError` that says whether it is worth another try, its HTTP status and a 429's Retry-After.
Tokens never appear in these messages (huggingface_hub's messages carry none)."""

from __future__ import annotations

import contextlib
from typing import Iterator

import httpx2  # huggingface_hub's HTTP library: its transport errors are what a dropped connection raises
from huggingface_hub import constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from robotrain.errors import UserError
from robotrain.repo_id import check_repo_id

_RETRY_STATUSES = frozenset({408, 429})


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, *, writing: bool = False) -> Iterator[None]:
    """Turn huggingface_hub's errors about bad input, auth or reachability into one-line UserErrors."""
    fix_token = "run `hf auth login` or set HF_TOKEN"
    try:
        yield
    except UserError:
        raise
    except HFValidationError:
        check_repo_id(repo_id)  # names the repo id's fault
        raise
    except RepositoryNotFoundError:
        raise UserError(
            f"repo {repo_id} not found on the Hub ({constants.ENDPOINT}), or your token cannot see it: "
            f"check the repo id, or {fix_token}"
        ) from None
    except RevisionNotFoundError:
        raise UserError(
            f"revision {revision!r} not found in {repo_id}: pass a step (e.g. 10), a tag, a branch or a commit sha"
        ) from None
    except OfflineModeIsEnabled:
        raise UserError(f"HF_HUB_OFFLINE=1 is set but {repo_id} is on the Hub: unset HF_HUB_OFFLINE") from None
    except LocalEntryNotFoundError as err:  # a download that kept failing (5xx, connection)
        raise UserError(f"could not download from {repo_id} ({_describe(err)}); try again later") from None
    except HfHubHTTPError as err:
        status = http_status(err)
        if status == 401:
            raise UserError(f"the Hub refused your token (401) for {repo_id}: {fix_token} with a valid token") from None
        if status == 403:
            need = "write" if writing else "read"
            raise UserError(
                f"your token may not {need} {repo_id} (403): use a token with {need} access to that namespace, "
                f"or pick a repo under your own user"
            ) from None
        if status == 400:
            check_repo_id(repo_id)
        raise UserError(f"the Hub failed on {repo_id} ({_describe(err)}); try again later") from None
    except httpx2.TransportError as err:
        raise UserError(
            f"cannot reach the Hub at {constants.ENDPOINT} ({_describe(err)}): check the network or HF_ENDPOINT"
        ) from None


class UploadError(Exception):
    """A failed upload as the upload process reports it: picklable (huggingface_hub's errors carry an
    HTTP response that may not be) and all that the pusher's retry loop needs to know of it."""

    def __init__(self, description: str, retryable: bool, status: int | None = None, retry_after: float = 0.0):
        super().__init__(description, retryable, status, retry_after)
        self.description, self.retryable, self.status, self.retry_after = description, retryable, status, retry_after

    def __str__(self) -> str:
        return self.description

    @classmethod
    def of(cls, err: Exception) -> UploadError:
        return cls(_describe(err), _retryable(err), http_status(err), _retry_after(err))


def http_status(err: Exception) -> int | None:
    """The HTTP status of a huggingface_hub HTTP error; None for any other error."""
    if not isinstance(err, HfHubHTTPError):
        return None
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def _retryable(err: Exception) -> bool:
    """5xx, 429, 408, timeouts, refused and dropped connections: worth another try."""
    if isinstance(err, HfHubHTTPError):
        status = http_status(err)
        return status is None or status >= 500 or status in _RETRY_STATUSES
    return isinstance(err, (httpx2.TransportError, TimeoutError, ConnectionError))


def _retry_after(err: Exception) -> float:
    """A 429's Retry-After in seconds; 0 when there is none."""
    if isinstance(err, HfHubHTTPError) and http_status(err) == 429:
        with contextlib.suppress(ValueError):
            return float(err.response.headers.get("Retry-After", 0))
    return 0.0


def _describe(err: BaseException) -> str:
    """One line about an error, without tokens (huggingface_hub's messages carry none)."""
    if isinstance(err, HfHubHTTPError) and http_status(err) is not None:
        detail = err.server_message or str(err)
        return f"HTTP {http_status(err)}: {detail.strip().splitlines()[0] if detail.strip() else type(err).__name__}"
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
