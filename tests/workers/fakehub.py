"""A Hugging Face hub of a few models on loopback, speaking the file API huggingface_hub uses.

What `fleetserve model pull` (huggingface_hub 2.x underneath) asks of a hub at
``HF_ENDPOINT``: a revision's info (``/api/models/ORG/NAME/revision/REV``: its commit
``sha``), its file tree (``/api/models/ORG/NAME/tree/SHA``: sizes, git blob ids, LFS
sha256s), and each file at ``/ORG/NAME/resolve/SHA/PATH``: HEAD with ``X-Repo-Commit``,
``ETag`` (``X-Linked-Etag`` and ``X-Linked-Size`` for LFS files), GET with ``Range``
for a resumed download. A gated model answers 401 with ``X-Error-Code: GatedRepo``
without its token, an unknown one 404 ``RepoNotFound``, as the real hub does.

A file can be made to stall part way (``stall_at``), so a test can kill a pull in
the middle and see the next one resume. Every request is recorded.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.helpers import free_port, wait_until

CHUNK = 64 * 1024


@dataclass
class HubFile:
    path: str
    data: bytes
    lfs: bool = False  # stored in LFS: the hub names it by its sha256

    @property
    def git_oid(self) -> str:
        return hashlib.sha1(b"blob %d\0" % len(self.data) + self.data).hexdigest()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class HubModel:
    repo_id: str
    files: list[HubFile]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    token: str | None = None  # gated: only this token may read it


@dataclass
class Recorded:
    method: str
    path: str
    range: str | None
    authorized: bool


@dataclass
class FakeHub:
    models: dict[str, HubModel]
    requests: list[Recorded] = field(default_factory=list)
    #: (repo/path) -> byte offset where a GET stops sending until ``release`` is set
    stall_at: dict[str, int] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    url: str = ""

    def _model(self, request: Request) -> HubModel | Response:
        repo = f"{request.path_params['org']}/{request.path_params['name']}"
        model = self.models.get(repo)
        if model is None:
            return _error(404, "RepoNotFound", "Repository not found")
        given = request.headers.get("authorization")
        if model.token and given != f"Bearer {model.token}":
            return _error(401, "GatedRepo", f"Access to model {repo} is restricted")
        return model

    def _record(self, request: Request) -> None:
        self.requests.append(
            Recorded(
                request.method,
                request.url.path,
                request.headers.get("range"),
                "authorization" in request.headers,
            )
        )

    async def revision(self, request: Request) -> Response:
        self._record(request)
        model = self._model(request)
        if isinstance(model, Response):
            return model
        if request.path_params["rev"] not in ("main", model.commit):
            return _error(404, "RevisionNotFound", "Invalid rev id")
        return JSONResponse(
            {
                "id": model.repo_id,
                "modelId": model.repo_id,
                "sha": model.commit,
                "private": False,
                "gated": "manual" if model.token else False,
                "siblings": [{"rfilename": f.path} for f in model.files],
            }
        )

    async def tree(self, request: Request) -> Response:
        self._record(request)
        model = self._model(request)
        if isinstance(model, Response):
            return model
        entries = []
        for f in model.files:
            entry = {"type": "file", "path": f.path, "size": len(f.data), "oid": f.git_oid}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": len(f.data), "pointerSize": 134}
            entries.append(entry)
        return JSONResponse(entries)

    async def resolve(self, request: Request) -> Response:
        self._record(request)
        model = self._model(request)
        if isinstance(model, Response):
            return model
        path = request.path_params["path"]
        found = [f for f in model.files if f.path == path]
        if not found:
            return _error(404, "EntryNotFound", f"{path} does not exist")
        (hub_file,) = found
        headers = {
            "X-Repo-Commit": model.commit,
            "ETag": f'"{hub_file.git_oid}"',
            "Accept-Ranges": "bytes",
        }
        if hub_file.lfs:
            headers |= {
                "X-Linked-Etag": f'"{hub_file.sha256}"',
                "X-Linked-Size": str(len(hub_file.data)),
            }
        if request.method == "HEAD":
            return Response(headers=headers | {"Content-Length": str(len(hub_file.data))})
        start = 0
        status = 200
        if request.headers.get("range", "").startswith("bytes="):
            start = int(request.headers["range"][6:].split("-")[0])
            status = 206
            headers["Content-Range"] = (
                f"bytes {start}-{len(hub_file.data) - 1}/{len(hub_file.data)}"
            )
        headers["Content-Length"] = str(len(hub_file.data) - start)
        stall = self.stall_at.get(f"{model.repo_id}/{path}")

        async def body():  # type: ignore[no-untyped-def]
            offset = start
            while offset < len(hub_file.data):
                if stall is not None and offset >= stall:
                    while not self.release.is_set():
                        await asyncio.sleep(0.05)
                end = min(offset + CHUNK, len(hub_file.data))
                if stall is not None and offset < stall < end:
                    end = stall
                yield hub_file.data[offset:end]
                offset = end

        return StreamingResponse(body(), status_code=status, headers=headers)


def _error(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers={"X-Error-Code": code})


@dataclass
class RunningHub:
    hub: FakeHub
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.hub.release.set()
        self.server.should_exit = True
        self.thread.join(10)


def start_hub(hub: FakeHub) -> RunningHub:
    """Serve ``hub`` on a loopback port from a thread of this process."""
    routes = [
        Route("/api/models/{org}/{name}/revision/{rev}", hub.revision),
        Route("/api/models/{org}/{name}/tree/{rev}", hub.tree),
        Route("/{org}/{name}/resolve/{rev}/{path:path}", hub.resolve, methods=["GET", "HEAD"]),
    ]
    port = free_port()
    config = uvicorn.Config(
        Starlette(routes=routes), host="127.0.0.1", port=port, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "the fake hub to listen")
    hub.url = f"http://127.0.0.1:{port}"
    return RunningHub(hub, server, thread)
