"""A small Hugging Face Hub-compatible HTTP server, so tests can drive the real `huggingface_hub` client
offline.

It implements what the unmodified client calls (read from its source: hf_api.py, _commit_api.py, lfs.py,
file_download.py, _snapshot_download.py) for:

    create_repo           POST /api/repos/create
    create_commit         POST /api/validate-yaml                      (README.md metadata check)
                          POST /api/models/<repo>/preupload/<rev>      (regular or LFS? already there?)
                          POST /<repo>.git/info/lfs/objects/batch      (LFS batch API: where to upload)
                          PUT  /_lfs/<repo>/<sha256>?ticket=...        (the "presigned" upload URL)
                          POST /<repo>.git/info/lfs/objects/verify
                          POST /api/models/<repo>/commit/<rev>   (NDJSON: header, file, lfsFile, deleted*)
    model_info/repo_info  GET  /api/models/<repo>[/revision/<rev>]
    list_repo_tree/files  GET  /api/models/<repo>/tree/<rev>[/<path>]
    hf_hub_download       HEAD/GET /<repo>/resolve/<rev>/<path>        (ETag, X-Repo-Commit, X-Linked-*)
    snapshot_download     repo_info + tree + resolve
    whoami                GET  /api/whoami-v2

Storage, under one folder per server (commits are immutable snapshots, so any old revision stays readable):

    <root>/access.log                         method, path, status per request (never headers)
    <root>/repos/<ns>/<name>/repo.json        {"private": bool, "created_at": ...}
    <root>/repos/<ns>/<name>/refs.json        {"main": "<commit id>"}
    <root>/repos/<ns>/<name>/commits/<id>.json  parent, message, date and every file: size, sha256, blob id,
                                                lfs
    <root>/repos/<ns>/<name>/objects/<sha256>   file contents, content-addressed

Auth as on the Hub: `tokens` maps bearer tokens to user names; no token reads public repos; a token the server
does not know gets 401 "Invalid credentials in Authorization header" on every endpoint; writing needs a token
whose user is the repo's namespace. Tests can inject faults: `fail_next("PUT", "/_lfs/", status=503)`.

Xet storage is not implemented: uploads use the LFS protocol, so clients must run with HF_HUB_DISABLE_XET=1
(downloads need nothing: files are served without an X-Xet-Hash header).
"""

import base64
import datetime as dt
import fnmatch
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.safetensors",
        "*.bin",
        "*.pt",
        "*.pth",
        "*.ckpt",
        "*.h5",
        "*.npy",
        "*.npz",
        "*.zip",
        "*.gz",
    )
)
LFS_MIN_SIZE = 10 * 2**20  # the Hub stores files above 10 MB with LFS whatever their type
REPO = r"(?P<repo>[^/]+/[^/]+)"


