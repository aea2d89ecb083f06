"""Model weights from a Hugging Face hub, as their own step before any engine starts.

`fleetserve model pull SOURCE` (and a worker, before its engine) puts a hub model's
files in the Hugging Face cache (``$HF_HOME/hub``), where vLLM looks for a hub id:
the engine then only reads, and its start-up budget (start_timeout_s) is spent on
loading, not downloading. huggingface_hub does the transfer: ``HF_ENDPOINT`` and
``HF_TOKEN`` as everywhere, an interrupted file resumed from its ``.incomplete``
part with a Range request, files already in the cache not fetched again. With
``HF_HUB_OFFLINE=1`` (serving pods on Kubernetes) nothing is fetched: a model not
pulled yet is an error that says so.

Progress is printed as lines (bytes on disk of the revision's files, read every few
seconds), which read well in a terminal and in a pod's log alike. A hub that answers
401 or 404 ends the pull at once with what to do.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from fleetserve.errors import ConfigError

logger = logging.getLogger(__name__)

#: Where a token goes on each target, named in the error for gated and private models.
_TOKEN_HELP = (
    "set HF_TOKEN to a token of an account that may read it (on the hub, accept the model's "
    "license first); Kubernetes: the Secret fleetserve-hf-token (key token); SkyPilot: "
    "--secret HF_TOKEN"
)


def is_hub_id(source: str) -> bool:
    """``org/name`` that is not a path on this machine: a model to fetch from the hub."""
    if not source or source.startswith(("/", ".", "~")) or Path(source).expanduser().exists():
        return False
    parts = source.split("/")
    return len(parts) == 2 and all(parts)


@dataclass
class Pulled:
    path: Path  # the snapshot directory in the cache
    total_bytes: int
    fetched_bytes: int  # what this pull transferred (the rest was in the cache already)


def _describe(exc: Exception, source: str, endpoint: str) -> str:
    """What went wrong, and what to do about it, for the errors a hub answers with."""
    from huggingface_hub import errors, get_token

    status = getattr(getattr(exc, "response", None), "status_code", None)
    has_token = get_token() is not None
    if isinstance(exc, errors.GatedRepoError):
        if has_token:
            return (
                f"{source} is gated and the hub at {endpoint} refuses this token ({status}): "
                "accept the model's license on the hub with the token's account"
            )
        return (
            f"{source} is gated: the hub at {endpoint} answered {status} without a token; "
            + _TOKEN_HELP
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{source}: no such revision on the hub at {endpoint} ({status})"
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return f"{source}: a file of it is missing on the hub at {endpoint} ({status})"
    if isinstance(exc, errors.RepositoryNotFoundError):
        if status == 401 and not has_token:
            return (
                f"{source}: the hub at {endpoint} answered 401: no such model, or a private or "
                f"gated one; {_TOKEN_HELP}"
            )
        return (
            f"{source}: no such model on the hub at {endpoint} ({status}), or this token may "
            "not read it"
        )
    if isinstance(exc, errors.OfflineModeIsEnabled | errors.LocalEntryNotFoundError):
        return (
            f"{source} is not in the model cache and HF_HUB_OFFLINE forbids fetching it: "
            f"run `fleetserve model pull {source}` where the hub is reachable (on Kubernetes the "
            "worker's pull init container does)"
        )
    if isinstance(exc, errors.HfHubHTTPError):
        return f"{source}: the hub at {endpoint} answered {status}: {exc}"
    return f"{source}: cannot reach the hub at {endpoint}: {exc}"


def pull(
    source: str,
    revision: str = "main",
    progress: Callable[[str], None] = logger.info,
    progress_every_s: float = 5.0,
) -> Pulled:
    """Every file of ``source`` at ``revision`` in the cache; ConfigError saying why not."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.hf_api import RepoFile
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()  # bars in a log file are noise: lines below instead
    endpoint = constants.ENDPOINT
    try:
        if constants.HF_HUB_OFFLINE:
            path = Path(snapshot_download(source, revision=revision, local_files_only=True))
            return Pulled(path, _size(path), 0)
        api = HfApi()
        # The revision's files and sizes first: a 401 or 404 ends here, before any download.
        info = api.repo_info(source, revision=revision)
        assert info.sha is not None
        tree = api.list_repo_tree(source, revision=info.sha, recursive=True)
        files = [f for f in tree if isinstance(f, RepoFile)]
        storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=source, repo_type="model")
        total = sum(f.size for f in files)
        tracker = _Progress(source, files, storage / "blobs", total, progress, progress_every_s)
        with tracker:
            for f in files:
                _fetch(source, info.sha, f.path, f.size, storage)
            # Every blob is there: this links the revision's snapshot and its ref, fetching nothing.
            path = Path(snapshot_download(source, revision=revision))
    except (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.HTTPError) as exc:
        raise ConfigError(_describe(exc, source, endpoint)) from None
    return Pulled(path, total, tracker.fetched)


