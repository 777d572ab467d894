"""What can go wrong talking to the Hub: errors a user can act on, and bounded retries.

:func:`with_retries` runs one Hub call under a :class:`RetryPolicy`: 5xx, 429 and connection errors are
retried with exponential backoff, then reported as :class:`HubUnavailableError`; every other failure is
mapped at once to a message that says what to do (401/403: the token, 404: the repo or namespace).
:class:`Scrubber` removes the token from any text that leaves :mod:`bake.publish.hub`.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from bake.errors import BakeError
from lineas.io import ExitCode

log = logging.getLogger(__name__)


class HubError(BakeError):
    """Publishing failed; ``exit_code`` is what the CLI returns."""

    exit_code = ExitCode.FAIL


class HubInputError(HubError, ValueError):
    """Bad repo id, missing folder, missing model card, inconsistent endpoint."""

    exit_code = ExitCode.BAD_INPUT


class HubIntegrityError(HubInputError):
    """The folder is not the intact export lineas-bake wrote (provenance missing or malformed, files changed,
    missing or added, symlinks, dotfiles); ``lineas-bake push --force`` overrides it."""


class HubAuthError(HubError):
    """No token, or the Hub refused it (401) or refused the action (403)."""


class HubNotFoundError(HubError):
    """404: the repo, namespace or revision does not exist (or is invisible to this token)."""


class HubUnavailableError(HubError):
    """5xx / 429 / connection errors that outlasted the retries."""


class HubVerificationError(HubError):
    """The files listed at the new commit do not match the local files."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff: waits ``base * 2**i`` capped at ``max``, ``attempts`` tries in all."""

    attempts: int = 4
    base_delay_s: float = 2.0
    max_delay_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * (2 ** attempt))


class Destination(Protocol):
    """Where a push goes (a :class:`bake.publish.hub.PushPlan`): what the error messages name."""

    repo_id: str
    revision: str
    endpoint: str


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


# What a transport failure is made of, whatever HTTP library huggingface_hub uses: requests (hub < 1.0),
# httpx (hub >= 1.0) and their connection pools all raise their own classes, but chain them (``raise X from
# e`` or during handling) to the socket error underneath, which is one of these builtins.
_TRANSIENT_OS_ERRORS = (ConnectionError, TimeoutError, socket.gaierror)


def _causes(exc: BaseException):
    """``exc`` and every exception it was raised from or while handling, outermost first."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_retryable(exc: BaseException) -> bool:
    """5xx and 429 answers, and failures to reach the server at all (no HTTP answer; a connection, DNS or
    timeout error somewhere in the chain).  Decided by the status code and by Python's own socket errors,
    never by the HTTP library's exception names."""
    status = _status(exc)
    if status is not None:
        return status >= 500 or status == 429
    return any(isinstance(e, _TRANSIENT_OS_ERRORS) for e in _causes(exc))


def _transport_failure(exc: BaseException) -> str:
    """``connection error (ConnectionRefusedError: ...)``: the socket error under the HTTP library's wrapper."""
    root = next((e for e in _causes(exc) if isinstance(e, _TRANSIENT_OS_ERRORS)), exc)
    kind = "timeout" if isinstance(root, TimeoutError) else "connection error"
    return f"{kind}: {type(root).__name__}"


def _server_message(exc: BaseException) -> str:
    msg = getattr(exc, "server_message", None) or ""
    return f" (server said: {msg.strip()})" if msg.strip() else ""


def _classify(exc: BaseException, plan: Destination, step: str) -> HubError:
    status = _status(exc)
    owner = plan.repo_id.split("/")[0]
    if status == 401:
        return HubAuthError(f"{step}: the Hub rejected the token (401 Unauthorized){_server_message(exc)}. Check that "
                            "HF_TOKEN (or the token saved by `hf auth login`) is current and valid.")
    if status == 403:
        return HubAuthError(f"{step}: permission denied (403 Forbidden){_server_message(exc)}. The token is valid but "
                            f"may not write to {plan.repo_id}: use a token with write access to the namespace "
                            f"{owner!r} (a 'write' token, or a fine-grained token granting it).")
    if status == 404:
        return HubNotFoundError(f"{step}: not found (404){_server_message(exc)}. Check that the namespace {owner!r} "
                                f"exists and that the token can see {plan.repo_id}"
                                + (f" and its branch {plan.revision!r}" if plan.revision != "main" else "") + ".")
    if is_retryable(exc):
        what = f"HTTP {status}" if status is not None else _transport_failure(exc)
        return HubUnavailableError(f"{step}: the Hub at {plan.endpoint} is unavailable ({what}){_server_message(exc)}.")
    if status is not None:
        return HubError(f"{step}: the Hub answered HTTP {status}{_server_message(exc)}.")
    return HubError(f"{step}: {type(exc).__name__}: {exc}")


class Scrubber:
    """Removes the token from any text we produce (defence in depth: we never format it in)."""

    def __init__(self, token: str | None):
        self.token = token

    def __call__(self, text: str) -> str:
        return text.replace(self.token, "<token>") if self.token else text


def with_retries(fn: Callable, plan: Destination, step: str, retry: RetryPolicy, sleep: Callable[[float], None]):
    for attempt in range(retry.attempts):
        try:
            return fn()
        except HubError:
            raise
        except Exception as exc:
            err = _classify(exc, plan, step)
            if not isinstance(err, HubUnavailableError) or attempt == retry.attempts - 1:
                if isinstance(err, HubUnavailableError):
                    err = HubUnavailableError(f"{err} Gave up after {retry.attempts} attempts.")
                raise err from exc
            wait = retry.delay(attempt)
            log.warning("%s failed (%s); retry %d/%d in %.1fs", step,
                        f"HTTP {_status(exc)}" if _status(exc) else _transport_failure(exc),
                        attempt + 1, retry.attempts - 1, wait)
            sleep(wait)
