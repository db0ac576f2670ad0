"""Publish a run's SAEs to the Hugging Face Hub (or to a local folder).

    publish(run_dir, "me/my-saes")        one Hub commit: every <hookpoint>/{cfg.json, sae.safetensors},
                                          a README.md model card, eval/ (report + plots) and dashboard/
                                          (latent dashboards, sae_core.dashboard) when present
    publish(run_dir, local_dir="out/")    the same tree, written atomically to a folder
    python -m sae_core.hub RUN_DIR [REPO_ID] [--local_dir DIR] ...

Loading them back is the model's job (`Sae.load_from_hub`, through `sae_core.download`); this module depends
on that one, never the reverse. Everything goes through the real `huggingface_hub` client, so HF_ENDPOINT and
the client's retries behave as Hugging Face users expect.

The token (argument, HF_TOKEN, or `hf auth login`) is handed to the client and nowhere else; client errors
become one-line messages without it (`sae_core.download.hub_call`).
"""

import argparse
import hashlib
import json
import logging
import mmap
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .card import render_model_card
from .download import (
    HubTarget,
    check_repo_id,
    download_saes,  # noqa: F401  (re-exported: it was defined here before download.py)
    hub_call,
    known_tokens,
)
from .errors import HubError
from .models import CFG_FILE, HOOKPOINT_FILES, list_hookpoints
from .utils import atomic_folder, exit_on_bad_input, fail

logger = logging.getLogger(__name__)

EVAL_FILES = ("report.json", "report.md")
CARD = "README.md"
EVAL_PREFIX = "eval/"
DASHBOARD_PREFIX = "dashboard/"


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


# ------------------------------------------------------------------------------------------------------------
# What gets published: the run's hookpoint folders, the evaluation report, and the card rendered from both.


@dataclass
class _Bundle:
    files: dict[str, Path]  # path in the repo -> local file
    hookpoints: dict[str, dict[str, Any]]  # hookpoint -> its cfg.json
    run: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    report_md: str | None = None
    plots: list[str] = field(default_factory=list)
    dashboard: dict[str, list[dict[str, Any]]] | None = None  # dashboard.json's summary rows per hookpoint
    sweep: list[dict[str, str]] = field(default_factory=list)  # the sweep's variants: {variant, location}

    def card(self, repo_id: str | None, license: str, secrets: list[str]) -> bytes:
        return render_model_card(
            repo_id=repo_id,
            hookpoints=self.hookpoints,
            run=self.run,
            report=self.report,
            report_md=self.report_md,
            plots=self.plots,
            dashboard=self.dashboard,
            sweep=self.sweep,
            license=license,
            secrets=secrets,
        ).encode()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise HubError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    if not isinstance(data, dict):  # a bad file, reported like the other bad files above
        raise HubError(f"{path} should hold a JSON object, not {type(data).__name__}")
    return data


def _gather(run_dir: Path, eval_dir: Path | None, dashboard_dir: Path | None = None) -> _Bundle:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist")
    names = list_hookpoints(run_dir)
    if not names:
        raise FileNotFoundError(
            f"no SAEs in '{run_dir}': "
            "expected hookpoint folders like layers.3/ holding cfg.json and sae.safetensors"
        )
    bundle = _Bundle(files={}, hookpoints={})
    for name in names:
        for filename in HOOKPOINT_FILES:
            if not (run_dir / name / filename).is_file():  # a half-written checkpoint must not be published
                raise FileNotFoundError(
                    f"'{run_dir / name}' has no {filename}: is training still writing it?"
                )
            bundle.files[f"{name}/{filename}"] = run_dir / name / filename
        bundle.hookpoints[name] = _read_json(run_dir / name / CFG_FILE)
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

    # Latent dashboards (python -m sae_core.dashboard): a given folder must be one; the default is optional.
    folder = run_dir / "dashboard" if dashboard_dir is None else dashboard_dir
    if dashboard_dir is not None and not (folder / "dashboard.json").is_file():
        raise HubError(
            f"{folder} is not a latent dashboard folder (no dashboard.json): python -m sae_core.dashboard"
        )
    if (folder / "dashboard.json").is_file():
        bundle.dashboard = _read_json(folder / "dashboard.json").get("hookpoints") or {}
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder).as_posix()
            if path.is_file() and not any(part.startswith(".") for part in relative.split("/")):
                bundle.files[DASHBOARD_PREFIX + relative] = path
    return bundle


