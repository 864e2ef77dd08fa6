"""A small, real HTTP server that speaks the part of the Hugging Face Hub's API that
huggingface_hub 1.33 uses for lora-forge's downloads and uploads, for tests (no network).

Endpoints (as huggingface_hub calls them; read from its source, see tests/test_hub.py):

    GET  /api/whoami-v2                                   who the token belongs to
    POST /api/repos/create                                create a repo (409 if it exists)
    GET  /api/models/{repo}[/revision/{rev}]              model info (sha of the revision)
    GET  /api/datasets/{repo}[/revision/{rev}], .../tree/, .../paths-info/, /datasets/{repo}/resolve/...
                                                          the same for dataset repos (push_dataset)
    GET  /api/models/{repo}/tree/{rev}[/{path}]           file listing (size, oid, lfs sha256)
    POST /api/models/{repo}/paths-info/{rev}              the same for given paths
    POST /api/models/{repo}/preupload/{rev}               regular or LFS per file
    POST /api/validate-yaml                               README.md front matter check
    POST /{repo}.git/info/lfs/objects/batch               LFS batch: where to PUT each object
    PUT  /lfs/{oid}                                       the LFS object itself (basic transfer)
    POST /lfs/verify                                      LFS verify
    POST /api/models/{repo}/commit/{rev}                  ndjson commit
    HEAD/GET /{repo}/resolve/{rev}/{path}                 file download (ETag, X-Repo-Commit,
                                                          Content-Length, Range)

Errors carry the hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound,
GatedRepo), which huggingface_hub turns into its typed exceptions.

Faults, armed by a test: `fail_commit` (HTTP 500 on the next N commits), `drop_lfs_put`
(close the connection halfway through the next N LFS uploads), `drop_download` (path -> N:
announce the file, send half of it, or nothing on a resumed request, then close), `down`
(every request answers 503), `wrong_listing_sha256` (paths-info lists another sha256 for LFS
files).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

DATASETS = "datasets/"  # dataset repos are kept as repos named datasets/<org>/<name> (push_dataset)
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin", ".model", ".pt")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, data_size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or data_size >= 10 * 1024 * 1024


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha
    history: list[str] = field(default_factory=list)

    def resolve(self, revision: str) -> str | None:
        if revision in self.refs:
            return self.refs[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """State of the fake hub plus the server thread. `url` is the HF_ENDPOINT to use."""

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {})  # token -> user name
        self.gate_access: set[str] = set()  # users granted access to gated repos
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[dict] = []  # method, path, range, auth (True/False), status
        self.faults = {"fail_commit": 0, "drop_lfs_put": 0, "drop_download": {}}
        self.lock = threading.RLock()
        self._commit_counter = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- state helpers used by tests --------------------------------------------------------
    def new_commit_sha(self, seed: str) -> str:
        with self.lock:
            self._commit_counter += 1
            return hashlib.sha1(f"{seed}:{self._commit_counter}".encode()).hexdigest()

    def add_repo(self, repo_id: str, *, private: bool = False, gated: bool = False) -> Repo:
        with self.lock:
            repo = self.repos.setdefault(repo_id, Repo(repo_id, private=private, gated=gated))
            return repo

    def push(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", replace: bool = True) -> str:
        """A commit on `branch` holding `files` (replacing the tree, or on top of it)."""
        with self.lock:
            repo = self.add_repo(repo_id)
            parent = repo.commits.get(repo.refs.get(branch, ""), {})
            tree = dict(files) if replace else {**parent, **files}
            sha = self.new_commit_sha(repo_id)
            repo.commits[sha] = tree
            repo.refs[branch] = sha
            repo.history.append(sha)
            for path, data in tree.items():
                if is_lfs(path, len(data)):
                    self.lfs_objects[hashlib.sha256(data).hexdigest()] = data
            return sha

    def push_folder(self, repo_id: str, folder: Path, *, extra: dict[str, bytes] | None = None, **kw) -> str:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        files.update(extra or {})
        return self.push(repo_id, files, **kw)

    def push_dataset(self, repo_id: str, files: dict[str, bytes], **kw) -> str:
        """A commit of a dataset repo (the /api/datasets/ and /datasets/.../resolve/ routes)."""
        return self.push(DATASETS + repo_id, files, **kw)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(revision)]

    def user_of(self, auth_header: str | None) -> str | None:
        if not auth_header or not auth_header.lower().startswith("bearer "):
            return None
        return self.tokens.get(auth_header.split(" ", 1)[1].strip())


def _entry(path: str, data: bytes) -> dict:
    entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
    if is_lfs(path, len(data)):
        sha = hashlib.sha256(data).hexdigest()
        entry["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
        entry["oid"] = git_blob_sha1(f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode())
    return entry


def _handler_for(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: tests read hub.requests instead
            pass

        # -- plumbing ----------------------------------------------------------------------
        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _send(self, status: int, payload=None, *, headers: dict | None = None, body: bytes | None = None):
            if body is None:
                body = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            if payload is not None:
                self.send_header("Content-Type", "application/json")
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
            self._record(status)

        def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
            h = dict(headers or {})
            if code:
                h["X-Error-Code"] = code
            h["X-Error-Message"] = message
            self._send(status, {"error": message}, headers=h)

        def _record(self, status):
            with hub.lock:
                hub.requests.append({
                    "method": self.command, "path": urlsplit(self.path).path, "status": status,
                    "range": self.headers.get("Range"), "auth": bool(self.headers.get("Authorization")),
                })

        def _drop(self):
            """Close the connection without a response (a network failure)."""
            self._record("dropped")
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _user(self):
            return hub.user_of(self.headers.get("Authorization"))

        def _repo(self, repo_id: str, *, write: bool = False):
            """The repo, or None after sending the hub's error (private and gated rules)."""
            repo = hub.repos.get(repo_id)
            user = self._user()
            if repo is None or (repo.private and user is None):
                self._error(401 if user is None else 404, "RepoNotFound", "Repository not found")
                return None
            if write and user is None:
                self._error(401, None, "Invalid credentials in Authorization header")
                return None
            return repo

        # -- routes ------------------------------------------------------------------------
        def do_HEAD(self):
            self._route()

        def do_GET(self):
            self._route()

        def do_POST(self):
            self._route()

        def do_PUT(self):
            self._route()

        def _route(self):
            parts = urlsplit(self.path)
            path, query = unquote(parts.path), parse_qs(parts.query)
            m = self.command, path
            try:
                if hub.faults.get("down"):
                    return self._error(503, None, "fake hub: down for maintenance")
                if m == ("GET", "/api/whoami-v2"):
                    return self._whoami()
                if m == ("POST", "/api/repos/create"):
                    return self._create_repo()
                if m == ("POST", "/api/validate-yaml"):
                    return self._validate_yaml()
                if self.command == "PUT" and path.startswith("/lfs/"):
                    return self._lfs_put(path[len("/lfs/"):])
                if m == ("POST", "/lfs/verify"):
                    return self._lfs_verify()
                if (g := re.fullmatch(r"/(.+?/.+?)\.git/info/lfs/objects/batch", path)) and self.command == "POST":
                    return self._lfs_batch(g[1])
                if g := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                    return self._model_info(DATASETS + g[1], g[2] or "main")
                if g := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                    return self._tree(DATASETS + g[1], g[2], g[3] or "", query)
                if g := re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/paths-info/([^/]+)", path):
                    return self._paths_info(DATASETS + g[1], g[2])
                if (g := re.fullmatch(r"/datasets/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)) and self.command in ("GET", "HEAD"):
                    return self._resolve(DATASETS + g[1], g[2], g[3])
                if g := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                    return self._model_info(g[1], g[2] or "main")
                if g := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                    return self._tree(g[1], g[2], g[3] or "", query)
                if g := re.fullmatch(r"/api/models/([^/]+/[^/]+)/paths-info/([^/]+)", path):
                    return self._paths_info(g[1], g[2])
                if g := re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/]+)", path):
                    return self._preupload(g[1], g[2])
                if g := re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/]+)", path):
                    return self._commit(g[1], g[2])
                if (g := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)) and self.command in ("GET", "HEAD"):
                    return self._resolve(g[1], g[2], g[3])
                self._error(404, None, f"fake hub: no route for {self.command} {path}")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _whoami(self):
            user = self._user()
            if user is None:
                return self._error(401, None, "Invalid credentials in Authorization header")
            self._send(200, {"type": "user", "id": user, "name": user, "fullname": user, "orgs": [],
                             "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

        def _create_repo(self):
            payload = json.loads(self._body() or b"{}")
            user = self._user()
            if user is None:
                return self._error(401, None, "Invalid credentials in Authorization header")
            namespace = payload.get("organization") or user
            repo_id = f"{namespace}/{payload['name']}"
            with hub.lock:
                if repo_id in hub.repos:  # the hub's 409 carries the url; huggingface_hub reads it
                    return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                                      headers={"X-Error-Message": "You already created this model repo"})
                repo = hub.add_repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
                repo.refs["main"] = sha = hub.new_commit_sha(repo_id)
                repo.commits[sha] = {".gitattributes": b"*.gguf filter=lfs diff=lfs merge=lfs -text\n"}
                repo.history.append(sha)
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _validate_yaml(self):
            import yaml

            content = json.loads(self._body() or b"{}").get("content", "")
            m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                meta = yaml.safe_load(m[1]) if m else None
            except yaml.YAMLError as e:
                return self._send(400, {"errors": [{"message": f"YAML: {e}"}], "warnings": []})
            warnings = [] if meta else [{"message": "empty or missing yaml metadata in repo card"}]
            self._send(200, {"errors": [], "warnings": warnings})

        def _model_info(self, repo_id, revision):
            repo = self._repo(repo_id)
            if repo is None:
                return
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            files = repo.commits[sha]
            self._send(200, {
                "_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private,
                "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": [], "siblings": [{"rfilename": p} for p in sorted(files)],
            })

        def _listing(self, repo, revision, paths=None):
            sha = repo.resolve(revision)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None, None
            files = repo.commits[sha]
            wanted = sorted(files) if paths is None else [p for p in paths if p in files]
            return sha, [_entry(p, files[p]) for p in wanted]

        def _tree(self, repo_id, revision, prefix, query):
            repo = self._repo(repo_id)
            if repo is None:
                return
            sha, entries = self._listing(repo, revision)
            if entries is None:
                return
            prefix = prefix.strip("/")
            if prefix:
                entries = [e for e in entries if e["path"].startswith(prefix + "/")]
            recursive = (query.get("recursive") or ["False"])[0].lower() == "true"
            if not recursive:  # first level only: files, plus folders as entries
                depth = prefix.count("/") + 1 if prefix else 0
                files = [e for e in entries if e["path"].count("/") == depth]
                folders = sorted({"/".join(e["path"].split("/")[: depth + 1]) for e in entries if e["path"].count("/") > depth})
                entries = files + [{"type": "directory", "path": f, "oid": "0" * 40, "size": 0} for f in folders]
            self._send(200, entries, headers={"X-Repo-Commit": sha})

        def _paths_info(self, repo_id, revision):
            repo = self._repo(repo_id)
            if repo is None:
                return
            form = parse_qs(self._body().decode())
            sha, entries = self._listing(repo, unquote(revision), form.get("paths", []))
            if entries is not None and hub.faults.get("wrong_listing_sha256"):
                for e in entries:  # a hub whose copy is not what was sent
                    if "lfs" in e:
                        e["lfs"]["oid"] = hashlib.sha256(b"something else").hexdigest()
            if entries is not None:
                self._send(200, entries, headers={"X-Repo-Commit": sha})

        def _preupload(self, repo_id, revision):
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            payload = json.loads(self._body())
            current = repo.commits.get(repo.resolve(unquote(revision)) or "", {})
            out = []
            for f in payload["files"]:
                mode = "lfs" if is_lfs(f["path"], f["size"]) else "regular"
                oid = None
                if f["path"] in current:
                    data = current[f["path"]]
                    oid = hashlib.sha256(data).hexdigest() if mode == "lfs" else git_blob_sha1(data)
                out.append({"path": f["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
            self._send(200, {"files": out, "commitOid": repo.resolve(unquote(revision))})

        def _lfs_batch(self, repo_id):
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            payload = json.loads(self._body())
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in hub.lfs_objects:  # already stored: no actions, the client skips it
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs/{obj['oid']}"},
                        "verify": {"href": f"{hub.url}/lfs/verify"},
                    }
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def _lfs_put(self, oid):
            n = int(self.headers.get("Content-Length") or 0)
            with hub.lock:
                drop = hub.faults["drop_lfs_put"] > 0
                if drop:
                    hub.faults["drop_lfs_put"] -= 1
            if drop:  # read about half of the body, then the "network" fails
                self.rfile.read(max(1, n // 2))
                return self._drop()
            data = self.rfile.read(n)
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, "sha256 of the uploaded object does not match its oid")
            with hub.lock:
                hub.lfs_objects[oid] = data
            self._send(200, headers={"ETag": f'"{hashlib.md5(data).hexdigest()}"'})

        def _lfs_verify(self):
            payload = json.loads(self._body())
            data = hub.lfs_objects.get(payload["oid"])
            if data is None or len(data) != payload["size"]:
                return self._error(404, None, "LFS object not found")
            self._send(200, {})

        def _commit(self, repo_id, revision):
            repo = self._repo(repo_id, write=True)
            if repo is None:
                return
            body = self._body()
            with hub.lock:
                fail = hub.faults["fail_commit"] > 0
                if fail:
                    hub.faults["fail_commit"] -= 1
            if fail:
                return self._error(500, None, "Internal Error - We're working hard to fix this as soon as possible!")
            branch = unquote(revision)
            with hub.lock:
                tree = dict(repo.commits.get(repo.refs.get(branch, ""), {}))
                summary = ""
                for line in body.splitlines():
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "header":
                        summary = value.get("summary", "")
                    elif key == "file":
                        tree[value["path"]] = base64.b64decode(value["content"])
                    elif key == "lfsFile":
                        data = hub.lfs_objects.get(value["oid"])
                        if data is None:
                            return self._error(422, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                        tree[value["path"]] = data
                    elif key in ("deletedFile", "deletedFolder"):
                        for p in [p for p in tree if p == value["path"] or p.startswith(value["path"].rstrip("/") + "/")]:
                            del tree[p]
                sha = hub.new_commit_sha(repo_id + summary)
                repo.commits[sha] = tree
                repo.refs[branch] = sha
                repo.history.append(sha)
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "success": True, "pullRequestUrl": None})

        def _resolve(self, repo_id, revision, path):
            repo = self._repo(repo_id)
            if repo is None:
                return
            sha = repo.resolve(revision)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            if repo.gated and self._user() not in hub.gate_access:
                return self._error(401 if self._user() is None else 403, "GatedRepo",
                                   "Access to model is restricted. You must have access to it and be authenticated to access it.")
            files = repo.commits[sha]
            if path not in files:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}",
                                   headers={"X-Repo-Commit": sha})
            data = files[path]
            entry = _entry(path, data)
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
            start = 0
            rng = self.headers.get("Range")
            if rng and self.command == "GET":
                start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
            with hub.lock:
                drops = hub.faults["drop_download"].get(path, 0)
                drop = self.command == "GET" and drops > 0
                if drop:
                    hub.faults["drop_download"][path] = drops - 1
            if drop:  # the full length is announced, then the connection dies: after half of the
                # body on a first request, at once on a resume (Range), so the client's retries run out
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if not rng else b"")
                self.wfile.flush()
                return self._drop()
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                return self._send(206, headers=headers, body=data[start:])
            self._send(200, headers=headers, body=data)

    return Handler
