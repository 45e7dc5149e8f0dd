"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for tests.

It speaks the part of the API that `huggingface_hub`'s own client (2.x) uses to publish and
fetch a model: `create_repo`, `create_branch`, `list_repo_refs`, `list_repo_files` /
`list_repo_tree`, `model_info` / `repo_info` (with a revision), `upload_folder` /
`create_commit` (the preupload call, then an NDJSON commit with files inline as base64, or, with
`lfs_threshold` set and Xet disabled in the client, the LFS batch API's "basic" transfer) and
file downloads (`hf_hub_download`, `snapshot_download`: `HEAD`/`GET /{repo}/resolve/{rev}/{path}`
with the `ETag` and `X-Repo-Commit` headers the client requires). Errors carry the
`X-Error-Code` headers the client turns into its typed exceptions.

File contents live in a folder (one file per sha256); repositories, branches and commits in
memory. Every request is recorded (method and path, never headers) in `requests`.

    with HubServer(tmp_path / "hub", token="hf_test") as hub:
        env = hub.environment(tmp_path / "hf_home")   # HF_ENDPOINT, HF_TOKEN, HF_HOME, online
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_oid(content: bytes) -> str:
    """The git object id of a file's content (what the Hub reports for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def card_metadata_errors(readme: str) -> list[str]:
    """What is wrong with a model card's YAML front matter (nothing when there is none)."""
    import yaml

    if not readme.startswith("---\n"):
        return []
    try:
        meta = yaml.safe_load(readme.split("---\n")[1])
    except yaml.YAMLError as error:
        return [f"front matter is not YAML: {error}"]
    if not isinstance(meta, dict):
        return ["front matter is not a mapping"]
    errors = [
        f"{key} must be a list of strings"
        for key in ("tags", "datasets")
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(v, str) for v in meta[key]))
    ]
    bases = meta.get("base_model", [])
    for base in bases if isinstance(bases, list) else [bases]:
        if not isinstance(base, str) or base.count("/") != 1:
            errors.append(f"base_model {base!r} is not a repository id")
    if "license" in meta and not isinstance(meta["license"], str):
        errors.append("license must be a string")
    return errors


@dataclass(frozen=True)
class StoredFile:
    """A file of a commit: its content's sha256 (the storage key), size, and whether it is an
    LFS file (then its git object is the pointer)."""

    sha256: str
    size: int
    git_oid: str
    lfs: bool

    @property
    def oid(self) -> str:
        """What preupload reports as the remote oid, and the download ETag: sha256 for LFS
        files, the git blob id otherwise (as the real Hub)."""
        return self.sha256 if self.lfs else self.git_oid

    def tree_entry(self, path: str) -> dict:
        entry = {"type": "file", "path": path, "size": self.size, "oid": self.git_oid}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(lfs_pointer(self.sha256, self.size))}
        return entry


