"""A loopback stand-in for the model hubs: the real client libraries talk to it over HTTP.

It speaks the parts of the Hugging Face Hub protocol that ``huggingface_hub`` uses to
download (repository info, the file tree, HEAD and ranged GET of ``/resolve/`` URLs with
``X-Repo-Commit``, ``ETag``/``X-Linked-Etag``, ``X-Linked-Size``), and the parts of
ModelScope's (``/api/v1/models/{id}/revisions``, ``/repo/files``, ``/repo?FilePath=``)
that the ``modelscope`` client uses. Point the clients at it with ``HF_ENDPOINT`` and
``MODELSCOPE_ENDPOINT``.

Faults to test against: a repository answering every file request with a status (401,
403: gated), files whose metadata claim a size never served (a disk too small), a
connection dropped once mid-file, and slow files. Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

HUGGINGFACE = "huggingface"
MODELSCOPE = "modelscope"
CHUNK = 64 * 1024
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


@dataclass
class Seen:
    """One request the stand-in answered."""

    method: str
    path: str
    range: str | None


@dataclass
class StandInRepo:
    hub: str
    repo_id: str
    files: dict[str, bytes]
    claimed_sizes: dict[str, int] = field(default_factory=dict)  # metadata only: never served
    file_status: int | None = None  # answer every file request with this (401, 403: gated)
    drop_after: dict[str, int] = field(default_factory=dict)  # path -> bytes sent before dropping, once
    delay_per_chunk_s: dict[str, float] = field(default_factory=dict)  # path -> pause per 64 KiB

    @property
    def sha(self) -> str:
        return hashlib.sha1(f"{self.hub}/{self.repo_id}".encode()).hexdigest()

    def size(self, path: str) -> int:
        return self.claimed_sizes.get(path, len(self.files[path]))

    def etag(self, path: str) -> str:
        data = self.files[path]
        if path.endswith(LFS_SUFFIXES):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    """A threading HTTP server on 127.0.0.1, port 0, serving the repositories added to it."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], StandInRepo] = {}
        self.requests: list[Seen] = []
        self.sent_bytes = 0  # file bytes sent, all requests together
        self.open_transfers = 0  # file bodies being sent now
        self._lock = threading.Lock()
        self._transfer_ended = threading.Condition(self._lock)
        stand_in = self

        class Handler(_Handler):
            hub = stand_in

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-stand-in", daemon=True)
        self._thread.start()

    def add(self, hub: str, repo_id: str, files: dict[str, bytes], **faults) -> StandInRepo:
        repo = StandInRepo(hub, repo_id, dict(files), **faults)
        self.repos[(hub, repo_id)] = repo
        return repo

    def add_folder(self, hub: str, repo_id: str, folder: Path, **faults) -> StandInRepo:
        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        return self.add(hub, repo_id, files, **faults)

    def seen(self, method: str | None = None, contains: str = "") -> list[Seen]:
        """Requests for models (not huggingface_hub's agent look-up), filtered."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method)
                and contains in r.path
                and not r.path.startswith("/api/agent-harnesses")
            ]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self.sent_bytes = 0

    def count_sent(self, size: int) -> None:
        with self._lock:
            self.sent_bytes += size

    def transfer(self, change: int) -> None:
        with self._transfer_ended:
            self.open_transfers += change
            self._transfer_ended.notify_all()

    def wait_no_transfer(self, timeout: float) -> bool:
        """Whether every file body being sent has ended (sent whole, or cut by a client that went
        away: nothing more is counted for it) within timeout seconds."""
        with self._transfer_ended:
            return self._transfer_ended.wait_for(lambda: self.open_transfers == 0, timeout)

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> HubStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def closed_port_url() -> str:
    """The URL of a loopback port nothing listens on: a hub that cannot be reached."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: HubStandIn

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):  # the client went away (killed, or gave up)
            self.close_connection = True

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def do_GET(self) -> None:
        self._answer(body=True)

    # Routing.

    def _answer(self, body: bool) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.hub.record(Seen(self.command, self.path, self.headers.get("Range")))
        if path == "/api/agent-harnesses":  # huggingface_hub's daily look-up: an empty registry
            self._json({"standardEnvVars": [], "harnesses": {}}, body=body)
        elif path.startswith("/api/v1/models/"):
            self._modelscope(path.removeprefix("/api/v1/models/"), query, body)
        elif path.startswith("/api/models/"):
            self._huggingface_api(path.removeprefix("/api/models/"))
        elif "/resolve/" in path:
            repo_id, _, rest = path.lstrip("/").partition("/resolve/")
            _, _, file_path = rest.partition("/")
            self._huggingface_file(repo_id, file_path, body)
        else:
            self._json({"error": "not found"}, 404)

    def _repo(self, hub: str, repo_id: str) -> StandInRepo | None:
        return self.hub.repos.get((hub, repo_id))

    # Hugging Face.

    def _huggingface_api(self, rest: str) -> None:
        parts = rest.split("/")
        repo = self._repo(HUGGINGFACE, "/".join(parts[:2]))
        if repo is None:
            self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            return
        action = parts[2] if len(parts) > 2 else "revision"
        if action == "revision":
            siblings = [{"rfilename": name} for name in repo.files]
            self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.sha, "siblings": siblings})
        elif action == "tree":
            tree = []
            for name in repo.files:
                entry = {"type": "file", "path": name, "size": repo.size(name), "oid": repo.etag(name)}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"oid": repo.etag(name), "size": repo.size(name), "pointerSize": 134}
                tree.append(entry)
            self._json(tree)
        else:
            self._json({"error": "not found"}, 404)

    def _huggingface_file(self, repo_id: str, file_path: str, body: bool) -> None:
        repo = self._repo(HUGGINGFACE, repo_id)
        if repo is None:
            self._json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"}, body)
            return
        headers = {"X-Repo-Commit": repo.sha}
        if repo.file_status is not None:
            gated = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted."}
            self._json({"error": "gated"}, repo.file_status, {**headers, **gated}, body)
            return
        if file_path not in repo.files:
            self._json({"error": "Entry not found"}, 404, {**headers, "X-Error-Code": "EntryNotFound"}, body)
            return
        etag = f'"{repo.etag(file_path)}"'
        headers.update({"ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(repo.size(file_path))})
        self._file(repo, file_path, headers, body)

    # ModelScope.

    def _modelscope(self, rest: str, query: dict[str, str], body: bool) -> None:
        parts = rest.split("/")
        repo = self._repo(MODELSCOPE, "/".join(parts[:2]))
        action = "/".join(parts[2:])
        if repo is None:
            self._json({"Code": 10010205001, "Message": "model not found", "Success": False}, 404, body=body)
            return
        if action == "":
            self._ms_ok(
                {"Id": 1, "Name": repo.repo_id.split("/")[1], "Path": repo.repo_id.split("/")[0]}, body
            )
        elif action == "revisions":
            self._ms_ok({"RevisionMap": {"Branches": [{"Revision": "master"}], "Tags": []}}, body)
        elif action == "repo/files":
            files = [
                {
                    "Name": name.rsplit("/", 1)[-1],
                    "Path": name,
                    "Type": "blob",
                    "Size": repo.size(name),
                    "Sha256": hashlib.sha256(data).hexdigest(),
                    "Revision": repo.sha,
                }
                for name, data in repo.files.items()
            ]
            self._ms_ok({"Files": files}, body)
        elif action == "repo":
            file_path = query.get("FilePath", "")
            if repo.file_status is not None:
                self._json({"Code": repo.file_status, "Message": "forbidden"}, repo.file_status, body=body)
            elif file_path not in repo.files:
                self._json({"Code": 404, "Message": "file not found"}, 404, body=body)
            else:
                self._file(repo, file_path, {"ETag": f'"{repo.etag(file_path)}"'}, body)
        else:
            self._json({"Code": 404, "Message": "not found"}, 404, body=body)

    def _ms_ok(self, data: dict, body: bool) -> None:
        self._json({"Code": 200, "Data": data, "Message": "success", "Success": True}, body=body)

    # Responses.

    def _json(self, payload, status: int = 200, headers: dict | None = None, body: bool = True) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if body:
            self.wfile.write(data)

    def _file(self, repo: StandInRepo, file_path: str, headers: dict, body: bool) -> None:
        data = repo.files[file_path]
        start = 0
        wanted = self.headers.get("Range")
        if wanted and wanted.startswith("bytes="):
            start = int(wanted.removeprefix("bytes=").split("-")[0] or 0)
        self.send_response(206 if start else 200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not body:
            return
        self.hub.transfer(+1)
        try:
            self._send_body(repo, file_path, data, start)
        finally:
            self.hub.transfer(-1)

    def _send_body(self, repo: StandInRepo, file_path: str, data: bytes, start: int) -> None:
        drop_at = repo.drop_after.pop(file_path, None)
        delay = repo.delay_per_chunk_s.get(file_path, 0.0)
        for offset in range(start, len(data), CHUNK):
            piece = data[offset : offset + CHUNK]
            if drop_at is not None and offset + len(piece) - start > drop_at:
                self.wfile.write(piece[: max(drop_at - (offset - start), 0)])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)  # the connection drops mid-file
                self.close_connection = True
                return
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
                return
            self.hub.count_sent(len(piece))
            if delay:
                time.sleep(delay)
