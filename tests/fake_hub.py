"""A local stand-in for the Hugging Face Hub: the HTTP routes huggingface_hub's downloads use, on 127.0.0.1.

Routes (as huggingface_hub 2.x calls them):
- GET  /api/models/{repo}[/revision/{rev}]          model info: id, sha, siblings
- GET  /api/models/{repo}/tree/{rev}[?recursive=]   file listing: type, path, size, oid
- HEAD /{repo}/resolve/{rev}/{path}                  X-Repo-Commit, ETag, X-Linked-Etag, Content-Length
- GET  /{repo}/resolve/{rev}/{path}                  the bytes (Range: bytes=N- honoured)
Errors carry the hub's X-Error-Code header (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), which
huggingface_hub turns into its typed exceptions. Every request is recorded in `requests`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/(?P<kind>revision|tree)/(?P<rev>[^/]+)(?:/.*)?)?$"
)
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+(?:/[^/]+)?)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    sha: str
    branches: dict[str, str]  # branch or tag -> commit sha
    gated: bool = False


@dataclass
class FakeHub:
    """An in-memory hub served over HTTP; use as a context manager, pass `url` as the endpoint."""

    token: str = "hf_fake_token"
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    _connections: set[socket.socket] = field(default_factory=set)

    def add_repo(
        self, repo_id: str, files: dict[str, bytes], branch: str = "main", gated: bool = False
    ) -> str:
        """Publishes `files` as the single commit of `repo_id` on `branch`; returns the commit sha."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + b"\0" + hashlib.sha1(files[name]).digest())
        sha = digest.hexdigest()
        self.repos[repo_id] = FakeRepo(files=dict(files), sha=sha, branches={branch: sha}, gated=gated)
        return sha

    def add_directory(self, repo_id: str, directory: Path, **kwargs: object) -> str:
        """Publishes every file under `directory` (relative paths as repo paths)."""
        files = {
            p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()
        }
        return self.add_repo(repo_id, files, **kwargs)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        assert self._server is not None, "the fake hub is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def downloaded(self) -> set[str]:
        """Repo paths whose bytes were fetched (GET on a resolve URL)."""
        return {
            match["path"]
            for method, path in self.requests
            if method == "GET" and (match := _RESOLVE.match(path)) is not None
        }

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving, and closes kept-alive connections so that clients see the hub gone."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for connection in list(self._connections):
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- lookups used by the handler --

    def commit(self, repo: FakeRepo, revision: str) -> str | None:
        if revision == repo.sha:
            return revision
        return repo.branches.get(revision)

    def authorized(self, repo: FakeRepo, authorization: str | None) -> bool:
        return not repo.gated or authorization == f"Bearer {self.token}"


def _etag(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        return

    def setup(self) -> None:
        super().setup()
        self.fake._connections.add(self.connection)

    def finish(self) -> None:
        self.fake._connections.discard(self.connection)
        super().finish()

    def do_HEAD(self) -> None:
        self._route(send_body=False)

    def do_GET(self) -> None:
        self._route(send_body=True)

    def _route(self, send_body: bool) -> None:
        raw_path = urlsplit(self.path).path
        self.fake.requests.append((self.command, unquote(raw_path)))
        if (match := _API.match(raw_path)) is not None:
            self._api(unquote(match["repo"]), match["kind"], unquote(match["rev"] or "main"), send_body)
        elif (match := _RESOLVE.match(raw_path)) is not None:
            self._resolve(unquote(match["repo"]), unquote(match["rev"]), unquote(match["path"]), send_body)
        else:
            self._error(404, "NotFound", "no such route", send_body)

    def _api(self, repo_id: str, kind: str | None, revision: str, send_body: bool) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", send_body)
            return
        sha = self.fake.commit(repo, revision)
        if sha is None:
            self._error(404, "RevisionNotFound", "Invalid rev id", send_body)
            return
        if kind == "tree":
            body: object = _tree(repo.files)
        else:
            body = {
                "id": repo_id,
                "modelId": repo_id,
                "sha": sha,
                "private": False,
                "gated": "auto" if repo.gated else False,
                "siblings": [{"rfilename": name} for name in sorted(repo.files)],
            }
        self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, send_body)

    def _resolve(self, repo_id: str, revision: str, path: str, send_body: bool) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", send_body)
            return
        if not self.fake.authorized(repo, self.headers.get("authorization")):
            self._error(401, "GatedRepo", "Access to model is restricted", send_body)
            return
        sha = self.fake.commit(repo, revision)
        if sha is None:
            self._error(404, "RevisionNotFound", "Invalid rev id", send_body)
            return
        content = repo.files.get(path)
        if content is None:
            self._error(404, "EntryNotFound", "Entry not found", send_body, {"X-Repo-Commit": sha})
            return
        etag = _etag(content)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "X-Linked-Etag": f'"{etag}"'}
        start = _range_start(self.headers.get("Range"))
        if start:
            headers["Content-Range"] = f"bytes {start}-{len(content) - 1}/{len(content)}"
            self._send(206, content[start:], headers, send_body)
        else:
            self._send(200, content, headers, send_body)

    def _error(
        self, status: int, code: str, message: str, send_body: bool, extra: dict[str, str] | None = None
    ) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        self._send(status, json.dumps({"error": message}).encode(), {**headers, **(extra or {})}, send_body)

    def _send(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body:
            self.wfile.write(body)


def _tree(files: dict[str, bytes]) -> list[dict[str, object]]:
    """The recursive tree listing: folders, then files with size and blob id."""
    folders = sorted({"/".join(name.split("/")[:i]) for name in files for i in range(1, name.count("/") + 1)})
    entries: list[dict[str, object]] = [
        {"type": "directory", "path": folder, "oid": hashlib.sha1(folder.encode()).hexdigest()}
        for folder in folders
    ]
    entries += [
        {"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
        for name, content in sorted(files.items())
    ]
    return entries


def _range_start(header: str | None) -> int:
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match[1]) if match else 0
