"""A small Hugging Face Hub look-alike for tests: stdlib ``http.server`` + a thread.

This is a *test fixture*, not a product feature.  It speaks just enough of the
Hub HTTP API for the real ``huggingface_hub`` client (checked against 0.36.2
and 2.4.0, with Xet uploads disabled (:func:`disable_xet`) and without ``hf_transfer``) to create a repo and a branch,
upload a folder (regular and LFS files), list the tree at a commit and
download a snapshot.  Endpoints implemented (model repos only):

====== ==================================================== =====================================
method path                                                 client call that uses it
====== ==================================================== =====================================
POST   /api/repos/create                                    create_repo (``private`` or ``visibility``)
POST   /api/validate-yaml                                   create_commit (when README.md changes)
GET    /api/models/{ns}/{name}                              repo_info / model_info (main)
GET    /api/models/{ns}/{name}/revision/{rev}               repo_info(revision=), snapshot_download
POST   /api/models/{ns}/{name}/branch/{branch}              create_branch
POST   /api/models/{ns}/{name}/preupload/{rev}              upload modes (regular / lfs)
POST   /{ns}/{name}.git/info/lfs/objects/batch              LFS batch API, "basic" transfer only
PUT    /_lfs/upload/{oid}?ticket=...                        the upload URL the batch answer hands out
                                                            (stands in for a presigned S3 URL: no
                                                            auth header, a one-time ticket instead)
POST   /_lfs/verify                                         the LFS "verify" action
POST   /api/models/{ns}/{name}/commit/{rev}                 create_commit (ndjson: header, file,
                                                            lfsFile, deletedFile, deletedFolder)
GET    /api/models/{ns}/{name}/tree/{rev}[/{path}]          list_repo_tree (recursive, expand)
POST   /api/models/{ns}/{name}/paths-info/{rev}             get_paths_info
HEAD   /{ns}/{name}/resolve/{rev}/{path}                    file metadata (X-Repo-Commit, ETag,
GET    /{ns}/{name}/resolve/{rev}/{path}                    X-Linked-Etag, X-Linked-Size); download
====== ==================================================== =====================================

Not implemented (the client is never asked to use them here): datasets and
spaces, pull requests (``create_pr``), multipart LFS, Xet storage (uploads:
the client is told not to use it, :func:`disable_xet`; the batch answer always
chooses ``basic``; listings can carry Xet hashes, :class:`XetListing`), pagination (one page),
tags, copies, gated repos.

Semantics kept honest where tests depend on them:

* Tokens: ``Authorization: Bearer <token>``.  An unknown token is 401 on every
  endpoint (as the Hub does).  Writes need a known token with ``write=True``
  whose user owns the namespace or belongs to it (an org), else 403.  Creating
  a repo in a namespace that is neither a known user nor a known org is 404.
  Private repos are invisible (404) to anyone but their namespace members.
* Hashes are real: regular files carry their git blob sha1, LFS files their
  sha256 (checked against the uploaded bytes) and the git sha1 of their pointer
  file; the commit endpoint refuses an ``lfsFile`` whose object was never
  uploaded.  Commits are immutable snapshots addressed by a 40-hex oid.
* Fault injection for retry tests: :meth:`HubServer.fail_next` answers the next
  ``count`` requests matching a method and a path regex with a given status.
* The server never logs or stores request headers; :attr:`HubServer.requests`
  keeps ``(method, path, status)`` only.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

# Files the Hub stores in LFS by default (subset of its default .gitattributes), plus anything
# >= 10 MiB or binary-looking (NUL byte in the 512-byte sample the client sends).
LFS_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".data", ".pt", ".pth", ".ckpt", ".gguf",
                ".h5", ".msgpack", ".model", ".npy", ".npz", ".pb", ".tflite", ".zip", ".tar", ".gz")
LFS_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _private(body: dict) -> bool:
    """huggingface_hub < 1.0 sends ``private: bool``; >= 1.0 sends ``visibility: public|private``."""
    visibility = body.get("visibility")
    if visibility is not None:
        if visibility not in ("public", "private"):
            raise HubError(400, f"visibility {visibility!r} is not public or private (model repos)")
        return visibility == "private"
    return bool(body.get("private", False))


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class XetListing(Enum):
    """What the tree listing says about an LFS file: its sha256 only (NONE), also its Xet hash as the Hub does
    for Xet-stored files (WITH_LFS), or a Xet hash and no LFS entry at all (XET_ONLY, for the verifier's
    fallback path)."""

    NONE = "none"
    WITH_LFS = "with_lfs"
    XET_ONLY = "xet_only"


def _xet_hash(data: bytes) -> str:
    """The Xet merkle hash of ``data``, from ``hf_xet`` itself (the same code the Hub's storage uses)."""
    import os
    import tempfile

    import hf_xet

    fd, path = tempfile.mkstemp()
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return hf_xet.hash_files([path])[0].hash
    finally:
        os.unlink(path)


@dataclass(frozen=True)
class Token:
    user: str
    write: bool = True


@dataclass(frozen=True)
class Entry:
    """One file in one commit."""

    size: int
    blob_oid: str  # git sha1 of the content (regular) or of the LFS pointer
    last_commit: str
    content: bytes | None = None  # regular files
    lfs_sha256: str | None = None  # LFS files (content lives in HubServer.lfs)


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    title: str
    date: str
    files: dict[str, Entry]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, rev: str) -> Commit | None:
        oid = self.branches.get(rev, rev)
        return self.commits.get(oid)


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, dict(extra or {})