class HubError(Exception):
    """An error answer: status, message (also sent as X-Error-Message) and the Hub's X-Error-Code."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        body: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


@dataclass
class _Fault:
    method: str
    path: re.Pattern
    status: int | None  # None: drop the connection without answering
    remaining: int


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Repo:
    """One repo on disk: refs, immutable commits and content-addressed objects."""

    def __init__(self, folder: Path, repo_id: str):
        self.folder, self.repo_id = folder, repo_id
        self.namespace = repo_id.split("/")[0]

    @property
    def meta(self) -> dict:
        return json.loads((self.folder / "repo.json").read_text())

    @property
    def refs(self) -> dict[str, str]:
        return json.loads((self.folder / "refs.json").read_text())

    def commit(self, oid: str) -> dict:
        return json.loads((self.folder / "commits" / f"{oid}.json").read_text())

    def resolve(self, revision: str) -> str:
        """Branch name or full commit id -> commit id."""
        refs = self.refs
        if revision in refs:
            return refs[revision]
        if (
            re.fullmatch(r"[0-9a-f]{40}", revision)
            and (self.folder / "commits" / f"{revision}.json").exists()
        ):
            return revision
        raise HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def files(self, revision: str) -> tuple[str, dict[str, dict]]:
        oid = self.resolve(revision)
        return oid, self.commit(oid)["files"]

    def object_path(self, sha256: str) -> Path:
        return self.folder / "objects" / sha256

    def store(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.object_path(sha256).exists():
            _write_atomic(self.object_path(sha256), data)
        return sha256

    def entry(self, data: bytes, lfs: bool) -> dict:
        sha256 = self.store(data)
        blob = _lfs_pointer(sha256, len(data)) if lfs else data
        return {"size": len(data), "sha256": sha256, "blob_id": _git_blob_id(blob), "lfs": lfs}

    def lfs_patterns(self, files: dict[str, dict]) -> list[str]:
        if ".gitattributes" not in files:
            return []
        text = self.object_path(files[".gitattributes"]["sha256"]).read_text()
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    def add_commit(self, branch: str, files: dict[str, dict], title: str, description: str = "") -> str:
        """Write an immutable commit holding `files`, then move `branch` to it (the ref update is the
        commit)."""
        parent = self.refs.get(branch)
        record = {
            "parent": parent,
            "title": title,
            "description": description,
            "date": _now(),
            "files": files,
        }
        data = json.dumps(record, sort_keys=True, indent=1).encode()
        oid = hashlib.sha1(data).hexdigest()
        _write_atomic(self.folder / "commits" / f"{oid}.json", data)
        _write_atomic(self.folder / "refs.json", json.dumps({**self.refs, branch: oid}).encode())
        return oid

    def card_data(self, files: dict[str, dict]) -> dict:
        """README.md front matter, as the Hub exposes it in model_info (cardData, tags, library_name)."""
        if "README.md" not in files:
            return {}
        text = self.object_path(files["README.md"]["sha256"]).read_text()
        match = re.match(r"---\n(.*?)\n---", text, re.DOTALL)
        data = yaml.safe_load(match.group(1)) if match else None
        return data if isinstance(data, dict) else {}


class HubServer:
    """The server: start() binds 127.0.0.1 on a free port and serves from a thread; stop() shuts it down."""

    def __init__(self, root: str | os.PathLike, tokens: dict[str, str]):
        self.root = Path(root)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens)
        self.lock = threading.Lock()  # one writer at a time: repo creation and commits
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status), for assertions
        self._faults: list[_Fault] = []
        self._ticket_key = secrets.token_bytes(16)
        self._httpd: ThreadingHTTPServer | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    def start(self) -> "HubServer":
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        threading.Thread(target=self._httpd.serve_forever, daemon=True, name="hub-server").start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() the server first"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    # -- test helpers ---------------------------------------------------------------------------------------

    def fail_next(self, method: str, path_regex: str, status: int | None = 503, times: int = 1) -> None:
        """Answer the next `times` matching requests with `status` (None: drop the connection)."""
        self._faults.append(_Fault(method, re.compile(path_regex), status, times))

    def take_fault(self, method: str, path: str) -> _Fault | None:
        with self.lock:
            for fault in self._faults:
                if fault.remaining > 0 and fault.method == method and fault.path.search(path):
                    fault.remaining -= 1
                    return fault
        return None

    def record(self, method: str, path: str, status: int) -> None:
        self.requests.append((method, path, status))
        with open(self.root / "access.log", "a") as log:
            log.write(f"{method} {path} {status}\n")

    def repo(self, repo_id: str) -> Repo | None:
        folder = self.root / "repos" / repo_id
        return Repo(folder, repo_id) if (folder / "refs.json").exists() else None

    def head(self, repo_id: str, branch: str = "main") -> str:
        repo = self.repo(repo_id)
        assert repo is not None, f"no repo {repo_id}"
        return repo.refs[branch]

    def ticket(self, repo_id: str, sha256: str) -> str:
        """Signature that authorises one upload URL without the bearer token (like a presigned S3 URL)."""
        return hmac.new(self._ticket_key, f"{repo_id}:{sha256}".encode(), "sha256").hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects; every answer sends Content-Length

    # -- plumbing -------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def log_message(self, format: str, *args) -> None:  # silence stderr; requests go to HubServer.record
        pass

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self.body = (
            self._read_body()
        )  # always drain the body, or keep-alive would read it as the next request
        self.status = 0
        fault = self.hub.take_fault(method, url.path)
        try:
            if fault is not None and fault.status is None:
                self.close_connection = True  # the client sees the connection die mid-request
                self.status = -1
            elif fault is not None:
                raise HubError(fault.status, "Injected failure for a test")
            else:
                for route_method, pattern, handler in ROUTES:
                    match = pattern.fullmatch(url.path)
                    if match and (method == route_method or (method == "HEAD" and route_method == "GET")):
                        params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                        handler(self, **params)
                        break
                else:
                    raise HubError(404, f"No route for {method} {url.path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send_json({"error": error.message, **error.body}, status=error.status, headers=headers)
        self.hub.record(method, url.path, self.status)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)) > 0:
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # optional trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, data: bytes, status: int = 200, headers: dict | None = None, content_type: str = ""
    ) -> None:
        self.status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(
        self, obj: object, status: int = 200, headers: dict | None = None, content_type: str = ""
    ) -> None:
        self._send(json.dumps(obj).encode(), status, headers, content_type or "application/json")

    def _json(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Invalid JSON body: {error}") from None

    # -- auth -----------------------------------------------------------------------------------------------

    def _user(self) -> str | None:
        """The caller's user name, None when anonymous; a token the server does not know is refused
        outright."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _repo(self, repo_id: str, write: bool = False) -> Repo:
        user = self._user()
        repo = self.hub.repo(repo_id)
        if repo is None or (repo.meta["private"] and user != repo.namespace):
            raise HubError(404, "Repository not found", code="RepoNotFound")
        if write and user is None:
            raise HubError(401, "You must be authenticated to write to a repo", code="RepoNotFound")
        if write and user != repo.namespace:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # -- repos ----------------------------------------------------------------------------------------------

    def create_repo(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        payload = self._json()
        namespace, name = payload.get("organization") or user, payload.get("name", "")
        if payload.get("type", "model") != "model":
            raise HubError(400, "This server only hosts model repos")
        if namespace != user:
            raise HubError(403, f"You don't have the rights to create a repo in {namespace}")
        if not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}", name) or ".." in name or "--" in name:
            raise HubError(400, f"Invalid repo name: {name!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub.lock:
            if self.hub.repo(repo_id) is not None:
                # create_repo(exist_ok=True) reads the url from this answer
                raise HubError(409, "You already created this model repo", body={"url": url})
            folder = self.hub.root / "repos" / repo_id
            (folder / "commits").mkdir(parents=True)
            (folder / "objects").mkdir()
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            _write_atomic(
                folder / "repo.json", json.dumps({"private": private, "created_at": _now()}).encode()
            )
            _write_atomic(folder / "refs.json", b"{}")
            repo = Repo(folder, repo_id)
            # Like the Hub, a new repo starts with one commit holding .gitattributes.
            repo.add_commit(
                "main",
                {".gitattributes": repo.entry(DEFAULT_GITATTRIBUTES.encode(), lfs=False)},
                "initial commit",
            )
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        self._send_json({"type": "user", "name": user, "auth": {"accessToken": {"role": "write"}}})

    def validate_yaml(self) -> None:
        self._user()
        content = self._json().get("content", "")
        match = re.match(r"---\n(.*?)\n---", content, re.DOTALL)
        errors = []
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            data, errors = {}, [{"message": f"YAML does not parse: {error}"}]
        if not isinstance(data, dict):
            errors.append({"message": "metadata must be a YAML mapping"})
        elif not isinstance(data.get("license", ""), str) or not isinstance(data.get("tags", []), list):
            errors.append({"message": "'license' must be a string and 'tags' a list"})
        self._send_json({"errors": errors, "warnings": []}, status=400 if errors else 200)

    def model_info(self, repo: str, rev: str = "main") -> None:
        r = self._repo(repo)
        oid, files = r.files(rev)
        card = r.card_data(files)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path in sorted(files):
            sibling: dict = {"rfilename": path}
            if blobs:
                entry = files[path]
                sibling.update(size=entry["size"], blobId=entry["blob_id"])
                if entry["lfs"]:
                    pointer = _lfs_pointer(entry["sha256"], entry["size"])
                    sibling["lfs"] = {
                        "sha256": entry["sha256"],
                        "size": entry["size"],
                        "pointerSize": len(pointer),
                    }
            siblings.append(sibling)
        meta, commit = r.meta, r.commit(oid)
        self._send_json(
            {
                "_id": hashlib.sha1(repo.encode()).hexdigest()[:24],
                "id": repo,
                "modelId": repo,
                "author": r.namespace,
                "sha": oid,
                "private": meta["private"],
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "createdAt": meta["created_at"],
                "lastModified": commit["date"],
                "library_name": card.get("library_name"),
                "tags": list(card.get("tags") or []),
                "cardData": card or None,
                "siblings": siblings,
            }
        )

    def tree(self, repo: str, rev: str, path: str = "") -> None:
        oid, files = self._repo(repo).files(rev)
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        folders, entries = set(), []
        for file_path in sorted(files):
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folders.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                entry = files[file_path]
                item = {"type": "file", "path": file_path, "size": entry["size"], "oid": entry["blob_id"]}
                if entry["lfs"]:
                    pointer = _lfs_pointer(entry["sha256"], entry["size"])
                    item["lfs"] = {"oid": entry["sha256"], "size": entry["size"], "pointerSize": len(pointer)}
                entries.append(item)
        if prefix and not entries and not folders:
            raise HubError(
                404, f"{path} does not exist at {rev}", code="EntryNotFound", headers={"X-Repo-Commit": oid}
            )
        listing = [
            {"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()}
            for f in sorted(folders)
        ]
        self._send_json(listing + entries)

    # -- uploads --------------------------------------------------------------------------------------------

    def preupload(self, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        _, files = r.files(rev)
        patterns = r.lfs_patterns(files)
        answers = []
        for item in self._json().get("files", []):
            path, size = item["path"], int(item["size"])
            sample = base64.b64decode(item.get("sample", ""))
            lfs = size > LFS_MIN_SIZE or b"\0" in sample or any(fnmatch.fnmatch(path, p) for p in patterns)
            answer = {"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
            if path in files:  # lets the client drop unchanged files (and skip empty commits)
                answer["oid"] = files[path]["sha256"] if files[path]["lfs"] else files[path]["blob_id"]
            answers.append(answer)
        self._send_json({"files": answers, "commitOid": r.resolve(rev)})

    def lfs_batch(self, repo: str) -> None:
        r = self._repo(repo, write=True)
        payload = self._json()
        if payload.get("operation") != "upload":
            raise HubError(400, "This server only implements LFS uploads (downloads go through /resolve)")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            answer: dict = {"oid": oid, "size": size, "authenticated": True}
            stored = r.object_path(oid)
            if not (stored.exists() and stored.stat().st_size == size):  # no "actions": already uploaded
                answer["actions"] = {
                    "upload": {
                        "href": f"{self.hub.url}/_lfs/{repo}/{oid}?ticket={self.hub.ticket(repo, oid)}"
                    },
                    "verify": {"href": f"{self.hub.url}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(answer)
        self._send_json(
            {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
            content_type="application/vnd.git-lfs+json",
        )

    def lfs_upload(self, repo: str, oid: str) -> None:
        # No bearer token here (the client sends none to upload URLs): the signed ticket authorises the
        # upload.
        if not hmac.compare_digest(self.query.get("ticket", ""), self.hub.ticket(repo, oid)):
            raise HubError(403, "Invalid or missing upload ticket")
        r = self.hub.repo(repo)
        if r is None:
            raise HubError(404, "Repository not found", code="RepoNotFound")
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, "Uploaded content does not match its sha256")
        r.store(self.body)
        self._send(b"")

    def lfs_verify(self, repo: str) -> None:
        r = self._repo(repo, write=True)
        payload = self._json()
        stored = r.object_path(payload.get("oid", "-"))
        if not (stored.exists() and stored.stat().st_size == payload.get("size")):
            raise HubError(404, "LFS object not found")
        self._send_json({})

    def commit(self, repo: str, rev: str) -> None:
        r = self._repo(repo, write=True)
        if self.query.get("create_pr"):
            raise HubError(400, "This server does not implement pull requests")
        if rev not in r.refs:
            raise HubError(
                404, f"Invalid rev id: {rev} (commits go to an existing branch)", code="RevisionNotFound"
            )
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        with self.hub.lock:  # read head, check parent, write the commit: nobody commits in between
            head = r.refs[rev]
            parent = header.get("parentCommit")
            if parent and not head.startswith(parent):
                raise HubError(412, f"A commit has happened since {parent}: the branch is now at {head}")
            files = dict(r.commit(head)["files"])
            for line in lines[1:]:
                key, value = line["key"], line["value"]
                path = value["path"]
                if key == "file":
                    files[path] = r.entry(base64.b64decode(value["content"]), lfs=False)
                elif key == "lfsFile":
                    stored = r.object_path(value["oid"])
                    if not stored.exists():  # the whole commit fails: nothing half-published
                        raise HubError(422, f"LFS object for {path} was never uploaded")
                    files[path] = r.entry(stored.read_bytes(), lfs=True)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(
                            404, f"A file with this name doesn't exist: {path}", code="EntryNotFound"
                        )
                elif key == "deletedFolder":
                    for gone in [p for p in files if p.startswith(path.rstrip("/") + "/")]:
                        del files[gone]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            oid = r.add_commit(rev, files, header.get("summary", ""), header.get("description", ""))
        self._send_json(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self.hub.url}/{repo}/commit/{oid}",
                "pullRequestUrl": None,
                "hookOutput": "",
            }
        )

    # -- downloads ------------------------------------------------------------------------------------------

    def resolve(self, repo: str, rev: str, path: str) -> None:
        oid, files = self._repo(repo).files(rev)
        entry = files.get(path)
        if entry is None:
            raise HubError(
                404, f"{path} does not exist at {rev}", code="EntryNotFound", headers={"X-Repo-Commit": oid}
            )
        # ETag: git blob id for regular files; for LFS files the sha256, also as X-Linked-Etag (what the Hub
        # sends on its redirect to the CDN, and what the client keys its cache blobs on).
        headers = {"X-Repo-Commit": oid, "ETag": f'"{entry["blob_id"]}"', "Accept-Ranges": "bytes"}
        if entry["lfs"]:
            headers.update(
                {
                    "ETag": f'"{entry["sha256"]}"',
                    "X-Linked-Etag": f'"{entry["sha256"]}"',
                    "X-Linked-Size": entry["size"],
                }
            )
        data = self.hub.repo(repo).object_path(entry["sha256"]).read_bytes()  # type: ignore[union-attr]
        status = 200
        range_match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if range_match and int(range_match.group(1)) < len(data):  # the client resumes interrupted downloads
            start = int(range_match.group(1))
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            data, status = data[start:], 206
        self._send(data, status, headers)


ROUTES = [
    ("POST", re.compile(r"/api/repos/create"), _Handler.create_repo),
    ("GET", re.compile(r"/api/whoami-v2"), _Handler.whoami),
    ("POST", re.compile(r"/api/validate-yaml"), _Handler.validate_yaml),
    ("GET", re.compile(rf"/api/models/{REPO}(?:/revision/(?P<rev>[^/]+))?"), _Handler.model_info),
    ("GET", re.compile(rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?"), _Handler.tree),
    ("POST", re.compile(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)"), _Handler.preupload),
    ("POST", re.compile(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)"), _Handler.commit),
    ("POST", re.compile(rf"/{REPO}\.git/info/lfs/objects/batch"), _Handler.lfs_batch),
    ("POST", re.compile(rf"/{REPO}\.git/info/lfs/objects/verify"), _Handler.lfs_verify),
    ("PUT", re.compile(rf"/_lfs/{REPO}/(?P<oid>[0-9a-f]{{64}})"), _Handler.lfs_upload),
    ("GET", re.compile(rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)"), _Handler.resolve),
]