def _fetch(source: str, commit: str, filename: str, size: int, storage: Path) -> None:
    """One file into ``storage/blobs``, resumed from what an earlier pull left.

    huggingface_hub (2.x) downloads into a file of its own process's, removed on failure
    and never reused, so a killed pull of a 400 GB model starts over. Here the part is
    kept as ``<etag>.incomplete`` and continued with a Range request, under the lock
    huggingface_hub takes for the same blob (two pods pulling onto one volume wait for
    each other, where the file system's locks work).
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, http_get
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    url = hf_hub_url(source, filename, revision=commit)
    meta = get_hf_file_metadata(url)
    if meta.etag is None:
        raise ConfigError(f"{source}: the hub gave no ETag for {filename}")
    blob = storage / "blobs" / meta.etag
    if blob.exists():
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / storage.name / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers()
    if httpx.URL(meta.location).host != httpx.URL(url).host:
        headers.pop("authorization", None)  # a signed CDN address: the token stays home
    with WeakFileLock(lock):
        if blob.exists():
            return
        part = blob.with_name(blob.name + ".incomplete")
        with part.open("ab") as out:
            http_get(
                meta.location, out, resume_size=out.tell(), headers=headers, expected_size=size
            )
        part.rename(blob)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class _Progress:
    """Prints ``pulling SOURCE: 1.2 GiB of 4.5 GiB (27%), 85 MB/s`` every few seconds."""

    def __init__(
        self,
        source: str,
        files: list,  # huggingface_hub's RepoFile
        blobs: Path,
        total: int,
        say: Callable[[str], None],
        every_s: float,
    ) -> None:
        # The blob each file ends up in (named by its ETag: the LFS sha256 or the git blob id)
        self._blobs = [(blobs / (f.lfs.sha256 if f.lfs else f.blob_id), f.size) for f in files]
        self._source, self._total, self._say, self._every_s = source, total, say, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._first = self._done()
        self.fetched = 0

    def _done(self) -> int:
        done = 0
        for blob, size in self._blobs:
            if blob.exists():
                done += size
            else:
                partial = blob.with_name(blob.name + ".incomplete")
                done += partial.stat().st_size if partial.exists() else 0
        return done

    def _line(self, done: int, rate: float | None) -> str:
        share = f" ({100 * done / self._total:.0f}%)" if self._total else ""
        speed = f", {rate / 1e6:.1f} MB/s" if rate is not None else ""
        return f"pulling {self._source}: {_human(done)} of {_human(self._total)}{share}{speed}"

    def _run(self) -> None:
        last, last_t = self._first, time.monotonic()
        while not self._stop.wait(self._every_s):
            done, now = self._done(), time.monotonic()
            self._say(self._line(done, (done - last) / (now - last_t)))
            last, last_t = done, now

    def __enter__(self) -> _Progress:
        if self._first >= self._total:
            self._say(f"{self._source}: every file is in the cache ({_human(self._total)})")
        else:
            resumed = f", resuming from {_human(self._first)}" if self._first else ""
            files = f"{len(self._blobs)} files"
            self._say(f"pulling {self._source}: {_human(self._total)} in {files}{resumed}")
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        done = self._done()
        self.fetched = max(done - self._first, 0)
        if exc[0] is None and self._first < self._total:
            self._say(self._line(done, None) + ", done")


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{size:.0f} B"
        size /= 1024
    raise AssertionError("unreachable")
