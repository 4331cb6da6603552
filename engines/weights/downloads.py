"""Downloading a spec's weights from its hubs, in the worker process.

Each hub is reached through its own client library (``huggingface_hub``, ``modelscope``),
into that library's cache (or one folder, the ``hub_cache_dir`` setting), so weights a
user already downloaded are found and a second launch sends no request at all. Before
fetching anything the sizes are asked of the hub and checked against the free disk; while
fetching, the bytes landing in the repository's cache folder are reported as progress.
Failures become domain errors: gated (401/403) PERMISSION_DENIED naming the token
variable, an unknown repository or file NOT_FOUND, an unreachable hub UNAVAILABLE, and
offline (``HF_HUB_OFFLINE=1``) with nothing cached FAILED_PRECONDITION.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmgrpc.clients.errors import (
    FailedPrecondition,
    LlmgrpcError,
    NotFound,
    PermissionDenied,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from llmgrpc.engines.base import LoadPlan, ProgressReport
from llmgrpc.engines.weights import hubs

# A pytorch spec needs its configuration, tokenizer and safetensors weights; never pickles.
PYTORCH_FILES = ("*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.jinja", "*.txt")
DOWNLOADING = "downloading"
PROGRESS_INTERVAL_S = 0.25

# free_bytes(folder) -> bytes free on the disk that holds folder.
FreeBytes = Callable[[Path], int]


@dataclass(frozen=True)
class Wanted:
    """What to fetch from one repository: one file (a GGUF quantization), or the files matching patterns."""

    repo_id: str
    filename: str = ""
    patterns: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.repo_id}/{self.filename}" if self.filename else self.repo_id

    def matches(self, path: str) -> bool:
        if self.filename:
            return path == self.filename
        return any(fnmatch.fnmatch(path, pattern) for pattern in self.patterns)


class HubSource(Protocol):
    """One hub's client library, behind the four questions a download asks."""

    info: hubs.HubInfo

    def folder(self, wanted: Wanted) -> Path:
        """Where the repository's files land in the cache (watched for progress, checked for space)."""

    def cached(self, wanted: Wanted) -> str | None:
        """The local path when everything wanted is in the cache already; never touches the network."""

    def sizes(self, wanted: Wanted) -> dict[str, int]:
        """The files still to fetch and their sizes, from the hub's metadata."""

    def fetch(self, wanted: Wanted) -> str:
        """Download what is wanted; the local path."""

    def error(self, error: Exception, wanted: Wanted) -> LlmgrpcError | None:
        """The domain error a failure of the library means, or None for a bug."""


def download(plan: LoadPlan, report: ProgressReport, free_bytes: FreeBytes | None = None) -> str:
    """A local path holding the plan's weights, from the first of its hubs that has them.

    With download_hub "auto" the spec's hubs are tried in order; the error of the first one
    is raised (naming the others') when none has them. A disk too small stops at once.
    """
    spec = plan.spec
    listed = [hub["name"] for hub in spec.hubs]
    order = hubs.hub_order(listed, plan.download_hub, hubs.unavailable_reasons())
    if spec.model_format.startswith("gguf"):
        # One file, or the parts of a split one (fetched in order; the first is what is loaded).
        file_names = spec.file_names or [spec.model_file_name_template.format(quantization=spec.quantization)]
        wanted_by_hub = {
            h["name"]: [Wanted(h["model_id"], filename=name) for name in file_names] for h in spec.hubs
        }
    else:
        wanted_by_hub = {h["name"]: [Wanted(h["model_id"], patterns=PYTORCH_FILES)] for h in spec.hubs}

    def fetch(name: str, source: HubSource) -> str:
        paths = [
            fetch_from(source, wanted, report, free_bytes or disk_free_bytes)
            for wanted in wanted_by_hub[name]
        ]
        return paths[0]

    return from_first_hub(order, plan.hub_cache_dir, fetch, "the weights")


