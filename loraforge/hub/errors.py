"""huggingface_hub's failures as one line that names the repo and says what to do (UserError).

huggingface_hub maps the hub's X-Error-Code header to typed exceptions (GatedRepoError is a
RepositoryNotFoundError, so it is tested first); a network failure is an httpx error."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from loraforge.errors import UserError

TOKEN_ENV = "HF_TOKEN"


class HubError(UserError):
    """A hub operation that failed for a reason the user can act on; names the repo."""


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def token_from_env(required: bool = False) -> str | None:
    """HF_TOKEN, the only place lora-forge takes a token from (never written anywhere)."""
    token = os.environ.get(TOKEN_ENV) or None
    if required and token is None:
        raise HubError(
            f"{TOKEN_ENV} is not set: uploading needs a token with write access "
            f"(create one at {endpoint()}/settings/tokens, then `export {TOKEN_ENV}=...`)"
        )
    return token


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None = None, *, doing: str) -> Iterator[None]:
    """Re-raise huggingface_hub's errors about `repo_id` as HubError (one line, no token)."""
    import httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - explained below, or re-raised as it is
        message = _explain(exc, repo_id, where, revision, doing)
        if message is None:
            raise
        raise HubError(message) from None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes: huggingface_hub wraps a failed LFS upload in a RuntimeError."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _explain(exc: BaseException, repo_id: str, where: str, revision: str | None, doing: str) -> str | None:
    import httpx
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    has_token = bool(os.environ.get(TOKEN_ENV))
    for e in _chain(exc):
        if isinstance(e, UserError):
            return None
        if isinstance(e, GatedRepoError):
            return (
                f"{where}: gated repo, {doing} needs access: accept its conditions at {endpoint()}/{repo_id} and set "
                f"{TOKEN_ENV} to a token of that account" + (" (the current token has no access)" if has_token else "")
            )
        if isinstance(e, RevisionNotFoundError):
            return f"{where}: revision {revision!r} not found on {endpoint()} ({doing})"
        if isinstance(e, RepositoryNotFoundError):
            hint = "check the name, or the token's access" if has_token else f"check the name; a private repo needs {TOKEN_ENV}"
            return f"{repo_id}: no such model repo on {endpoint()} ({doing}); {hint}"
        if isinstance(e, HfHubHTTPError):
            status = e.response.status_code if getattr(e, "response", None) is not None else "?"
            if status in (401, 403):
                return f"{where}: the hub refused {doing} (HTTP {status}): check {TOKEN_ENV}'s permissions"
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            return f"{where}: {doing} failed, the hub answered HTTP {status} ({first}); run the same command again"
        if isinstance(e, (httpx.TransportError, LocalEntryNotFoundError, ConnectionError)):
            first = str(e).splitlines()[0] if str(e) else ""
            return (
                f"{where}: {doing} failed, {endpoint()} could not be reached or the connection broke "
                f"({type(e).__name__}: {first}); run the same command again"
            )
    return None
