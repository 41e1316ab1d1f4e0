"""A local stand-in for the HuggingFace Hub, enough for huggingface_hub's model_info and
snapshot_download: repos with refs and commits, gated repos that need a token, and scripted
failures (a status to answer the next N API calls with). Serves on 127.0.0.1 only."""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

LFS_SUFFIXES = (".safetensors", ".pt", ".bin", ".wav")


@dataclass
class Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch -> sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> path -> bytes
    token: str | None = None  # gated: this bearer token is required

    def add_commit(self, files: dict[str, bytes], branch: str = "main") -> str:
        sha = hashlib.sha1(
            json.dumps(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
            + str(len(self.commits)).encode()
        ).hexdigest()
        self.commits[sha] = files
        self.refs[branch] = sha
        return sha


def snapshot_files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


class Hub:
    def __init__(self, port: int = 0):
        self.repos: dict[str, Repo] = {}
        self.failures: list[int] = []  # statuses for the next API calls
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization)
        handler = type("Handler", (_Handler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Hub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    hub: Hub

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str | None = None, message: str = "") -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message or code or "error"}).encode(), headers)

    def _repo_and_sha(self, repo_id: str, revision: str):
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            return self._error(
                403 if self.headers.get("Authorization") else 401, "GatedRepo", "Access to this repo is restricted"
            )
        sha = repo.refs.get(revision, revision if revision in repo.commits else None)
        if sha is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        return repo, sha

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def _handle(self) -> None:
        path = unquote(urlparse(self.path).path)
        self.hub.requests.append((self.command, path, self.headers.get("Authorization")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and "tree" in parts:
            i = parts.index("tree")
            found = self._repo_and_sha("/".join(parts[2:i]), parts[i + 1])
            if not found:
                return
            repo, sha = found
            entries, dirs = [], set()
            for name, data in repo.commits[sha].items():
                dirs.update("/".join(name.split("/")[:k]) for k in range(1, name.count("/") + 1))
                entry = {
                    "type": "file",
                    "path": name,
                    "size": len(data),
                    "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                }
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                entries.append(entry)
            entries += [{"type": "directory", "path": d, "oid": "0" * 40, "size": 0} for d in sorted(dirs)]
            return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})
        if parts[:2] == ["api", "models"] and "revision" in parts:
            if self.hub.failures:
                return self._error(self.hub.failures.pop(0))
            i = parts.index("revision")
            found = self._repo_and_sha("/".join(parts[2:i]), "/".join(parts[i + 1 :]))
            if not found:
                return
            repo, sha = found
            siblings = []
            for name, data in repo.commits[sha].items():
                entry = {
                    "rfilename": name,
                    "size": len(data),
                    "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
                }
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                siblings.append(entry)
            body = json.dumps(
                {
                    "id": "/".join(parts[2:i]),
                    "modelId": "/".join(parts[2:i]),
                    "sha": sha,
                    "siblings": siblings,
                    "private": False,
                    "gated": "auto" if repo.token else False,
                    "tags": [],
                    "downloads": 0,
                    "likes": 0,
                }
            )
            return self._send(200, body.encode(), {"Content-Type": "application/json"})
        if "resolve" in parts:
            i = parts.index("resolve")
            found = self._repo_and_sha("/".join(parts[:i]), parts[i + 1])
            if not found:
                return
            repo, sha = found
            name = "/".join(parts[i + 2 :])
            data = repo.commits[sha].get(name)
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found")
            etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else hashlib.sha1(data).hexdigest()
            return self._send(
                200, data, {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"}
            )
        self._error(404, message=f"no route for {path}")