def from_first_hub(
    order: list[str], hub_cache_dir: str, fetch: Callable[[str, HubSource], str], what: str
) -> str:
    """fetch(hub name, source) from the first hub in order that has what is wanted; the error of
    the first one (naming the others') when none has it. A disk too small stops at once."""
    failures: list[tuple[str, LlmgrpcError]] = []
    for name in order:
        cache = Path(hub_cache_dir) / name if hub_cache_dir else None
        try:
            return fetch(name, SOURCES[name](cache))
        except ResourceExhausted:
            raise  # the disk is the same for every hub
        except LlmgrpcError as error:
            failures.append((name, error))
    first = failures[0][1]
    if len(failures) == 1:
        raise first
    tried = "; ".join(f"{name}: {error}" for name, error in failures)
    raise type(first)(f"no hub had {what} ({tried})", reason=first.reason, metadata=first.metadata)


def fetch_from(source: HubSource, wanted: Wanted, report: ProgressReport, free_bytes: FreeBytes) -> str:
    """The cache's copy when complete (no request sent), else a download checked against the disk."""
    with _domain_errors(source, wanted):
        cached = source.cached(wanted)
    if cached is not None:
        return cached
    if offline():
        raise FailedPrecondition(
            f"{wanted} is not in the {source.info.display_name} cache ({source.folder(wanted)}) and "
            "HF_HUB_OFFLINE is set, so nothing is downloaded: download it first, or give model_path",
            reason=Reason.WEIGHTS_MISSING,
        )
    report(DOWNLOADING, 0, 0)
    folder = source.folder(wanted)
    with _domain_errors(source, wanted):
        needed = sum(source.sizes(wanted).values())
    check_disk(needed, folder, free_bytes, str(wanted))
    with _domain_errors(source, wanted), BytesLanding(folder, needed, report):
        path = source.fetch(wanted)
    report(DOWNLOADING, needed, needed)
    return path


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set, as huggingface_hub reads it: no hub is asked."""
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "on", "yes", "true")
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def disk_free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds folder (or would hold it: its nearest existing parent)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return 0


def check_disk(needed: int, folder: Path, free_bytes: FreeBytes, what: str) -> None:
    free = free_bytes(folder)
    if needed > free:
        raise ResourceExhausted(
            f"downloading {what} needs {_gib(needed)} ({needed} bytes) in {folder} but that disk has "
            f"{_gib(free)} ({free} bytes) free; free some space, or set hub_cache_dir to a larger disk",
            reason=Reason.INSUFFICIENT_DISK,
            metadata={"needed_bytes": str(needed), "free_bytes": str(free), "folder": str(folder)},
        )


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


class BytesLanding:
    """Reports, from a thread, the bytes that land in a folder while a download runs.

    Both hub libraries write each file as it arrives (under a temporary name, renamed when
    complete), so the growth of the folder is the download's progress, whichever hub it is.
    """

    def __init__(
        self, folder: Path, total: int, report: ProgressReport, interval_s: float = PROGRESS_INTERVAL_S
    ):
        self.folder = folder
        self.total = total
        self.report = report
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._baseline = 0
        self._thread = threading.Thread(target=self._run, name="download-progress", daemon=True)

    def __enter__(self) -> BytesLanding:
        self._baseline = folder_bytes(self.folder)
        self.report(DOWNLOADING, 0, self.total)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = -1
        while not self._stop.wait(self.interval_s):
            done = min(max(folder_bytes(self.folder) - self._baseline, 0), self.total)
            if done != last:
                self.report(DOWNLOADING, done, self.total)
                last = done


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under folder (links, e.g. a cache's snapshot entries, not counted)."""
    total = 0
    for root, _, names in os.walk(folder):
        for name in names:
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:  # renamed or removed meanwhile
                continue
            if not os.path.islink(os.path.join(root, name)):
                total += stat.st_size
    return total


class _domain_errors:  # noqa: N801 - used as a context manager, like contextlib's
    """Turns a hub library's exceptions into domain errors (what a bug raises passes unchanged)."""

    def __init__(self, source: HubSource, wanted: Wanted):
        self.source = source
        self.wanted = wanted

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if error is None or isinstance(error, LlmgrpcError) or not isinstance(error, Exception):
            return False
        translated = self.source.error(error, self.wanted)
        if translated is None:
            return False
        raise translated from None


