"""Which Hub failures retrying can fix: a typo in an `hf://` id is not one, a timeout is.

huggingface_hub raises a type per Hub answer (`RepositoryNotFoundError`, `GatedRepoError`,
`RevisionNotFoundError`, `HfHubHTTPError` with the status), and wraps a failure to reach the
Hub, or offline mode with nothing cached, in `LocalEntryNotFoundError` whose cause says which;
transformers re-raises each as a plain `OSError` from it. `classify` follows that chain to the
link that decides, so the trainer exits with `CONFIG_ERROR_EXIT_CODE` (not retried) for what a
spec or Secret must fix, and with a retryable failure for the network and the Hub's own
trouble (timeouts, refused connections, 408, 429, 5xx).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from kubetune_trainer.errors import ConfigError

TRANSIENT_STATUSES = frozenset({408, 429})
"""Client errors the Hub answers for load, not for a wrong request (5xx are transient too)."""


@dataclass(frozen=True)
class HubFailure:
    retryable: bool
    reason: str
    """What went wrong, for whoever fixes the spec or the Secret."""


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and what caused it, outermost first (`raise ... from` first, else the
    exception being handled when it was raised)."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        yield link
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)


def _status_failure(status: int) -> HubFailure:
    if status in TRANSIENT_STATUSES or status >= 500:
        return HubFailure(True, f"the Hub answered {status}")
    if status == 401:
        return HubFailure(False, "the Hub refused the token (401): check the secretRef's token")
    if status == 403:
        return HubFailure(False, "the Hub refused access (403): the token lacks permission "
                                 "for this repository")
    return HubFailure(False, f"the Hub answered {status}")


def _link_failure(link: BaseException) -> HubFailure | None:
    """What one exception of the chain says, or None when it says nothing decisive."""
    from huggingface_hub import errors
    from huggingface_hub.utils import httpx

    if isinstance(link, errors.GatedRepoError):
        return HubFailure(False, "a gated repository: its terms must be accepted on the Hub by "
                                 "the account whose token the secretRef holds")
    if isinstance(link, errors.RepositoryNotFoundError):
        return HubFailure(False, "no such repository on the Hub, or a private one the token "
                                 "(secretRef) may not read")
    if isinstance(link, errors.RevisionNotFoundError):
        return HubFailure(False, "the revision does not exist in the repository")
    if isinstance(link, errors.DisabledRepoError):
        return HubFailure(False, "the repository is disabled on the Hub")
    if isinstance(link, errors.RemoteEntryNotFoundError):
        return HubFailure(False, f"a file it needs is not in the repository: {link.response.url}")
    if isinstance(link, errors.HfHubHTTPError) and link.response is not None:
        return _status_failure(link.response.status_code)
    if isinstance(link, errors.HFValidationError | errors.HfUriError):
        return HubFailure(False, f"not a valid repository id: {str(link).splitlines()[0]}")
    if isinstance(link, errors.OfflineModeIsEnabled):
        return _NOT_CACHED
    # OfflineModeIsEnabled is a ConnectionError: it must be told apart above.
    if isinstance(link, httpx.TransportError | TimeoutError | ConnectionError):
        return HubFailure(True, f"the Hub could not be reached: {link}")
    return None


_NOT_CACHED = HubFailure(False, "not in the local Hugging Face cache, and the Hub may not be "
                                "asked (HF_HUB_OFFLINE is set)")


def classify(error: BaseException) -> HubFailure | None:
    """Whether a failure from huggingface_hub or transformers is worth retrying, and why it
    happened; None when no Hub failure is in its chain (it is not the Hub's to judge)."""
    from huggingface_hub import errors

    fallback = None
    for link in _chain(error):
        if isinstance(link, errors.LocalEntryNotFoundError):
            # Not on disk, and the Hub not asked or not reachable: its cause says which;
            # with none, offline mode (or local files only) kept the Hub out of it.
            fallback = _NOT_CACHED
            continue
        failure = _link_failure(link)
        if failure is not None:
            return failure
    return fallback


@contextlib.contextmanager
def configuration_errors(source: str) -> Iterator[None]:
    """Raise a Hub failure that retrying cannot fix as a `ConfigError` naming `source`
    ("spec.model.source hf://..."); everything else, a network failure included, unchanged."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as error:
        failure = classify(error)
        if failure is None or failure.retryable:
            raise
        raise ConfigError(f"{source}: {failure.reason}") from error