class HubServer:
    """In-memory Hub state plus the HTTP server thread.  Use as a context manager."""

    def __init__(self, tokens: dict[str, Token] | None = None, orgs: dict[str, set[str]] | None = None):
        self.tokens = dict(tokens or {})
        self.orgs = {k: set(v) for k, v in (orgs or {}).items()}  # org -> member users
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []
        self._tickets: dict[str, str] = {}  # ticket -> oid
        self._faults: list[list] = []  # [method, regex, status, remaining]
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self.xet_listing = XetListing.NONE
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubServer:  # noqa: PYI034 (Self needs Python 3.11)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # -- test helpers ------------------------------------------------------------------------
    def fail_next(self, method: str, path_regex: str, status: int, count: int = 1) -> None:
        """Answer the next ``count`` requests matching ``method`` and ``path_regex`` with ``status``."""
        with self._lock:
            self._faults.append([method.upper(), re.compile(path_regex), status, count])

    def calls(self, method: str, path_regex: str) -> list[tuple[str, str, int]]:
        rx = re.compile(path_regex)
        return [r for r in self.requests if r[0] == method.upper() and rx.search(r[1])]

    def head(self, repo_id: str, branch: str = "main") -> Commit:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[branch]]

    # -- auth ----------------------------------------------------------------------------------
    def _user(self, auth: str | None) -> Token | None:
        if not auth:
            return None
        token = auth.removeprefix("Bearer ")
        info = self.tokens.get(token)
        if info is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return info

    def _member(self, tok: Token | None, namespace: str) -> bool:
        return tok is not None and (tok.user == namespace or tok.user in self.orgs.get(namespace, ()))

    def _readable(self, tok: Token | None, repo_id: str) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._member(tok, repo_id.split("/")[0])):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, tok: Token | None, repo_id: str) -> Repo:
        if tok is None:
            raise HubError(401, "You must be authenticated to write")
        repo = self._readable(tok, repo_id)
        if not (tok.write and self._member(tok, repo_id.split("/")[0])):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # -- state changes ---------------------------------------------------------------------------
    def _new_oid(self, *parts: str) -> str:
        return hashlib.sha1("\0".join([*parts, str(next(self._counter))]).encode()).hexdigest()

    def _commit(self, repo: Repo, branch: str, title: str, files: dict[str, Entry]) -> Commit:
        parent = repo.branches.get(branch)
        oid = self._new_oid(repo.repo_id, branch, title, parent or "")
        files = {p: (Entry(e.size, e.blob_oid, oid, e.content, e.lfs_sha256) if e.last_commit == "" else e)
                 for p, e in files.items()}
        commit = Commit(oid, parent, title, _now(), files)
        repo.commits[oid] = commit
        repo.branches[branch] = oid
        return commit

    def create_repo(self, tok: Token | None, body: dict) -> dict:
        if tok is None:
            raise HubError(401, "You must be authenticated to create a repo")
        if body.get("type") not in (None, "model"):
            raise HubError(400, "this test server only hosts model repos")
        name, ns = body.get("name"), body.get("organization") or tok.user
        if not name or not re.fullmatch(r"[\w.\-]{1,96}", name):
            raise HubError(400, f"invalid repo name {name!r}")
        if ns not in self.orgs and ns not in {t.user for t in self.tokens.values()}:
            raise HubError(404, f"Namespace {ns} not found")
        if not (tok.write and self._member(tok, ns)):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {ns}")
        repo_id = f"{ns}/{name}"
        if repo_id in self.repos:
            # The Hub's 409 body carries the url; create_repo(exist_ok=True) reads it.
            raise HubError(409, "You already created this model repo", None, {"url": f"{self.endpoint}/{repo_id}"})
        repo = self.repos[repo_id] = Repo(repo_id, _private(body))
        ga = GITATTRIBUTES
        self._commit(repo, "main", "initial commit", {".gitattributes": Entry(len(ga), git_blob_sha1(ga), "", ga)})
        return {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}

    def create_branch(self, tok, repo_id: str, branch: str, body: dict) -> dict:
        repo = self._writable(tok, repo_id)
        if branch in repo.branches:
            raise HubError(409, f"Branch {branch} already exists")
        start = repo.resolve(body.get("startingPoint") or "main")
        if start is None:
            raise HubError(404, "Invalid starting point", "RevisionNotFound")
        repo.branches[branch] = start.oid
        return {}

    def preupload(self, tok, repo_id: str, rev: str, body: dict) -> dict:
        repo = self._writable(tok, repo_id)
        head = repo.resolve(rev)
        if head is None:
            raise HubError(404, f"Revision {rev} not found", "RevisionNotFound")
        out = []
        for f in body.get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] >= LFS_SIZE or b"\0" in sample
            old = head.files.get(f["path"])
            oid = None if old is None else (old.lfs_sha256 or old.blob_oid)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        return {"files": out, "commitOid": head.oid}

    def lfs_batch(self, tok, repo_id: str, body: dict) -> dict:
        self._writable(tok, repo_id)
        if body.get("operation") != "upload":
            raise HubError(400, "only the upload operation is implemented")
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in self.lfs:  # already stored -> no actions, the client skips the upload
                ticket = secrets.token_hex(8)
                self._tickets[ticket] = obj["oid"]
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/_lfs/upload/{obj['oid']}?ticket={ticket}"},
                    "verify": {"href": f"{self.endpoint}/_lfs/verify"},
                }
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_put(self, oid: str, ticket: str, data: bytes) -> dict:
        if self._tickets.pop(ticket, None) != oid:
            raise HubError(403, "invalid or used upload ticket")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "uploaded bytes do not match the announced sha256")
        self.lfs[oid] = data
        return {}

    def lfs_verify(self, tok, body: dict) -> dict:
        if tok is None:
            raise HubError(401, "verify needs a token")
        data = self.lfs.get(body.get("oid"))
        if data is None or len(data) != body.get("size"):
            raise HubError(404, "object not uploaded")
        return {}

    def commit(self, tok, repo_id: str, rev: str, ndjson: bytes) -> dict:
        repo = self._writable(tok, repo_id)
        if rev not in repo.branches:
            raise HubError(404, f"Revision {rev} is not a branch", "RevisionNotFound")
        lines = [json.loads(line) for line in ndjson.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        head = repo.resolve(rev)
        if header.get("parentCommit") and not head.oid.startswith(header["parentCommit"]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for item in lines[1:]:
            key, v = item["key"], item["value"]
            if key == "file":
                data = base64.b64decode(v["content"])
                files[v["path"]] = Entry(len(data), git_blob_sha1(data), "", content=data)
            elif key == "lfsFile":
                data = self.lfs.get(v["oid"])
                if data is None:
                    raise HubError(422, f"LFS object {v['oid']} for {v['path']} was never uploaded")
                ptr = lfs_pointer(v["oid"], len(data))
                files[v["path"]] = Entry(len(data), git_blob_sha1(ptr), "", lfs_sha256=v["oid"])
            elif key == "deletedFile":
                if files.pop(v["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = v["path"].rstrip("/") + "/"
                files = {p: e for p, e in files.items() if not p.startswith(prefix)}
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        commit = self._commit(repo, rev, header.get("summary", ""), files)
        return {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                "commitUrl": f"{self.endpoint}/{repo_id}/commit/{commit.oid}"}

    # -- reads ------------------------------------------------------------------------------------
    def _commit_at(self, repo: Repo, rev: str) -> Commit:
        c = repo.resolve(rev)
        if c is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return c

    def _file_json(self, repo: Repo, path: str, e: Entry, expand: bool) -> dict:
        d = {"type": "file", "oid": e.blob_oid, "size": e.size, "path": path}
        if e.lfs_sha256:
            d["lfs"] = {"oid": e.lfs_sha256, "size": e.size, "pointerSize": len(lfs_pointer(e.lfs_sha256, e.size))}
            if self.xet_listing is not XetListing.NONE:
                d["xetHash"] = _xet_hash(self.lfs[e.lfs_sha256])
            if self.xet_listing is XetListing.XET_ONLY:
                del d["lfs"]
        if expand:
            c = repo.commits[e.last_commit]
            d["lastCommit"] = {"id": c.oid, "title": c.title, "date": c.date}
        return d

    @staticmethod
    def _dir_json(path: str, commit: Commit) -> dict:
        return {"type": "directory", "path": path,
                "oid": hashlib.sha1(f"{commit.oid}:{path}".encode()).hexdigest()}

    def model_info(self, tok, repo_id: str, rev: str) -> dict:
        repo = self._readable(tok, repo_id)
        c = self._commit_at(repo, rev)
        siblings = []
        for p, e in sorted(c.files.items()):
            s = {"rfilename": p, "size": e.size, "blobId": e.blob_oid}
            if e.lfs_sha256:
                s["lfs"] = {"sha256": e.lfs_sha256, "size": e.size,
                            "pointerSize": len(lfs_pointer(e.lfs_sha256, e.size))}
            siblings.append(s)
        return {"id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": c.oid,
                "private": repo.private, "lastModified": c.date, "tags": [], "downloads": 0, "likes": 0,
                "siblings": siblings}

    def tree(self, tok, repo_id: str, rev: str, path: str, recursive: bool, expand: bool) -> list[dict]:
        repo = self._readable(tok, repo_id)
        c = self._commit_at(repo, rev)
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in c.files):
            raise HubError(404, f"{path} does not exist on {rev}", "EntryNotFound")
        out, seen_dirs = [], set()
        for p, e in sorted(c.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):].split("/")
            for depth in range(1, len(rest)):  # parent folders below `prefix`
                d = prefix + "/".join(rest[:depth])
                if d not in seen_dirs and (recursive or depth == 1):
                    seen_dirs.add(d)
                    out.append(self._dir_json(d, c))
            if recursive or len(rest) == 1:
                out.append(self._file_json(repo, p, e, expand))
        return out

    def paths_info(self, tok, repo_id: str, rev: str, paths: list[str], expand: bool) -> list[dict]:
        repo = self._readable(tok, repo_id)
        c = self._commit_at(repo, rev)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in c.files:
                out.append(self._file_json(repo, p, c.files[p], expand))
            elif any(f.startswith(p + "/") for f in c.files):
                out.append(self._dir_json(p, c))
        return out

    def resolve(self, tok, repo_id: str, rev: str, path: str) -> tuple[bytes, dict]:
        repo = self._readable(tok, repo_id)
        c = self._commit_at(repo, rev)
        e = c.files.get(path)
        if e is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        headers = {"X-Repo-Commit": c.oid, "ETag": f'"{e.blob_oid}"'}
        if e.lfs_sha256:
            data = self.lfs[e.lfs_sha256]
            headers.update({"X-Linked-Etag": f'"{e.lfs_sha256}"', "X-Linked-Size": str(e.size)})
        else:
            data = e.content
        return data, headers


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                handler.rfile.readline()  # trailing CRLF after the last chunk
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    n = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(n) if n else b""


def _handler_for(hub: HubServer):
    api_repo = r"/api/models/(?P<repo>[^/]+/[^/]+)"
    routes = [  # (method, regex over the raw (still %-quoted) path, handler name)
        ("POST", r"/api/repos/create", "create_repo"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("GET", api_repo + r"/revision/(?P<rev>[^/]+)", "model_info"),
        ("GET", api_repo, "model_info_main"),
        ("POST", api_repo + r"/branch/(?P<branch>[^/]+)", "create_branch"),
        ("POST", api_repo + r"/preupload/(?P<rev>[^/]+)", "preupload"),
        ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", "lfs_batch"),
        ("PUT", r"/_lfs/upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
        ("POST", r"/_lfs/verify", "lfs_verify"),
        ("POST", api_repo + r"/commit/(?P<rev>[^/]+)", "commit"),
        ("GET", api_repo + r"/tree/(?P<rev>[^/]+)(?P<path>/.*)?", "tree"),
        ("POST", api_repo + r"/paths-info/(?P<rev>[^/]+)", "paths_info"),
        ("GET", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
        ("HEAD", r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ]
    routes = [(m, re.compile(rx + r"$"), name) for m, rx, name in routes]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep the test output clean; requests are in hub.requests
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            hub.requests.append((self.command, urlsplit(self.path).path, status))

        def _json(self, status: int, obj, headers: dict | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _dispatch(self) -> None:
            url = urlsplit(self.path)
            body = _read_body(self)
            try:
                with hub._lock:
                    for fault in hub._faults:
                        if fault[0] == self.command and fault[3] > 0 and fault[1].search(url.path):
                            fault[3] -= 1
                            raise HubError(fault[2], f"injected failure {fault[2]}")
                    for method, rx, name in routes:
                        m = rx.match(url.path) if method == self.command else None
                        if m:
                            args = {k: unquote(v) for k, v in m.groupdict().items() if v is not None}
                            tok = hub._user(self.headers.get("Authorization"))
                            return getattr(self, "do_" + name)(tok, args, body, parse_qs(url.query))
                raise HubError(404, f"no route for {self.command} {url.path} in the test Hub server")
            except HubError as e:
                headers = {"X-Error-Message": e.message}
                if e.code:
                    headers["X-Error-Code"] = e.code
                self._json(e.status, {"error": e.message, **e.extra}, headers)

        do_GET = do_POST = do_PUT = do_HEAD = _dispatch

        # -- one method per route ------------------------------------------------------------
        def do_create_repo(self, tok, a, body, q):
            self._json(200, hub.create_repo(tok, json.loads(body or b"{}")))

        def do_validate_yaml(self, tok, a, body, q):
            content = json.loads(body).get("content", "")
            errors = []
            if content.startswith("---") and content.count("\n---") < 1:
                errors.append({"message": "unterminated YAML front matter"})
            self._json(400 if errors else 200, {"errors": errors, "warnings": []})

        def do_model_info(self, tok, a, body, q):
            self._json(200, hub.model_info(tok, a["repo"], a["rev"]))

        def do_model_info_main(self, tok, a, body, q):
            self._json(200, hub.model_info(tok, a["repo"], "main"))

        def do_create_branch(self, tok, a, body, q):
            self._json(200, hub.create_branch(tok, a["repo"], a["branch"], json.loads(body or b"{}")))

        def do_preupload(self, tok, a, body, q):
            if q.get("create_pr"):
                raise HubError(400, "pull requests are not implemented by the test server")
            self._json(200, hub.preupload(tok, a["repo"], a["rev"], json.loads(body)))

        def do_lfs_batch(self, tok, a, body, q):
            self._json(200, hub.lfs_batch(tok, a["repo"], json.loads(body)))

        def do_lfs_put(self, tok, a, body, q):
            self._json(200, hub.lfs_put(a["oid"], q.get("ticket", [""])[0], body))

        def do_lfs_verify(self, tok, a, body, q):
            self._json(200, hub.lfs_verify(tok, json.loads(body)))

        def do_commit(self, tok, a, body, q):
            if q.get("create_pr"):
                raise HubError(400, "pull requests are not implemented by the test server")
            self._json(200, hub.commit(tok, a["repo"], a["rev"], body))

        def do_tree(self, tok, a, body, q):
            def flag(k):
                return q.get(k, ["False"])[0].lower() in ("1", "true")

            self._json(200, hub.tree(tok, a["repo"], a["rev"], a.get("path", ""), flag("recursive"), flag("expand")))

        def do_paths_info(self, tok, a, body, q):
            form = parse_qs(body.decode())
            expand = form.get("expand", ["False"])[0].lower() in ("1", "true")
            self._json(200, hub.paths_info(tok, a["repo"], a["rev"], form.get("paths", []), expand))

        def do_resolve(self, tok, a, body, q):
            data, headers = hub.resolve(tok, a["repo"], a["rev"], a["path"])
            rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if rng:  # resumed downloads
                start = int(rng.group(1))
                end = int(rng.group(2)) if rng.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start:end + 1], headers, "application/octet-stream")
            self._send(200, data, headers, "application/octet-stream")

    return Handler


def use_endpoint(monkeypatch, endpoint: str) -> None:
    """Point an already-imported huggingface_hub at ``endpoint``, as ``HF_ENDPOINT`` would have at import.

    huggingface_hub copies ``HF_ENDPOINT`` into module constants when it is first
    imported (``constants.ENDPOINT`` and the resolve-URL template; before 1.0 also a
    copy of that template in ``file_download``).  A test process imports it long
    before a fixture runs, so the fixture sets them (and the variable, for
    subprocesses).  ``bake.publish.hub`` reads ``constants.ENDPOINT`` at call time.
    """
    from huggingface_hub import constants, file_download

    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    if hasattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE"):  # huggingface_hub < 1.0 kept its own copy
        monkeypatch.setattr(file_download, "HUGGINGFACE_CO_URL_TEMPLATE", template)


def disable_xet(monkeypatch) -> None:
    """Make huggingface_hub upload through the LFS protocol this server speaks, not Xet.

    Since 1.0 uploads go through Xet first when ``hf_xet`` is installed (it is a dependency);
    ``HF_HUB_DISABLE_XET`` is read once at import, so the constant is set too (checked at
    call time by ``huggingface_hub.utils.is_xet_available``).  This server does not speak
    the Xet CAS protocol; what Xet changes for verification, the hashes in the tree
    listing, it can report (:class:`XetListing`).
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


__all__ = ["HubServer", "Token", "XetListing", "disable_xet", "git_blob_sha1", "lfs_pointer", "use_endpoint"]