def causes(error: BaseException) -> Iterator[BaseException]:
    """error, then what caused it, and so on (each once)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def http_status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def from_status(status: int, info: hubs.HubInfo, wanted: Wanted, detail: str) -> LlmgrpcError:
    if status in (401, 403):
        return PermissionDenied(
            f"{info.display_name} refused access to {wanted} ({status}): the model may be gated or "
            f"private; accept its licence on the hub, then set {info.token_variable} on the server",
            reason=Reason.HUB_ACCESS_DENIED,
            metadata={"hub": info.name, "token_variable": info.token_variable, "http_status": str(status)},
        )
    if status == 404:
        return NotFound(
            f"{info.display_name} has no {wanted} ({detail})",
            reason=Reason.WEIGHTS_NOT_FOUND,
            metadata={"hub": info.name},
        )
    return unreachable(info, wanted, f"HTTP {status}: {detail}")


def unreachable(info: hubs.HubInfo, wanted: Wanted, detail: str) -> Unavailable:
    return Unavailable(
        f"could not download {wanted} from {info.display_name} ({detail}); check the network, "
        f"or {info.endpoint_variable} if it points to a mirror",
        reason=Reason.HUB_UNREACHABLE,
        metadata={"hub": info.name},
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# Exceptions of these libraries (and OSError) mean the download failed, not that llmgrpc has a bug.
_NETWORK_MODULES = ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub", "modelscope")


def _is_transport_failure(error: BaseException) -> bool:
    return isinstance(error, (OSError, ConnectionError, TimeoutError)) or any(
        type(cause).__module__.startswith(_NETWORK_MODULES) for cause in causes(error)
    )


class HuggingFaceSource:
    """huggingface_hub: its cache layout (blobs and snapshots), its dry run for the sizes."""

    info = hubs.HUBS[hubs.HUGGINGFACE]

    def __init__(self, cache_dir: Path | None):
        import huggingface_hub
        from huggingface_hub.utils import disable_progress_bars

        self.hf = huggingface_hub
        self.cache_dir = str(cache_dir) if cache_dir else None
        disable_progress_bars()  # progress goes to GetModel, not to the server's terminal

    def folder(self, wanted: Wanted) -> Path:
        from huggingface_hub import constants
        from huggingface_hub.file_download import repo_folder_name

        root = Path(self.cache_dir or constants.HF_HUB_CACHE)
        return root / repo_folder_name(repo_id=wanted.repo_id, repo_type="model")

    def _call(self, wanted: Wanted, **options):
        if wanted.filename:
            return self.hf.hf_hub_download(
                wanted.repo_id, wanted.filename, cache_dir=self.cache_dir, **options
            )
        return self.hf.snapshot_download(
            wanted.repo_id, allow_patterns=list(wanted.patterns), cache_dir=self.cache_dir, **options
        )

    def cached(self, wanted: Wanted) -> str | None:
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            # A partial snapshot (an interrupted download) is refused by its cached file list.
            path = self._call(wanted, local_files_only=True)
        except LocalEntryNotFoundError:
            return None
        return path if wanted.filename or has_pytorch_weights(Path(path)) else None

    def sizes(self, wanted: Wanted) -> dict[str, int]:
        planned = self._call(wanted, dry_run=True)
        planned = planned if isinstance(planned, list) else [planned]
        return {file.filename: int(file.file_size or 0) for file in planned if file.will_download}

    def fetch(self, wanted: Wanted) -> str:
        return self._call(wanted)

    def error(self, error: Exception, wanted: Wanted) -> LlmgrpcError | None:
        from huggingface_hub import errors

        for cause in causes(error):
            if isinstance(cause, errors.OfflineModeIsEnabled):
                return FailedPrecondition(
                    f"{wanted} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: nothing is "
                    "downloaded; download it first, or give model_path",
                    reason=Reason.WEIGHTS_MISSING,
                )
            if isinstance(cause, errors.GatedRepoError):
                return from_status(http_status(cause) or 403, self.info, wanted, _first_line(cause))
            if isinstance(cause, (errors.RevisionNotFoundError, errors.RemoteEntryNotFoundError)):
                return from_status(404, self.info, wanted, _first_line(cause))
            status = http_status(cause)
            if status is not None:
                return from_status(status, self.info, wanted, _first_line(cause))
        return unreachable(self.info, wanted, _first_line(error)) if _is_transport_failure(error) else None


class ModelScopeSource:
    """modelscope: its snapshot layout, its file listing for the sizes."""

    info = hubs.HUBS[hubs.MODELSCOPE]

    def __init__(self, cache_dir: Path | None):
        self.cache_dir = str(cache_dir) if cache_dir else None

    def folder(self, wanted: Wanted) -> Path:
        # The layout of modelscope >= 1.38 (modelscope_hub): {cache}/models/{owner}--{name}.
        root = Path(
            self.cache_dir or os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope"
        )
        return root.expanduser() / "models" / wanted.repo_id.replace("/", "--")

    def _call(self, wanted: Wanted, **options):
        if wanted.filename:
            from modelscope.hub.file_download import model_file_download

            return model_file_download(wanted.repo_id, wanted.filename, cache_dir=self.cache_dir, **options)
        from modelscope.hub.snapshot_download import snapshot_download

        return snapshot_download(
            wanted.repo_id,
            cache_dir=self.cache_dir,
            allow_patterns=list(wanted.patterns),
            progress_callbacks=[_quiet_callback()],
            **options,
        )

    def cached(self, wanted: Wanted) -> str | None:
        try:
            path = self._call(wanted, local_files_only=True)
        except Exception:  # the library raises several kinds for "not in the cache"
            return None
        if wanted.filename:
            return path if Path(path).is_file() else None
        # The client returns any snapshot folder it finds; only a complete one is used.
        return path if has_pytorch_weights(Path(path)) else None

    def sizes(self, wanted: Wanted) -> dict[str, int]:
        from modelscope.hub.api import HubApi

        files = HubApi().get_model_files(wanted.repo_id, recursive=True)
        return {f["Path"]: int(f.get("Size") or 0) for f in files if wanted.matches(f["Path"])}

    def fetch(self, wanted: Wanted) -> str:
        return self._call(wanted)

    def error(self, error: Exception, wanted: Wanted) -> LlmgrpcError | None:
        for cause in causes(error):
            name = type(cause).__name__
            if name in ("AuthenticationError", "PermissionDeniedError"):
                return from_status(http_status(cause) or 403, self.info, wanted, _first_line(cause))
            if name == "NotExistError":
                return from_status(404, self.info, wanted, _first_line(cause))
            status = http_status(cause)
            if status is not None:
                return from_status(status, self.info, wanted, _first_line(cause))
            # A snapshot that failed file by file: the first file's failure says why.
            failed = getattr(cause, "failed_files", None)
            if failed:
                first = next(iter(failed.values()))
                return self.error(first, wanted) if isinstance(first, Exception) else None
        return unreachable(self.info, wanted, _first_line(error)) if _is_transport_failure(error) else None


def _quiet_callback():
    """A modelscope progress callback that draws nothing (progress goes to GetModel)."""
    from modelscope.hub.callback import ProgressCallback

    class Quiet(ProgressCallback):
        def update(self, size: int) -> None:
            pass

        def end(self) -> None:
            pass

    return Quiet


SOURCES: dict[str, Callable[[Path | None], HubSource]] = {
    hubs.HUGGINGFACE: HuggingFaceSource,
    hubs.MODELSCOPE: ModelScopeSource,
}


def has_pytorch_weights(folder: Path) -> bool:
    """A configuration and every safetensors shard its index names (or one safetensors file)."""
    if not (folder / "config.json").is_file():
        return False
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        return bool(shards) and all((folder / shard).is_file() for shard in shards)
    return any(folder.glob("*.safetensors"))
