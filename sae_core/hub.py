"""Publish a run's SAEs to the Hugging Face Hub (or to a local folder), and fetch them back.

    publish(run_dir, "me/my-saes")        one Hub commit: every <hookpoint>/{cfg.json, sae.safetensors},
                                          a README.md model card, and eval/ (report + plots) when present
    publish(run_dir, local_dir="out/")    the same tree, written atomically to a folder
    download_saes("me/my-saes", ["layers.3"])   -> local folder with only that hookpoint (what Sae.load_*_from_hub use)
    python -m sae_core.hub RUN_DIR [REPO_ID] [--local_dir DIR] ...

Everything goes through the real `huggingface_hub` client, so HF_ENDPOINT, HF_HUB_OFFLINE, the download cache and
the client's retries behave as Hugging Face users expect.

The token (argument, HF_TOKEN, or `hf auth login`) is handed to the client and nowhere else. Client errors are
rewritten as one-line messages that name the repo and the fix, and the new exception is raised *after* the
`except` block: a client HTTP error carries its request (Authorization header included), and chaining it would
let a traceback printer or an error serializer reach it.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sae_core.card import render_model_card
from sae_core.utils import fsync_dir, natural_key

logger = logging.getLogger(__name__)

HOOKPOINT_FILES = ("cfg.json", "sae.safetensors")
EVAL_FILES = ("report.json", "report.md")
CARD = "README.md"
EVAL_PREFIX = "eval/"
# "namespace/name" or "name" (the Hub then puts it under the token's user), as the Hub spells repo ids.
_REPO_ID = re.compile(r"([A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*")

T = TypeVar("T")


@dataclass(frozen=True)
class PublishResult:
    """Where a run was published and whether that changed anything."""

    repo_id: str | None
    """The Hub repo, or None when written to a local folder."""
    local_dir: Path | None
    """The local folder, or None when published to the Hub."""
    revision: str
    """Hub: the commit id now at the head of main. Folder: a hash of the folder's content."""
    url: str
    """Hub: the commit's URL. Folder: its file:// URI."""
    created_commit: bool
    """False when the content was already there, byte for byte: nothing was committed or rewritten."""

    def describe(self) -> str:
        where = self.repo_id or str(self.local_dir)
        if self.created_commit:
            return f"published to {where} at {self.revision[:12]}: {self.url}"
        return f"nothing changed: {where} already holds this content (at {self.revision[:12]}), no new commit"


# ---------------------------------------------------------------------------------------------------------------
# What gets published: the run's hookpoint folders, the evaluation report, and the card rendered from both.


@dataclass
class _Bundle:
    files: dict[str, Path]  # path in the repo -> local file
    hookpoints: dict[str, dict[str, Any]]  # hookpoint -> its cfg.json
    run: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    report_md: str | None = None
    plots: list[str] = field(default_factory=list)

    def card(self, repo_id: str | None, license: str, secrets: list[str]) -> bytes:
        return render_model_card(
            repo_id=repo_id, hookpoints=self.hookpoints, run=self.run, report=self.report,
            report_md=self.report_md, plots=self.plots, license=license, secrets=secrets,
        ).encode()