def _refuse_files_holding(files: dict[str, Path], secrets: list[str]) -> None:
    """Refuse to publish a file that contains a token (e.g. a config that recorded it by mistake)."""
    needles = [s.encode() for s in secrets if len(s) >= 8]  # shorter strings would match by chance
    for source in files.values():
        if not needles or source.stat().st_size == 0:
            continue
        with open(source, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if any(data.find(needle) != -1 for needle in needles):
                raise HubError(
                    f"refusing to publish: {source} contains the Hugging Face token; remove it first"
                )


# ------------------------------------------------------------------------------------------------------------
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
    dashboard_dir: str | os.PathLike[str] | None = None,
    sweep: Sequence[Mapping[str, str]] = (),
) -> PublishResult:
    """Publish the SAEs of `run_dir` with a model card, to the Hub repo `repo_id` or, if None, to `local_dir`.

    Hub: creates the repo if missing and makes ONE commit holding every hookpoint folder, README.md and eval/
    (report.json, report.md, *.png from `eval_dir`, default run_dir/eval), and dashboard/ (the latent
    dashboards of `dashboard_dir`, default run_dir/dashboard when it holds one). Files of an earlier publish
    that this run no longer has (a hookpoint, a plot) are deleted in the same commit; files it does not manage
    are kept. Identical content makes no commit (`created_commit` is False). The commit names its parent, so a
    concurrent push makes it fail cleanly instead of mixing two runs; a failed publish leaves the previous
    revision intact.

    Folder: writes the same tree to `local_dir` via a temporary folder renamed into place.

    token: defaults to HF_TOKEN (or the `hf auth login` token).
    endpoint: defaults to HF_ENDPOINT / huggingface.co.
    sweep: when run_dir is one variant of a sweep, every variant as {"variant", "location"} (a repo id or a
    folder): the card lists them, so a reader of one finds the others.
    """
    run_dir = Path(run_dir)
    bundle = _gather(
        run_dir,
        Path(eval_dir) if eval_dir is not None else None,
        Path(dashboard_dir) if dashboard_dir is not None else None,
    )
    bundle.sweep = [{"variant": str(v["variant"]), "location": str(v["location"])} for v in sweep]
    if repo_id is None:
        if local_dir is None:
            raise HubError("nowhere to publish: pass a Hub repo_id, or local_dir to write a folder")
        secrets = known_tokens(token)
        _refuse_files_holding(bundle.files, secrets)
        return _publish_to_folder(bundle, run_dir, Path(local_dir), license, secrets)
    if local_dir is not None:
        logger.info("publishing to the Hub repo %s; local_dir is only used without a repo id", repo_id)

    check_repo_id(repo_id)
    from huggingface_hub import get_token  # lazy: the client is heavy, and a local publish never needs it

    token = token or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN (or pass token=) to a token with write access")
    secrets = known_tokens(token)
    _refuse_files_holding(bundle.files, secrets)
    return _publish_to_hub(bundle, repo_id, token, endpoint, private, commit_message, license, secrets)


def _publish_to_hub(
    bundle: _Bundle,
    repo_id: str,
    token: str,
    endpoint: str | None,
    private: bool,
    commit_message: str,
    license: str,
    secrets: list[str],
) -> PublishResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi  # lazy, as in publish()

    api = HfApi(endpoint=endpoint, token=token)
    target = HubTarget(repo_id, api.endpoint, secrets)
    repo_url = hub_call(lambda: api.create_repo(repo_id, private=private, exist_ok=True), target)
    repo_id = target.repo_id = repo_url.repo_id  # "name" alone becomes "user/name"
    # The head before committing: to tell "committed" from "nothing changed", and as the commit's parent.
    head = hub_call(lambda: api.model_info(repo_id), target)
    remote_files = [sibling.rfilename for sibling in head.siblings or []]

    operations: list[Any] = [CommitOperationAdd(path, str(src)) for path, src in sorted(bundle.files.items())]
    operations.append(CommitOperationAdd(CARD, bundle.card(repo_id, license, secrets)))
    stale = _stale_files(remote_files, keep=set(bundle.files) | {CARD})
    operations += [CommitOperationDelete(path) for path in stale]

    commit = hub_call(
        lambda: api.create_commit(
            repo_id, operations, commit_message=commit_message, parent_commit=head.sha, repo_type="model"
        ),
        target,
    )
    result = PublishResult(
        repo_id, None, commit.oid, commit.commit_url, created_commit=commit.oid != head.sha
    )
    logger.info(result.describe())
    return result


