"""Fetch SAEs from the Hugging Face Hub (or find them in a folder), and explain the client's failures in
one line.

    download_saes("me/my-saes", ["layers.3"])
        -> local folder with only that hookpoint (what Sae.load_*_from_hub use)
    download_saes("out/saes")
        -> the folder itself, once it is known to hold hookpoint folders

Everything goes through the real `huggingface_hub` client, so HF_ENDPOINT, HF_HUB_OFFLINE, the download cache
and the client's retries behave as Hugging Face users expect. Publishing (`sae_core.hub`) shares the second
half of this module: client errors are rewritten as one-line messages that name the repo and the fix, and the
new exception is raised *after* the `except` block: a client HTTP error carries its request (Authorization
header included), and chaining it would let a traceback printer or an error serializer reach it.

Nothing here renders a card or reads YAML: loading an SAE needs neither.
"""

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import HubError
from .models import CFG_FILE, HOOKPOINT_FILES, hookpoint_aliases, list_hookpoints, matches_hookpoint
from .utils import natural_key

# "namespace/name" or "name" (the Hub then puts it under the token's user), as the Hub spells repo ids.
_REPO_ID = re.compile(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")

T = TypeVar("T")


def download_saes(
    repo_or_path: str,
    patterns: list[str] | None = None,
    *,
    revision: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """A local folder holding the hookpoint folders of `repo_or_path` (a folder, or a Hub repo id).

    patterns: hookpoint folder globs ("layers.10", "layers.*"); None means every hookpoint. From the Hub only
    the matching folders are downloaded (allow_patterns "layers.10/*"); EleutherAI's older "layer_10" naming
    matches "layers.10" and vice versa. Honours HF_ENDPOINT, `revision` (branch, tag or commit) and the
    offline cache (HF_HUB_OFFLINE=1 serves what was downloaded before).
    Raises FileNotFoundError (no such folder, nothing matches, not cached while offline) or HubError, a
    ValueError (bad repo id, repo or revision not found, token refused), each with a one-line message.
    """
    path = Path(repo_or_path).expanduser()
    if path.is_dir():
        _check_patterns(path, patterns, where=f"'{repo_or_path}'", available=lambda: list_hookpoints(path))
        return path
    if path.exists():
        raise NotADirectoryError(
            f"'{repo_or_path}' is a file; expected a folder of hookpoint folders or a repo id"
        )
    if _looks_like_path(repo_or_path):
        raise FileNotFoundError(f"no SAE folder at '{repo_or_path}'")
    check_repo_id(repo_or_path, alternative="an existing folder")

    # Lazy: the client is heavy and only needed when a repo id (not a folder) is given.
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if patterns is None:
        allow = [
            f"*/{name}" for name in HOOKPOINT_FILES
        ]  # every hookpoint, but not the card, report or plots
    else:
        allow = sorted({f"{alias}/*" for pattern in patterns for alias in hookpoint_aliases(pattern)})
    target = HubTarget(repo_or_path, (endpoint or constants.ENDPOINT), known_tokens(token), revision)
    offline = constants.is_offline_mode()
    try:
        folder = Path(
            snapshot_download(
                repo_or_path,
                repo_type="model",
                revision=revision,
                allow_patterns=allow,
                endpoint=endpoint,
                token=token,
                cache_dir=cache_dir,
            )
        )
    except LocalEntryNotFoundError:  # includes an incomplete cached snapshot
        error: Exception = FileNotFoundError(
            f"'{repo_or_path}' (revision {revision or 'main'}"
            + (f", hookpoints {patterns})" if patterns else ")")
            + " is not in the local Hugging Face cache and "
            + (
                "HF_HUB_OFFLINE=1 forbids downloading it: load it once online first"
                if offline
                else f"the Hub at {target.endpoint} cannot be reached: check the network or HF_ENDPOINT"
            )
        )
    except Exception as exc:  # translated below; anything we cannot explain is re-raised as is
        error = explain_client_error(exc, target) or exc
        if error is exc:
            raise
    else:
        _check_patterns(
            folder,
            patterns,
            where=f"Hub repo '{repo_or_path}' (revision {revision or 'main'})",
            available=lambda: _cached_hookpoints(repo_or_path, revision, cache_dir, folder),
        )
        return folder
    raise error


def _check_patterns(
    folder: Path, patterns: list[str] | None, where: str, available: Callable[[], list[str] | None]
) -> None:
    present = list_hookpoints(folder)
    wanted = patterns if patterns is not None else ["*"]
    missing = [p for p in wanted if not any(matches_hookpoint(h, p) for h in present)]
    if missing:
        names = available()
        has = (
            f"it has: {', '.join(names)}"
            if names
            else f"it has no hookpoint folders (<hookpoint>/{CFG_FILE})"
        )
        raise FileNotFoundError(f"no hookpoint matching {', '.join(missing)} in {where}; {has}")


def _cached_hookpoints(repo_id: str, revision: str | None, cache_dir: Any, folder: Path) -> list[str] | None:
    """The repo's hookpoints, from the tree listing snapshot_download cached (no extra request)."""
    try:  # lazy, like every client import here
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # an older client: fall back to what is on disk
        return list_hookpoints(folder)
    try:
        paths = [
            entry.path for entry in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)
        ]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return list_hookpoints(folder)
    names = {p.split("/")[0] for p in paths if p.count("/") == 1 and p.endswith(f"/{CFG_FILE}")}
    return sorted(names, key=natural_key)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_repo_id(repo_id: str, alternative: str | None = None) -> None:
    """A HubError unless `repo_id` is spelled as the Hub spells repo ids ('namespace/name' or 'name')."""
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        also = f" or {alternative}" if alternative else ""
        raise HubError(f"'{repo_id}' is not a valid Hub repo id{also}: expected 'namespace/name'")


# ------------------------------------------------------------------------------------------------------------
# Client errors -> one-line messages without secrets (shared with sae_core.hub's publishing)


@dataclass
class HubTarget:
    """What a client call was about, for its error message; `secrets` are masked wherever they appear."""

    repo_id: str
    endpoint: str
    secrets: list[str]
    revision: str | None = None


def known_tokens(token: str | None) -> list[str]:
    """Every token this process could send to the Hub: none of them may end up in a message or a published
    file."""
    candidates = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    return sorted({t.strip() for t in candidates if t and t.strip()})


def hub_call(call: Callable[[], T], target: HubTarget) -> T:
    """Run one client call; raise its failure as a one-line error that names the repo and carries no token."""
    try:
        return call()
    except Exception as exc:
        error = explain_client_error(exc, target)
        if error is None:
            raise
    raise error  # outside the except block: no __context__ pointing at the client's request


def explain_client_error(error: BaseException, target: HubTarget) -> Exception | None:
    """A one-line exception for a client failure, or None when it is not one we can explain.

    Refusals and bad input become HubError (a ValueError); an unreachable or failing Hub a ConnectionError.
    """
    # Lazy: only called after the client itself raised, so it is already imported.
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo, endpoint = target.repo_id, target.endpoint
    if isinstance(error, RevisionNotFoundError):
        return HubError(
            f"revision '{target.revision}' not found in Hub repo '{repo}': "
            "pass an existing branch, tag or commit id"
        )
    if isinstance(error, RepositoryNotFoundError):
        return HubError(
            f"Hub repo '{repo}' not found at {endpoint} (or it is private and the token cannot read it): "
            "check the repo id and HF_TOKEN"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        said = one_line(error.server_message or "", target.secrets)
        if status == 401:
            return HubError(
                f"the Hub at {endpoint} refused the token for '{repo}' (HTTP 401: invalid credentials): "
                "set HF_TOKEN or pass token= with a valid token"
            )
        if status == 403:
            return HubError(
                f"the token may not write to '{repo}' (HTTP 403): use a write token for that namespace"
            )
        if status in (409, 412):
            return HubError(
                f"'{repo}' changed on the Hub while publishing (HTTP {status}); "
                "nothing was committed, publish again"
            )
        return ConnectionError(
            f"the Hub at {endpoint} answered HTTP {status} for '{repo}'" + (f": {said}" if said else "")
        )
    if isinstance(error, RuntimeError) and error.__cause__ is not None:
        # The client wraps a failed LFS upload as RuntimeError("Error while uploading '<file>' ...") from
        # <cause>.
        cause = explain_client_error(error.__cause__, target)
        detail = one_line(str(cause or type(error.__cause__).__name__), target.secrets)
        return ConnectionError(f"{one_line(str(error), target.secrets)} ({detail}); the repo is unchanged")
    if _is_network_error(error):
        return ConnectionError(
            f"cannot reach the Hub at {endpoint} for '{repo}' "
            f"({type(error).__name__}, after the client's retries): check the network or HF_ENDPOINT"
        )
    if isinstance(error, ValueError):  # e.g. invalid README metadata, malformed server answer
        return HubError(f"'{repo}': {one_line(str(error), target.secrets)}")
    return None


def _is_network_error(error: BaseException) -> bool:
    # The client's HTTP library changed across versions (requests, httpx, httpx2): recognise any of them.
    top_module = type(error).__module__.split(".")[0]
    return isinstance(error, (ConnectionError, TimeoutError)) or top_module in {
        "httpx",
        "httpx2",
        "httpcore",
        "httpcore2",
        "requests",
        "urllib3",
    }


def one_line(text: str, secrets: Iterable[str]) -> str:
    """`text` on one line of at most 300 characters, every secret replaced by ***."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