@dataclass
class Repo:
    kind: str
    repo_id: str
    private: bool
    branches: dict = field(default_factory=dict)  # name -> commit id
    commits: dict = field(default_factory=dict)  # commit id -> {path: StoredFile}

    def resolve(self, revision: str) -> str | None:
        """A branch name or a commit id -> the commit id, or None."""
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubError(Exception):
    """An error response: HTTP status, the client's X-Error-Code, and a message."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict | None = None, body: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers, self.body = headers or {}, body or {}


class HubState:
    """Repositories, branches and commits; contents stored in `root` by sha256. Thread-safe."""

    def __init__(self, root: Path, lfs_threshold: int | None):
        self.root, self.lfs_threshold = Path(root), lfs_threshold
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()

    # contents
    def put_content(self, content: bytes) -> str:
        digest = hashlib.sha256(content).hexdigest()
        path = self.root / "objects" / digest
        if not path.exists():
            partial = path.with_name(f"{digest}.{threading.get_ident()}.partial")
            partial.write_bytes(content)
            partial.replace(path)  # a concurrent reader sees the whole object or none
        return digest

    def content(self, sha256: str) -> bytes:
        return (self.root / "objects" / sha256).read_bytes()

    def has_content(self, sha256: str) -> bool:
        return (self.root / "objects" / sha256).exists()

    # repositories
    def repo(self, kind: str, repo_id: str) -> Repo:
        repo = self.repos.get((kind, repo_id))
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository {repo_id} not found")
        return repo

    def create_repo(self, kind: str, repo_id: str, private: bool) -> bool:
        """Create with one commit holding `.gitattributes` (as the Hub does); False if it exists."""
        with self.lock:
            if (kind, repo_id) in self.repos:
                return False
            repo = Repo(kind, repo_id, private)
            sha = self.put_content(GITATTRIBUTES)
            files = {".gitattributes": StoredFile(sha, len(GITATTRIBUTES), git_blob_oid(GITATTRIBUTES), False)}
            repo.branches["main"] = self._new_commit(repo, files, "initial commit", None)
            self.repos[(kind, repo_id)] = repo
            return True

    def _new_commit(self, repo: Repo, files: dict, message: str, parent: str | None) -> str:
        listing = json.dumps(sorted((p, f.git_oid) for p, f in files.items()))
        commit_id = hashlib.sha1(f"{parent}\n{message}\n{time.time_ns()}\n{listing}".encode()).hexdigest()
        repo.commits[commit_id] = dict(files)
        return commit_id

    def files(self, repo: Repo, revision: str) -> tuple[str, dict]:
        commit_id = repo.resolve(revision)
        if commit_id is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit_id, repo.commits[commit_id]

    def create_branch(self, repo: Repo, branch: str, start: str | None) -> None:
        with self.lock:
            if branch in repo.branches:
                raise HubError(409, None, f"Reference refs/heads/{branch} already exists")
            commit_id, _ = self.files(repo, start or "main")
            repo.branches[branch] = commit_id

    def stored_file(self, content: bytes, lfs: bool) -> StoredFile:
        sha = self.put_content(content)
        git_oid = git_blob_oid(lfs_pointer(sha, len(content)) if lfs else content)
        return StoredFile(sha, len(content), git_oid, lfs)

    def commit(self, repo: Repo, revision: str, lines: list[dict]) -> str:
        """Apply an NDJSON commit payload (header, file, lfsFile, deletedFile, deletedFolder)."""
        with self.lock:
            if revision not in repo.branches:
                raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision} (commits go to a branch)")
            head = repo.branches[revision]
            header = next((line["value"] for line in lines if line["key"] == "header"), {})
            if header.get("parentCommit") and not head.startswith(header["parentCommit"]):
                raise HubError(412, None, f"parentCommit {header['parentCommit']} is not the head of {revision}")
            files = dict(repo.commits[head])
            for line in lines:
                self._apply(files, line["key"], line["value"])
            repo.branches[revision] = self._new_commit(repo, files, header.get("summary", ""), head)
            return repo.branches[revision]

    def _apply(self, files: dict, key: str, value: dict) -> None:
        if key == "file":
            files[value["path"]] = self.stored_file(base64.b64decode(value["content"]), lfs=False)
        elif key == "lfsFile":
            if not self.has_content(value["oid"]):
                raise HubError(422, None, f"LFS object {value['oid']} of {value['path']} was never uploaded")
            files[value["path"]] = StoredFile(
                value["oid"], len(self.content(value["oid"])), git_blob_oid(lfs_pointer(value["oid"], value["size"])), True
            )
        elif key == "deletedFile":
            files.pop(value["path"], None)
        elif key == "deletedFolder":
            prefix = value["path"].rstrip("/") + "/"
            for path in [p for p in files if p.startswith(prefix)]:
                del files[path]
        elif key != "header":
            raise HubError(400, None, f"unknown commit operation {key!r}")


class _Handler(BaseHTTPRequestHandler):
    """Routes a request to the HubServer that owns this handler class."""

    hub: HubServer

    def log_message(self, format, *args) -> None:  # the test's output stays clean
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append((method, url.path))
        try:
            self.hub.route(self, method, url.path, parse_qs(url.query))
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            self.send_json({"error": error.message, **error.body}, error.status, headers, body=method != "HEAD")
        except Exception as error:  # a fixture bug: 400, not 5xx, so the client fails at once instead of retrying
            message = f"test Hub internal error: {type(error).__name__}: {error}"
            self.send_json({"error": message}, 400, {"X-Error-Message": message[:200]}, body=method != "HEAD")

    def read_body(self) -> bytes:
        """The request body, whether sent with a Content-Length or chunked."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send_json(self, payload, status: int = 200, headers: dict | None = None, body: bool = True) -> None:
        data = json.dumps(payload).encode()
        self.send_bytes(data, status, {"Content-Type": "application/json", **(headers or {})}, body)

    def send_bytes(self, data: bytes, status: int, headers: dict, body: bool = True) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