def _stale_files(remote_files: list[str], keep: set[str]) -> list[str]:
    """Remote files that an earlier publish wrote and this one would not: old hookpoints, plots, the
    report."""
    hookpoint_dirs = {
        path.split("/")[0] for path in remote_files if path.count("/") == 1 and path.endswith(f"/{CFG_FILE}")
    }
    managed = [
        path
        for path in remote_files
        if path.startswith((EVAL_PREFIX, DASHBOARD_PREFIX))
        or ("/" in path and path.split("/")[0] in hookpoint_dirs)
    ]
    return sorted(path for path in managed if path not in keep)


def _publish_to_folder(
    bundle: _Bundle, run_dir: Path, local_dir: Path, license: str, secrets: list[str]
) -> PublishResult:
    local_dir = local_dir.expanduser().resolve()
    if local_dir == run_dir.resolve() or local_dir in run_dir.resolve().parents:
        raise HubError(f"local_dir '{local_dir}' must not be the run folder or one of its parents")
    card = bundle.card(str(local_dir), license, secrets)
    wanted: dict[str, Path | bytes] = {**bundle.files, CARD: card}
    revision = _content_hash(wanted)
    result = PublishResult(None, local_dir, revision, local_dir.as_uri(), created_commit=True)

    if _folder_holds(local_dir, wanted):
        result = PublishResult(None, local_dir, revision, local_dir.as_uri(), created_commit=False)
        logger.info(result.describe())
        return result

    # Build the whole tree beside its destination, make every file durable, then swap it in: a crash leaves
    # either the old folder or the new one, plus a hidden leftover.
    with atomic_folder(local_dir) as staging:
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


# ------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sae_core.hub",
        allow_abbrev=False,
        description="Publish a run's SAEs, with a model card, to the Hugging Face Hub or to a local folder. "
        "The token comes from HF_TOKEN (or `hf auth login`), never from the command line.",
    )
    parser.add_argument("run_dir", help="run folder holding <hookpoint>/cfg.json and sae.safetensors")
    parser.add_argument("repo_id", nargs="?", help="Hub repo to publish to, e.g. me/smollm2-saes")
    parser.add_argument("--endpoint", help="Hub URL (default: HF_ENDPOINT or https://huggingface.co)")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--local_dir", help="write the publishable folder here instead (when no REPO_ID)")
    parser.add_argument("--eval_dir", help="evaluation folder (default: RUN_DIR/eval)")
    parser.add_argument(
        "--dashboard_dir", help="latent dashboards to include (default: RUN_DIR/dashboard when present)"
    )
    parser.add_argument("--commit_message", default="Upload SAEs")
    parser.add_argument("--license", default="mit", help="license in the model card (default: mit)")
    args = parser.parse_args(argv)
    if args.repo_id is None and args.local_dir is None:
        fail("give a REPO_ID to publish to the Hub, or --local_dir DIR to write a folder")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    with exit_on_bad_input():  # bad input, refusals, an unreachable Hub: one line; bugs keep theirs
        result = publish(
            args.run_dir,
            args.repo_id,
            endpoint=args.endpoint,
            private=args.private,
            commit_message=args.commit_message,
            eval_dir=args.eval_dir,
            local_dir=args.local_dir,
            dashboard_dir=args.dashboard_dir,
            license=args.license,
        )
    print(result.describe())


if __name__ == "__main__":
    main()
