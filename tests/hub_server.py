"""A loopback stand-in for the Hugging Face Hub API, enough for `huggingface_hub` to create a repo and commit files.

    with HubServer() as hub:            # listens on 127.0.0.1, a free port, in a daemon thread
        env["HF_ENDPOINT"] = hub.url   # huggingface_hub reads HF_ENDPOINT at import time: set it before importing
        ...                            # create_repo / upload_folder / Trainer.push_to_hub
        hub.files["me/tiny-dpo"]       # {path in repo: bytes} after every commit so far

Served (what `create_repo`, `upload_folder` and `create_commit` call):

- `GET  /api/whoami-v2`                               -> a user named `hub.user`
- `POST /api/repos/create`                            -> `{"url": ...}` (also when the repo exists: exist_ok)
- `POST /api/validate-yaml`                           -> `{"errors": [], "warnings": []}`
- `POST /api/{type}s/{ns}/{name}/preupload/{rev}`     -> every file `"uploadMode": "regular"` (inline in the commit)
- `POST /api/{type}s/{ns}/{name}/commit/{rev}`        -> applies the ndjson commit (base64 file contents)
- anything else                                       -> 404 `{"error": ...}`, noted in `hub.unhandled`

Every request is noted in `hub.requests` as `(method, path, authorization header)`. LFS uploads are never offered,
so a commit that holds an `lfsFile` line is recorded in `hub.errors` and refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__all__ = ["HubServer"]


class HubServer:
    def __init__(self, user: str = "me"):
        self.user = user
        self.repos: set[str] = set()
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> {path: bytes}, the repo's state after all commits
        self.commits: list[dict] = []  # {"repo_id", "revision", "summary", "files": {path: bytes}, "deleted": [...]}
        self.requests: list[tuple[str, str, str | None]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._url: str | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT` (still readable after `stop()`)."""
        if self._url is None:
            raise RuntimeError("The loopback hub is not started.")
        return self._url

    def start(self) -> HubServer:
        hub = self

        class Handler(_Handler):
            server_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self._url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the handler calls ------------------------------------------------------------------------------------
    def _create_repo(self, body: dict) -> dict:
        name = body.get("name") or ""
        namespace = body.get("organization") or self.user
        repo_id = name if "/" in name else f"{namespace}/{name}"
        with self._lock:
            self.repos.add(repo_id)
            self.files.setdefault(repo_id, {})
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def _commit(self, repo_id: str, revision: str, raw: bytes) -> tuple[int, dict]:
        summary, added, deleted = "", {}, []
        for line in raw.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item.get("key"), item.get("value", {})
            if key == "header":
                summary = value.get("summary", "")
            elif key == "file":
                content = value["content"]
                added[value["path"]] = (
                    base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                )
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:  # lfsFile / copies: never offered by preupload, so unexpected here
                with self._lock:
                    self.errors.append(f"unsupported commit line {key!r} for {value.get('path')!r}")
                return 422, {"error": f"the loopback hub does not support {key!r}"}
        with self._lock:
            if repo_id not in self.repos:
                return 404, {"error": f"Repository {repo_id} not found"}
            state = self.files.setdefault(repo_id, {})
            for path in deleted:
                for existing in [p for p in state if p == path or p.startswith(path.rstrip("/") + "/")]:
                    del state[existing]
            state.update(added)
            oid = hashlib.sha1(f"{repo_id}:{len(self.commits)}".encode()).hexdigest()
            self.commits.append(
                {"repo_id": repo_id, "revision": revision, "summary": summary, "files": added, "deleted": deleted}
            )
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}


class _Handler(BaseHTTPRequestHandler):
    server_hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 404:
            self.send_header("X-Error-Code", "RepoNotFound" if "/api/models/" in self.path else "EntryNotFound")
            self.send_header("X-Error-Message", payload.get("error", "not found"))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _note(self) -> str:
        path = unquote(urlsplit(self.path).path)
        with self.server_hub._lock:
            self.server_hub.requests.append((self.command, path, self.headers.get("Authorization")))
        return path

    def _unhandled(self, path: str) -> None:
        with self.server_hub._lock:
            self.server_hub.unhandled.append((self.command, path))
        self._reply(404, {"error": f"{self.command} {path} is not served by the loopback hub"})

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self._note()
        hub = self.server_hub
        if path == "/api/whoami-v2":
            self._reply(200, {
                "type": "user", "name": hub.user, "fullname": hub.user, "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "loopback", "role": "write"}},
            })
        else:
            self._unhandled(path)

    def do_HEAD(self):  # noqa: N802
        path = self._note()
        with self.server_hub._lock:
            self.server_hub.unhandled.append((self.command, path))
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self):  # noqa: N802
        path = self._note()
        raw = self._body()
        hub = self.server_hub
        parts = path.strip("/").split("/")
        if path == "/api/repos/create":
            self._reply(200, hub._create_repo(json.loads(raw or b"{}")))
        elif path == "/api/validate-yaml":
            self._reply(200, {"errors": [], "warnings": []})
        elif len(parts) >= 6 and parts[0] == "api" and parts[4] == "preupload":
            files = json.loads(raw or b"{}").get("files", [])
            self._reply(200, {
                "files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files],
            })
        elif len(parts) >= 6 and parts[0] == "api" and parts[4] == "commit":
            repo_id, revision = f"{parts[2]}/{parts[3]}", "/".join(parts[5:])
            status, payload = hub._commit(repo_id, revision, raw)
            self._reply(status, payload)
        else:
            self._unhandled(path)

    do_PUT = do_POST  # noqa: N815