def find_hookpoints(folder: str | os.PathLike[str]) -> list[str]:
    """Names of the sub-folders of `folder` that hold an SAE (a cfg.json), e.g. ["layers.3", "layers.10"]."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = [p.name for p in folder.iterdir() if (p / "cfg.json").is_file() and not p.name.startswith(".")]
    return sorted(names, key=natural_key)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    if not isinstance(data, dict):  # a bad file, reported like the other bad files above
        raise ValueError(f"{path} should hold a JSON object, not {type(data).__name__}")  # noqa: TRY004
    return data


def _gather(run_dir: Path, eval_dir: Path | None) -> _Bundle:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist")
    names = find_hookpoints(run_dir)
    if not names:
        raise FileNotFoundError(
            f"no SAEs in '{run_dir}': expected hookpoint folders like layers.3/ holding cfg.json and sae.safetensors"
        )
    bundle = _Bundle(files={}, hookpoints={})
    for name in names:
        for filename in HOOKPOINT_FILES:
            if not (run_dir / name / filename).is_file():  # a half-written checkpoint must not be published
                raise FileNotFoundError(f"'{run_dir / name}' has no {filename}: is training still writing it?")
            bundle.files[f"{name}/{filename}"] = run_dir / name / filename
        bundle.hookpoints[name] = _read_json(run_dir / name / "cfg.json")
    if (run_dir / "run.json").is_file():
        bundle.run = _read_json(run_dir / "run.json")

    eval_dir = run_dir / "eval" if eval_dir is None else Path(eval_dir)
    if eval_dir.is_dir():
        if (eval_dir / "report.json").is_file():
            bundle.report = _read_json(eval_dir / "report.json")
        if (eval_dir / "report.md").is_file():
            bundle.report_md = (eval_dir / "report.md").read_text()
        for filename in EVAL_FILES:
            if (eval_dir / filename).is_file():
                bundle.files[EVAL_PREFIX + filename] = eval_dir / filename
        for png in sorted(eval_dir.glob("*.png")):
            bundle.files[EVAL_PREFIX + png.name] = png
            bundle.plots.append(EVAL_PREFIX + png.name)
    return bundle


def _known_tokens(token: str | None) -> list[str]:
    """Every token this process could publish with: none of them may end up in a published file."""
    candidates = [token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN")]
    return sorted({t.strip() for t in candidates if t and t.strip()})


def _refuse_files_holding(files: dict[str, Path], secrets: list[str]) -> None:
    """Refuse to publish a file that contains a token (e.g. a config that recorded it by mistake)."""
    needles = [s.encode() for s in secrets if len(s) >= 8]  # shorter strings would match by chance
    for source in files.values():
        if not needles or source.stat().st_size == 0:
            continue
        with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if any(data.find(needle) != -1 for needle in needles):
                raise ValueError(f"refusing to publish: {source} contains the Hugging Face token; remove it first")


# ---------------------------------------------------------------------------------------------------------------
# Publishing


def publish(
    run_dir: str | os.PathLike[str],
    repo_id: str | None = None,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    private: bool = False,
    commit_message: str = "Upload SAEs",
    eval_dir: str | os.PathLike[str] | None = None,
    local_dir: str | os.PathLike[str] | None = None,
    license: str = "mit",
) -> PublishResult:
    """Publish the SAEs of `run_dir` with a model card, to the Hub repo `repo_id` or, if None, to `local_dir`.

    Hub: creates the repo if missing and makes ONE commit holding every hookpoint folder, README.md and eval/
    (report.json, report.md, *.png from `eval_dir`, default run_dir/eval). Files of an earlier publish that this
    run no longer has (a hookpoint, a plot) are deleted in the same commit; files it does not manage are kept.
    Identical content makes no commit (`created_commit` is False). The commit names its parent, so a concurrent
    push makes it fail cleanly instead of mixing two runs; a failed publish leaves the previous revision intact.

    Folder: writes the same tree to `local_dir` via a temporary folder renamed into place.

    token: defaults to HF_TOKEN (or the `hf auth login` token). endpoint: defaults to HF_ENDPOINT / huggingface.co.
    """
    run_dir = Path(run_dir)
    bundle = _gather(run_dir, Path(eval_dir) if eval_dir is not None else None)
    if repo_id is None:
        if local_dir is None:
            raise ValueError("nowhere to publish: pass a Hub repo_id, or local_dir to write a folder")
        secrets = _known_tokens(token)
        _refuse_files_holding(bundle.files, secrets)
        return _publish_to_folder(bundle, run_dir, Path(local_dir), license, secrets)
    if local_dir is not None:
        logger.info("publishing to the Hub repo %s; local_dir is only used without a repo id", repo_id)

    _check_repo_id(repo_id)
    from huggingface_hub import get_token  # lazy: the library imports hub.py without needing the client

    token = token or get_token()
    if not token:
        raise ValueError("no Hugging Face token: set HF_TOKEN (or pass token=) to a token with write access")
    secrets = _known_tokens(token)
    _refuse_files_holding(bundle.files, secrets)
    return _publish_to_hub(bundle, repo_id, token, endpoint, private, commit_message, license, secrets)


def _publish_to_hub(
    bundle: _Bundle, repo_id: str, token: str, endpoint: str | None, private: bool, commit_message: str,
    license: str, secrets: list[str],
) -> PublishResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    where = _Where(repo_id, api.endpoint, secrets)
    repo_url = _hub_call(lambda: api.create_repo(repo_id, private=private, exist_ok=True), where)
    repo_id = where.repo_id = repo_url.repo_id  # "name" alone becomes "user/name"
    # The head before committing: to tell "committed" from "nothing changed", and as the commit's parent.
    head = _hub_call(lambda: api.model_info(repo_id), where)
    remote_files = [sibling.rfilename for sibling in head.siblings or []]

    operations: list[Any] = [CommitOperationAdd(path, str(src)) for path, src in sorted(bundle.files.items())]
    operations.append(CommitOperationAdd(CARD, bundle.card(repo_id, license, secrets)))
    stale = _stale_files(remote_files, keep=set(bundle.files) | {CARD})
    operations += [CommitOperationDelete(path) for path in stale]

    commit = _hub_call(
        lambda: api.create_commit(
            repo_id, operations, commit_message=commit_message, parent_commit=head.sha, repo_type="model"
        ),
        where,
    )
    result = PublishResult(repo_id, None, commit.oid, commit.commit_url, created_commit=commit.oid != head.sha)
    logger.info(result.describe())
    return result


def _stale_files(remote_files: list[str], keep: set[str]) -> list[str]:
    """Remote files that an earlier publish wrote and this one would not: old hookpoints, plots, the report."""
    hookpoint_dirs = {path.split("/")[0] for path in remote_files if path.count("/") == 1 and path.endswith("/cfg.json")}
    managed = [
        path for path in remote_files
        if path.startswith(EVAL_PREFIX) or ("/" in path and path.split("/")[0] in hookpoint_dirs)
    ]
    return sorted(path for path in managed if path not in keep)


def _publish_to_folder(
    bundle: _Bundle, run_dir: Path, local_dir: Path, license: str, secrets: list[str]
) -> PublishResult:
    local_dir = local_dir.expanduser().resolve()
    if local_dir == run_dir.resolve() or local_dir in run_dir.resolve().parents:
        raise ValueError(f"local_dir '{local_dir}' must not be the run folder or one of its parents")
    card = bundle.card(str(local_dir), license, secrets)
    wanted: dict[str, Path | bytes] = {**bundle.files, CARD: card}
    revision = _content_hash(wanted)
    result = PublishResult(None, local_dir, revision, local_dir.as_uri(), created_commit=True)

    if _folder_holds(local_dir, wanted):
        result = PublishResult(None, local_dir, revision, local_dir.as_uri(), created_commit=False)
        logger.info(result.describe())
        return result

    # Build the whole tree next to its destination (same file system, so the renames below are atomic), make it
    # durable, then swap it in. A crash leaves either the old folder or the new one, plus a hidden leftover.
    local_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.tmp-", dir=local_dir.parent))
    try:
        for path_in_repo, source in wanted.items():
            target = staging / path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as out:
                if isinstance(source, bytes):
                    out.write(source)
                else:
                    with open(source, "rb") as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        old = None
        if local_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{local_dir.name}.old-", dir=local_dir.parent))
            os.replace(local_dir, old / "previous")
        os.replace(staging, local_dir)
        fsync_dir(local_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(result.describe())
    return result


def _content_hash(files: dict[str, Path | bytes]) -> str:
    """A stable id for a folder's content (path + bytes of every file), standing in for a commit id."""
    manifest = hashlib.sha256()
    for path in sorted(files):
        digest = hashlib.sha256()
        source = files[path]
        if isinstance(source, bytes):
            digest.update(source)
        else:
            with open(source, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        manifest.update(f"{path}\0{digest.hexdigest()}\n".encode())
    return manifest.hexdigest()[:40]


def _folder_holds(folder: Path, files: dict[str, Path | bytes]) -> bool:
    """True when `folder` holds exactly `files`, byte for byte."""
    if not folder.is_dir():
        return False
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    if present != set(files):
        return False
    for path, source in files.items():
        data = source if isinstance(source, bytes) else None
        target = folder / path
        if data is None:
            if target.stat().st_size != source.stat().st_size or not _same_bytes(target, source):
                return False
        elif target.read_bytes() != data:
            return False
    return True


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            block_a, block_b = fa.read(1 << 20), fb.read(1 << 20)
            if block_a != block_b:
                return False
            if not block_a:
                return True


# ---------------------------------------------------------------------------------------------------------------
# Downloading


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

    patterns: hookpoint folder globs ("layers.10", "layers.*"); None means every hookpoint. From the Hub only the
    matching folders are downloaded (allow_patterns "layers.10/*"); EleutherAI's older "layer_10" naming matches
    "layers.10" and vice versa. Honours HF_ENDPOINT, `revision` (branch, tag or commit) and the offline cache
    (HF_HUB_OFFLINE=1 serves what was downloaded before).
    Raises FileNotFoundError (no such folder, nothing matches, not cached while offline) or ValueError (bad repo id,
    repo or revision not found, token refused), each with a one-line message.
    """
    path = Path(repo_or_path).expanduser()
    if path.is_dir():
        _check_patterns(path, patterns, where=f"'{repo_or_path}'", available=lambda: find_hookpoints(path))
        return path
    if path.exists():
        raise NotADirectoryError(f"'{repo_or_path}' is a file; expected a folder of hookpoint folders or a repo id")
    if _looks_like_path(repo_or_path):
        raise FileNotFoundError(f"no SAE folder at '{repo_or_path}'")
    _check_repo_id(repo_or_path, alternative="an existing folder")

    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if patterns is None:
        allow = [f"*/{name}" for name in HOOKPOINT_FILES]  # every hookpoint, but not the card, report or plots
    else:
        allow = sorted({f"{alias}/*" for pattern in patterns for alias in _aliases(pattern)})
    where = _Where(repo_or_path, (endpoint or constants.ENDPOINT), _known_tokens(token), revision)
    offline = constants.is_offline_mode()
    try:
        folder = Path(
            snapshot_download(
                repo_or_path, repo_type="model", revision=revision, allow_patterns=allow, endpoint=endpoint,
                token=token, cache_dir=cache_dir,
            )
        )
    except LocalEntryNotFoundError:  # includes an incomplete cached snapshot
        error: Exception = FileNotFoundError(
            f"'{repo_or_path}' (revision {revision or 'main'}"
            + (f", hookpoints {patterns})" if patterns else ")")
            + " is not in the local Hugging Face cache and "
            + ("HF_HUB_OFFLINE=1 forbids downloading it: load it once online first" if offline
               else f"the Hub at {where.endpoint} cannot be reached: check the network or HF_ENDPOINT")
        )
    except Exception as exc:  # translated below; anything we cannot explain is re-raised as is
        error = _explain(exc, where) or exc
        if error is exc:
            raise
    else:
        _check_patterns(
            folder, patterns, where=f"Hub repo '{repo_or_path}' (revision {revision or 'main'})",
            available=lambda: _cached_hookpoints(repo_or_path, revision, cache_dir, folder),
        )
        return folder
    raise error


def _aliases(pattern: str) -> list[str]:
    """A hookpoint glob and its spelling in EleutherAI's older repos (layers.3 <-> layer_3)."""
    if pattern.startswith("layers."):
        return [pattern, "layer_" + pattern[len("layers."):]]
    if pattern.startswith("layer_"):
        return [pattern, "layers." + pattern[len("layer_"):]]
    return [pattern]


def _check_patterns(
    folder: Path, patterns: list[str] | None, where: str, available: Callable[[], list[str] | None]
) -> None:
    present = find_hookpoints(folder)
    wanted = patterns if patterns is not None else ["*"]
    missing = [p for p in wanted if not any(fnmatch.fnmatchcase(h, a) for h in present for a in _aliases(p))]
    if missing:
        names = available()
        has = f"it has: {', '.join(names)}" if names else "it has no hookpoint folders (<hookpoint>/cfg.json)"
        raise FileNotFoundError(f"no hookpoint matching {', '.join(missing)} in {where}; {has}")


def _cached_hookpoints(repo_id: str, revision: str | None, cache_dir: Any, folder: Path) -> list[str] | None:
    """The repo's hookpoints, from the tree listing snapshot_download cached (no extra request)."""
    try:
        from huggingface_hub import get_cached_repo_tree
        from huggingface_hub.errors import CachedRepoTreeNotFoundError
    except ImportError:  # an older client: fall back to what is on disk
        return find_hookpoints(folder)
    try:
        paths = [entry.path for entry in get_cached_repo_tree(repo_id, revision=revision, cache_dir=cache_dir)]
    except (CachedRepoTreeNotFoundError, OSError, ValueError):
        return find_hookpoints(folder)
    names = {p.split("/")[0] for p in paths if p.count("/") == 1 and p.endswith("/cfg.json")}
    return sorted(names, key=natural_key)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _check_repo_id(repo_id: str, alternative: str | None = None) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or ".." in repo_id or "--" in repo_id:
        also = f" or {alternative}" if alternative else ""
        raise ValueError(f"'{repo_id}' is not a valid Hub repo id{also}: expected 'namespace/name'")


# ---------------------------------------------------------------------------------------------------------------
# Client errors -> one-line messages without secrets


@dataclass
class _Where:
    repo_id: str
    endpoint: str
    secrets: list[str]
    revision: str | None = None


def _hub_call(call: Callable[[], T], where: _Where) -> T:
    """Run one client call; raise its failure as a one-line error that names the repo and carries no token."""
    try:
        return call()
    except Exception as exc:
        error = _explain(exc, where)
        if error is None:
            raise
    raise error  # outside the except block: no __context__ pointing at the client's request


def _explain(error: BaseException, where: _Where) -> Exception | None:
    """A one-line exception for a client failure, or None when it is not one we can explain."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    repo, endpoint = where.repo_id, where.endpoint
    if isinstance(error, RevisionNotFoundError):
        return ValueError(
            f"revision '{where.revision}' not found in Hub repo '{repo}': pass an existing branch, tag or commit id"
        )
    if isinstance(error, RepositoryNotFoundError):
        return ValueError(
            f"Hub repo '{repo}' not found at {endpoint} (or it is private and the token cannot read it): "
            "check the repo id and HF_TOKEN"
        )
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        said = _one_line(error.server_message or "", where.secrets)
        if status == 401:
            return ValueError(
                f"the Hub at {endpoint} refused the token for '{repo}' (HTTP 401: invalid credentials): "
                "set HF_TOKEN or pass token= with a valid token"
            )
        if status == 403:
            return ValueError(f"the token may not write to '{repo}' (HTTP 403): use a write token for that namespace")
        if status in (409, 412):
            return ValueError(
                f"'{repo}' changed on the Hub while publishing (HTTP {status}); nothing was committed, publish again"
            )
        return ConnectionError(f"the Hub at {endpoint} answered HTTP {status} for '{repo}'" + (f": {said}" if said else ""))
    if isinstance(error, RuntimeError) and error.__cause__ is not None:
        # The client wraps a failed LFS upload as RuntimeError("Error while uploading '<file>' ...") from <cause>.
        cause = _explain(error.__cause__, where)
        detail = _one_line(str(cause or type(error.__cause__).__name__), where.secrets)
        return ConnectionError(f"{_one_line(str(error), where.secrets)} ({detail}); the repo is unchanged")
    if _is_network_error(error):
        return ConnectionError(
            f"cannot reach the Hub at {endpoint} for '{repo}' ({type(error).__name__}, after the client's retries): "
            "check the network or HF_ENDPOINT"
        )
    if isinstance(error, ValueError):  # e.g. invalid README metadata, malformed server answer
        return ValueError(f"'{repo}': {_one_line(str(error), where.secrets)}")
    return None


def _is_network_error(error: BaseException) -> bool:
    # The client's HTTP library changed across versions (requests, httpx, httpx2): recognise any of them.
    top_module = type(error).__module__.split(".")[0]
    return isinstance(error, (ConnectionError, TimeoutError)) or top_module in {
        "httpx", "httpx2", "httpcore", "httpcore2", "requests", "urllib3",
    }


def _one_line(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core.hub",
        description="Publish a run's SAEs, with a model card, to the Hugging Face Hub or to a local folder. "
        "The token comes from HF_TOKEN (or `hf auth login`), never from the command line.",
    )
    parser.add_argument("run_dir", help="run folder holding <hookpoint>/cfg.json and sae.safetensors")
    parser.add_argument("repo_id", nargs="?", help="Hub repo to publish to, e.g. me/smollm2-saes")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--local_dir", help="write the publishable folder here instead (when no REPO_ID)")
    parser.add_argument("--eval_dir", help="evaluation folder (default: RUN_DIR/eval)")
    parser.add_argument("--commit_message", default="Upload SAEs")
    parser.add_argument("--license", default="mit", help="license in the model card (default: mit)")
    args = parser.parse_args(argv)
    if args.repo_id is None and args.local_dir is None:
        raise SystemExit("error: give a REPO_ID to publish to the Hub, or --local_dir DIR to write a folder")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        result = publish(
            args.run_dir, args.repo_id, endpoint=args.endpoint, private=args.private,
            commit_message=args.commit_message, eval_dir=args.eval_dir, local_dir=args.local_dir,
            license=args.license,
        )
    except (ValueError, OSError) as error:  # user errors and refusals: one line, no traceback
        raise SystemExit(f"error: {error}") from None
    print(result.describe())


if __name__ == "__main__":
    main()