class HubServer:
    """The fake Hub, served from a thread on 127.0.0.1 at a free port.

    Args:
        root: folder for stored file contents (created).
        token: when set, writes and private repositories need `Authorization: Bearer <token>`;
            the token is kept in memory only.
        lfs_threshold: files of at least this many bytes are asked to go through LFS (the client
            then uses Xet if `hf_xet` is importable and HF_HUB_DISABLE_XET is not set, which this
            server does not speak); None: every file is committed inline.
    """

    def __init__(self, root, token: str | None = None, lfs_threshold: int | None = None):
        self.state = HubState(Path(root), lfs_threshold)
        self._token = token
        self.requests: list[tuple[str, str]] = []
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def environment(self, hf_home, token: str | None = None) -> dict[str, str]:
        """Environment variables that point huggingface_hub (in a new process) at this server:
        online, a private HF_HOME (cache), Xet off (this server speaks plain HTTP), the token."""
        env = {
            "HF_ENDPOINT": self.url,
            "HF_HOME": str(hf_home),
            "HF_HUB_OFFLINE": "0",
            "TRANSFORMERS_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        }
        if token is not None:
            env["HF_TOKEN"] = token
        return env

    def writes(self) -> list[tuple[str, str]]:
        """The requests that could change a repository (every POST and PUT)."""
        return [r for r in self.requests if r[0] in ("POST", "PUT")]

    def repo_files(self, repo_id: str, revision: str = "main", kind: str = "model") -> dict[str, bytes]:
        """The files of a repository revision, as the server holds them."""
        _, files = self.state.files(self.state.repo(kind, repo_id), revision)
        return {path: self.state.content(f.sha256) for path, f in files.items()}

    # routing
    def route(self, request: _Handler, method: str, path: str, query: dict) -> None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(request)
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml(request)
        if method == "GET" and parts == ["api", "whoami-v2"]:
            self._authorize(request, write=True)
            return request.send_json({"type": "user", "name": "celltron-test", "orgs": []})
        if parts[0] == "api" and len(parts) >= 4 and parts[1] in KINDS:
            return self._api(request, method, KINDS[parts[1]], f"{parts[2]}/{parts[3]}", parts[4:], query)
        if method == "PUT" and parts[0] == "lfs-upload":
            return self._lfs_upload(request, parts[1])
        return self._git_side(request, method, path)

    def _authorize(self, request: _Handler, write: bool, repo: Repo | None = None) -> None:
        if self._token is None or not (write or (repo is not None and repo.private)):
            return
        given = request.headers.get("Authorization", "")
        if given != f"Bearer {self._token}":
            # the client reads this exact message as "bad token" rather than "no such repository"
            raise HubError(401, None, "Invalid credentials in Authorization header")

    def _create_repo(self, request: _Handler) -> None:
        self._authorize(request, write=True)
        payload = json.loads(request.read_body())
        kind = payload.get("type") or "model"
        repo_id = (
            f"{payload['organization']}/{payload['name']}" if payload.get("organization") else f"celltron-test/{payload['name']}"
        )
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        url = f"{self.url}/{URL_PREFIX[kind]}{repo_id}"
        if not self.state.create_repo(kind, repo_id, private):
            # the client reads the url from the conflict's body too (create_repo with exist_ok)
            raise HubError(409, None, f"You already created this {kind} repo", body={"url": url})
        request.send_json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self, request: _Handler) -> None:
        """Check a README's front matter as the Hub does before a commit, for the fields
        celltron writes: a mapping; tags and datasets lists of strings; base_model repo ids."""
        content = json.loads(request.read_body())["content"]
        errors = card_metadata_errors(content)
        request.send_json({"errors": [{"message": e} for e in errors], "warnings": []}, 400 if errors else 200)

    def _api(self, request: _Handler, method: str, kind: str, repo_id: str, rest: list[str], query: dict) -> None:
        repo = self.state.repo(kind, repo_id)
        self._authorize(request, write=method != "GET", repo=repo)
        action = rest[0] if rest else "revision"
        revision = rest[1] if len(rest) > 1 else "main"
        if method == "GET" and action == "revision":
            return self._info(request, repo, revision)
        if method == "GET" and action == "tree":
            return self._tree(request, repo, revision, "/".join(rest[2:]), query)
        if method == "GET" and action == "refs":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in repo.branches.items()]
            return request.send_json({"branches": branches, "tags": [], "converts": []})
        if method == "POST" and action == "branch":
            start = (json.loads(request.read_body() or b"{}") or {}).get("startingPoint")
            self.state.create_branch(repo, revision, start)
            return request.send_json({})
        if method == "POST" and action == "preupload":
            return self._preupload(request, repo, revision)
        if method == "POST" and action == "commit":
            lines = [json.loads(line) for line in request.read_body().splitlines() if line.strip()]
            commit_id = self.state.commit(repo, revision, lines)
            return request.send_json(
                {
                    "commitUrl": f"{self.url}/{URL_PREFIX[kind]}{repo_id}/commit/{commit_id}",
                    "commitOid": commit_id,
                    "success": True,
                    "hookOutput": "",
                    "pullRequestUrl": None,
                }
            )
        raise HubError(404, None, f"{method} {'/'.join(rest)}: not implemented by the test Hub")

    def _info(self, request: _Handler, repo: Repo, revision: str) -> None:
        commit_id, files = self.state.files(repo, revision)
        siblings = [{"rfilename": p, "size": f.size, "blobId": f.git_oid} for p, f in sorted(files.items())]
        request.send_json(
            {
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "sha": commit_id,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "tags": [],
                "siblings": siblings,
                "lastModified": "2026-01-01T00:00:00.000Z",
            }
        )

    def _tree(self, request: _Handler, repo: Repo, revision: str, folder: str, query: dict) -> None:
        _, files = self.state.files(repo, revision)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path, stored in sorted(files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :].split("/")
            for depth in range(1, len(rest) if recursive else min(len(rest), 2)):
                folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                entries.append(stored.tree_entry(path))
        if folder and not entries and not folders:
            raise HubError(404, "EntryNotFound", f"{folder} does not exist on {revision}")
        entries += [{"type": "directory", "path": f, "oid": git_blob_oid(f.encode()), "size": 0} for f in sorted(folders)]
        request.send_json(entries)

    def _preupload(self, request: _Handler, repo: Repo, revision: str) -> None:
        _, existing = self.state.files(repo, revision)
        threshold = self.state.lfs_threshold
        answer = []
        for item in json.loads(request.read_body())["files"]:
            lfs = threshold is not None and item["size"] >= threshold
            remote = existing.get(item["path"])
            answer.append(
                {
                    "path": item["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": remote.oid if remote is not None and remote.lfs == lfs else None,
                }
            )
        request.send_json({"files": answer, "commitOid": self.state.files(repo, revision)[0]})

    def _git_side(self, request: _Handler, method: str, path: str) -> None:
        """Non-API URLs: /[datasets/]{repo}.git/info/lfs/objects/batch and .../resolve/{rev}/{file}."""
        raw = path.strip("/").split("/")
        kind = {"datasets": "dataset", "spaces": "space"}.get(raw[0], "model")
        raw = raw[1:] if kind != "model" else raw
        if method == "POST" and len(raw) >= 2 and raw[1].endswith(".git"):
            return self._lfs_batch(request, kind, f"{raw[0]}/{raw[1].removesuffix('.git')}")
        if method in ("GET", "HEAD") and len(raw) >= 5 and raw[2] == "resolve":
            file_path = unquote("/".join(raw[4:]))
            return self._resolve(request, method, kind, f"{unquote(raw[0])}/{unquote(raw[1])}", unquote(raw[3]), file_path)
        raise HubError(404, None, f"{method} {path}: not implemented by the test Hub")

    def _lfs_batch(self, request: _Handler, kind: str, repo_id: str) -> None:
        self._authorize(request, write=True, repo=self.state.repo(kind, repo_id))
        objects = []
        for item in json.loads(request.read_body())["objects"]:
            answer = {"oid": item["oid"], "size": item["size"]}
            if not self.state.has_content(item["oid"]):  # already stored: nothing to send
                answer["actions"] = {"upload": {"href": f"{self.url}/lfs-upload/{item['oid']}", "header": {}}}
            objects.append(answer)
        request.send_json({"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_upload(self, request: _Handler, oid: str) -> None:
        content = request.read_body()
        if hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, None, f"uploaded content does not match sha256 {oid}")
        self.state.put_content(content)
        request.send_bytes(b"", 200, {})

    def _resolve(self, request: _Handler, method: str, kind: str, repo_id: str, revision: str, file_path: str) -> None:
        repo = self.state.repo(kind, repo_id)
        self._authorize(request, write=False, repo=repo)
        commit_id, files = self.state.files(repo, revision)
        stored = files.get(file_path)
        if stored is None:
            # the commit header lets the client cache the file's absence for that commit
            raise HubError(404, "EntryNotFound", f"{file_path} does not exist on {revision}", {"X-Repo-Commit": commit_id})
        data = self.state.content(stored.sha256)
        headers = {
            "X-Repo-Commit": commit_id,
            "ETag": f'"{stored.oid}"',
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
        }
        request.send_bytes(data, 200, headers, body=method == "GET")
