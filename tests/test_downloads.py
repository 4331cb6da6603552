"""Weights from the hubs: the real huggingface_hub and modelscope clients, in the server's worker
processes, against a loopback stand-in that speaks the hubs' HTTP protocols (tests/hub_stand_in.py).

The server runs in-process on port 0 with a families_dir of families whose specs point at the
stand-in's repositories; HF_ENDPOINT, HF_HOME, MODELSCOPE_ENDPOINT and MODELSCOPE_CACHE are set for
the module, and the workers inherit them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import threading
import time
from pathlib import Path

import grpc
import lora_files
import pytest
from conftest import TINY, RunningServer
from fleet import live_workers, socket_folders
from hub_stand_in import HUGGINGFACE, MODELSCOPE, HubStandIn, closed_port_url
from rpc_helpers import wait_until
from status_details import bad_request, error_info, reason

from llmgrpc.clients import Client
from llmgrpc.clients import cli as client_cli
from llmgrpc.clients.errors import FailedPrecondition, InvalidArgument, Reason, ResourceExhausted
from llmgrpc.engines.weights import downloads, hubs
from llmgrpc.server import cli
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import generate_pb2, models_pb2

ORG = "llmgrpc-test"
GGUF_TEMPLATE = "tiny-llama-3.1.{quantization}.gguf"
MIB = 1024 * 1024
# huggingface_hub writes a download in 10 MiB pieces: a file of 24 MiB shows bytes between 0 and all.
BIG = random.Random(7).randbytes(24 * MIB)
DROP_AT = 10 * MIB + 12345  # past the first 10 MiB piece, so the retry resumes with a Range


def hub_entry(hub: str, repo_id: str) -> dict:
    return {
        "name": hub,
        "display_name": hubs.HUBS[hub].display_name,
        "model_id": repo_id,
        "url": f"https://example.invalid/{repo_id}",
    }


def pytorch_spec(*hub_repos: tuple[str, str]) -> dict:
    return {
        "model_format": "pytorch",
        "model_size_in_billions": "0_002",
        "quantizations": ["none"],
        "model_engines": ["Transformers"],
        "model_id": hub_repos[0][1],
        "model_hubs": [hub_entry(hub, repo) for hub, repo in hub_repos],
    }


def gguf_spec(repo_id: str) -> dict:
    return {
        "model_format": "ggufv2",
        "model_size_in_billions": "0_002",
        "quantizations": ["Q4_K_M", "Q8_0", "Q2_K"],
        "model_engines": ["llama.cpp"],
        "model_id": repo_id,
        "model_file_name_template": GGUF_TEMPLATE,
        "model_hubs": [hub_entry(HUGGINGFACE, repo_id)],
    }


FAMILIES = {
    "hub-tiny": [pytorch_spec((HUGGINGFACE, f"{ORG}/tiny-llama")), gguf_spec(f"{ORG}/tiny-llama-GGUF")],
    "hub-big": [pytorch_spec((HUGGINGFACE, f"{ORG}/big"))],
    "hub-slow": [pytorch_spec((HUGGINGFACE, f"{ORG}/slow"))],
    "hub-watched": [pytorch_spec((HUGGINGFACE, f"{ORG}/watched"))],
    "hub-abandoned": [pytorch_spec((HUGGINGFACE, f"{ORG}/abandoned"))],
    "hub-untouched": [pytorch_spec((HUGGINGFACE, f"{ORG}/untouched"))],
    "hub-gated-401": [pytorch_spec((HUGGINGFACE, f"{ORG}/gated-401"))],
    "hub-gated-403": [pytorch_spec((HUGGINGFACE, f"{ORG}/gated-403"))],
    "hub-missing": [pytorch_spec((HUGGINGFACE, f"{ORG}/never-uploaded"))],
    "hub-huge": [pytorch_spec((HUGGINGFACE, f"{ORG}/huge"))],
    "hub-offline": [pytorch_spec((HUGGINGFACE, f"{ORG}/offline")), gguf_spec(f"{ORG}/offline-GGUF")],
    "hub-both": [pytorch_spec((HUGGINGFACE, f"{ORG}/not-on-hf"), (MODELSCOPE, f"{ORG}/tiny-llama"))],
    "hub-modelscope-gated": [pytorch_spec((MODELSCOPE, f"{ORG}/gated"))],
}


def write_families(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, specs in FAMILIES.items():
        family = {
            "version": 1,
            "model_name": name,
            "model_description": f"The tiny model, served by the hub stand-in ({name}).",
            "context_length": 2048,
            "model_lang": ["en"],
            "model_ability": ["generate"],
            "model_specs": specs,
        }
        (folder / f"{name}.json").write_text(json.dumps(family))
    return folder


@pytest.fixture(scope="module")
def tiny_gguf(cache_dir: Path, tiny_files: Path) -> Path:
    pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    from llmgrpc.engines.weights.gguf_convert import ensure_tiny_gguf

    return ensure_tiny_gguf(cache_dir, "Q4_K_M")


@pytest.fixture(scope="module")
def hub_adapter(cache_dir: Path, tmp_path_factory) -> Path:
    """A PEFT adapter of the tiny model, which the stand-in serves as a hub repository."""
    return lora_files.good_adapters(cache_dir, tmp_path_factory.mktemp("hub-adapters"))["tiny-lora-a"]


@pytest.fixture(scope="module")
def hub(tiny_files: Path, hub_adapter: Path) -> HubStandIn:
    with HubStandIn() as stand_in:
        stand_in.add_folder(HUGGINGFACE, f"{ORG}/tiny-lora", hub_adapter)
        tiny = {p.name: p.read_bytes() for p in tiny_files.iterdir() if p.is_file()}
        # A pickle and a README sit beside the safetensors, as on the real hub: neither is fetched.
        extras = {"pytorch_model.bin": b"pickle, never fetched", "README.md": b"# tiny"}
        # Slowed down enough for GetModel to see the download phase.
        stand_in.add(
            HUGGINGFACE,
            f"{ORG}/tiny-llama",
            {**tiny, **extras},
            delay_per_chunk_s={"model.safetensors": 0.02},
        )
        stand_in.add(MODELSCOPE, f"{ORG}/tiny-llama", {**tiny, **extras})
        stand_in.add(MODELSCOPE, f"{ORG}/gated", tiny, file_status=403)
        config = {"config.json": tiny["config.json"]}
        stand_in.add(HUGGINGFACE, f"{ORG}/big", {**config, "model.safetensors": BIG})
        stand_in.add(
            HUGGINGFACE,
            f"{ORG}/slow",
            {**config, "model.safetensors": BIG},
            delay_per_chunk_s={"model.safetensors": 0.05},
        )
        # Slowed so that a watch sees bytes arrive, or a caller can leave mid-download.
        stand_in.add(HUGGINGFACE, f"{ORG}/watched", tiny, delay_per_chunk_s={"model.safetensors": 0.05})
        stand_in.add(
            HUGGINGFACE,
            f"{ORG}/abandoned",
            {**config, "model.safetensors": BIG},
            delay_per_chunk_s={"model.safetensors": 0.05},
        )
        stand_in.add(HUGGINGFACE, f"{ORG}/untouched", tiny)
        stand_in.add(HUGGINGFACE, f"{ORG}/gated-401", tiny, file_status=401)
        stand_in.add(HUGGINGFACE, f"{ORG}/gated-403", tiny, file_status=403)
        stand_in.add(
            HUGGINGFACE,
            f"{ORG}/huge",
            {**config, "model.safetensors": b"x"},
            claimed_sizes={"model.safetensors": 10**15},
        )
        stand_in.add(HUGGINGFACE, f"{ORG}/offline", {**config, "model.safetensors": b"weights"})
        stand_in.add(
            HUGGINGFACE, f"{ORG}/offline-GGUF", {GGUF_TEMPLATE.format(quantization="Q4_K_M"): b"gguf"}
        )
        yield stand_in


@pytest.fixture(scope="module")
def hub_env(hub: HubStandIn, tmp_path_factory):
    """The hub variables of the server's process, which its workers inherit."""
    home = tmp_path_factory.mktemp("hub-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_ENDPOINT", hub.url)
        patch.setenv("HF_HOME", str(home / "hf"))
        patch.setenv("MODELSCOPE_ENDPOINT", hub.url)
        patch.setenv("MODELSCOPE_CACHE", str(home / "modelscope"))
        for name in (
            "HF_HUB_OFFLINE",
            "TRANSFORMERS_OFFLINE",
            "HF_TOKEN",
            "HF_HUB_CACHE",
            "MODELSCOPE_API_TOKEN",
        ):
            patch.delenv(name, raising=False)
        yield home


@pytest.fixture(scope="module")
def families_dir(tmp_path_factory) -> Path:
    return write_families(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="module")
def server(hub_env: Path, families_dir: Path, cache_dir: Path, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed-weights")
    running = RunningServer(
        Settings(
            port=0,
            cache_dir=cache_dir,
            families_dir=families_dir,
            device="cpu",
            shutdown_grace_s=2,
            allowed_model_dirs=[allowed],
        )
    )
    running.allowed = allowed
    yield running
    running.stop()


@pytest.fixture(scope="module")
def hub_client(server: RunningServer):
    with Client(server.endpoint) as client:
        yield client


def download(client: Client, model_name: str, **fields) -> tuple[list[models_pb2.LoadProgress], str]:
    progress, path = [], ""
    for message in client.download(model_name, timeout=120, **fields):
        if message.model_path:
            path = message.model_path
        else:
            progress.append(message.progress)
    return progress, path


def failure(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


def progress_of(client: Client, uid: str) -> models_pb2.LoadProgress:
    try:
        return client.get_model(uid).progress
    except grpc.RpcError:  # not launched yet
        return models_pb2.LoadProgress()


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class ProgressWatch:
    """Polls GetModel for a model uid from a thread, keeping every progress it sees."""

    def __init__(self, client: Client, uid: str):
        self.client, self.uid = client, uid
        self.seen: list[models_pb2.LoadProgress] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                model = self.client.get_model(self.uid)
            except grpc.RpcError:
                continue
            if model.HasField("progress"):
                self.seen.append(model.progress)

    def __enter__(self) -> ProgressWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# The pytorch spec: download with progress, then the cache is reused without a request.


def test_pytorch_spec_downloads_safetensors_only_with_progress_then_reuses_the_cache(
    hub_client: Client, server: RunningServer, hub: HubStandIn, hub_env: Path, tiny_files: Path, capsys
):
    hub.clear()
    with ProgressWatch(hub_client, "hub-tiny") as watch:
        model = hub_client.launch("hub-tiny", model_format="pytorch", model_uid="hub-tiny", timeout=240)
    assert model.state == models_pb2.MODEL_STATE_READY
    assert not model.HasField("progress")  # only while LOADING

    wanted = ["chat_template.jinja", "config.json", "generation_config.json", "model.safetensors"]
    wanted += ["tokenizer.json", "tokenizer_config.json"]
    fetched = sorted(r.path.rsplit("/", 1)[1] for r in hub.seen("GET", "/resolve/"))
    assert fetched == wanted  # no pickle, no README
    total = sum((tiny_files / name).stat().st_size for name in wanted)
    downloading = [p for p in watch.seen if p.phase == "downloading" and p.total_bytes]
    assert downloading and {p.total_bytes for p in downloading} == {total}
    assert all(0 <= p.done_bytes <= p.total_bytes for p in downloading)
    assert "loading weights" in {p.phase for p in watch.seen} or "warming up" in {p.phase for p in watch.seen}

    # The default cache is huggingface_hub's own (HF_HOME here), in its layout.
    snapshot = next((hub_env / "hf" / "hub" / f"models--{ORG}--tiny-llama" / "snapshots").iterdir())
    assert sorted(p.name for p in snapshot.iterdir()) == wanted
    assert sha256(snapshot / "model.safetensors") == sha256(tiny_files / "model.safetensors")
    answer = list(hub_client.generate("hub-tiny", "Hello", max_tokens=4, temperature=0))
    assert answer[-1].usage.completion_tokens == 4
    assert answer[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    hub_client.terminate("hub-tiny")

    # A second launch, from the CLI (which draws the progress from GetModel), sends no request at all.
    hub.clear()
    capsys.readouterr()
    cli.main(["launch", "--endpoint", server.endpoint, "--model-name", "hub-tiny", "--model-uid", "again"])
    out, err = capsys.readouterr()
    assert json.loads(out)["state"] == "MODEL_STATE_READY"
    assert hub.requests == []
    assert {"starting", "loading weights", "warming up"} & {line.split(" [")[0] for line in err.splitlines()}
    hub_client.terminate("again")


def test_gguf_spec_downloads_only_the_quantization_it_names(
    hub_client: Client, hub: HubStandIn, tiny_gguf: Path
):
    quantized = GGUF_TEMPLATE.format(quantization="Q4_K_M")
    hub.add(
        HUGGINGFACE,
        f"{ORG}/tiny-llama-GGUF",
        {
            quantized: tiny_gguf.read_bytes(),
            GGUF_TEMPLATE.format(quantization="Q8_0"): b"another quantization",
        },
    )
    hub.clear()
    model = hub_client.launch(
        "hub-tiny", model_format="ggufv2", quantization="Q4_K_M", model_uid="hub-gguf", timeout=240
    )
    assert model.state == models_pb2.MODEL_STATE_READY and model.model_engine == "llama.cpp"
    assert [r.path.rsplit("/", 1)[1] for r in hub.seen("GET", "/resolve/")] == [quantized]
    pieces = list(hub_client.generate("hub-gguf", "Hello", max_tokens=4, temperature=0))
    assert pieces[-1].usage.completion_tokens == 4
    hub_client.terminate("hub-gguf")

    # A quantization the repository lacks: the hub's 404 for the file.
    error = failure(lambda: download(hub_client, "hub-tiny", model_format="ggufv2", quantization="Q2_K"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and reason(error) == Reason.WEIGHTS_NOT_FOUND
    assert GGUF_TEMPLATE.format(quantization="Q2_K") in error.details()


def test_hub_cache_dir_setting_is_the_one_cache_folder(
    start_server, hub_env: Path, families_dir: Path, hub: HubStandIn, tmp_path: Path, capsys
):
    server = start_server(families_dir=families_dir, hub_cache_dir=tmp_path / "weights", device="cpu")
    capsys.readouterr()
    cli.main(
        [
            "download",
            "--endpoint",
            server.endpoint,
            "--model-name",
            "hub-offline",
            "--model-format",
            "pytorch",
        ]
    )
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path.is_relative_to(tmp_path / "weights" / "huggingface")
    assert (path / "model.safetensors").read_bytes() == b"weights"
    assert err.startswith("downloading")


def test_download_of_a_generated_model_generates_it(hub_client: Client, tiny_files: Path):
    progress, path = download(hub_client, "tiny-llama-3.1", model_format="pytorch")
    assert Path(path) == tiny_files
    assert "downloading" not in {p.phase for p in progress}


# Resuming, and progress while downloading.


def test_download_resumes_after_the_connection_drops_mid_file(hub_client: Client, hub: HubStandIn):
    hub.repos[(HUGGINGFACE, f"{ORG}/big")].drop_after["model.safetensors"] = DROP_AT
    hub.clear()
    progress, path = download(hub_client, "hub-big")
    gets = hub.seen("GET", "/resolve/")
    weights = [r for r in gets if r.path.endswith("/model.safetensors")]
    # The first GET was cut after DROP_AT bytes; the second asked only for what was not written yet.
    first, retry = weights
    assert first.range is None and retry.range.startswith("bytes=") and retry.range.endswith("-")
    assert 0 < int(retry.range.removeprefix("bytes=").rstrip("-")) <= DROP_AT
    assert sha256(Path(path) / "model.safetensors") == hashlib.sha256(BIG).hexdigest()
    total = len(BIG) + len(hub.repos[(HUGGINGFACE, f"{ORG}/big")].files["config.json"])
    assert {p.total_bytes for p in progress if p.total_bytes} == {total}
    assert any(0 < p.done_bytes < total for p in progress)  # part way, while the retry waited
    assert progress[-1].done_bytes == total


def test_terminating_a_loading_model_stops_its_download_and_frees_the_uid(
    hub_client: Client, hub: HubStandIn
):
    hub.clear()
    outcome: dict = {}

    def launch() -> None:
        try:
            hub_client.launch("hub-slow", model_uid="slow", timeout=120)
        except grpc.RpcError as error:
            outcome["error"] = error

    launching = threading.Thread(target=launch)
    launching.start()
    deadline = time.monotonic() + 60
    while not (hub.sent_bytes and progress_of(hub_client, "slow").total_bytes):
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.05)
    loading = hub_client.get_model("slow")
    assert loading.state == models_pb2.MODEL_STATE_LOADING
    assert loading.progress.phase == "downloading" and loading.progress.total_bytes > len(BIG)
    pid = loading.worker_pid

    hub_client.terminate("slow")
    launching.join(30)
    assert outcome["error"].code() == grpc.StatusCode.CANCELLED
    assert reason(outcome["error"]) == Reason.MODEL_TERMINATED
    assert failure(lambda: hub_client.get_model("slow")).code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    # The connection went with the process: the hub's write failed, and the file stopped short.
    assert hub.wait_no_transfer(timeout=30), "the hub is still sending to a worker that is gone"
    assert hub.sent_bytes < len(BIG)


# The lifecycle around a download: watched, abandoned, refused before it starts.


def test_watch_model_shows_loading_then_ready_with_the_download_progress(hub_client: Client):
    started = hub_client.launch("hub-watched", model_uid="watched", wait=False, timeout=30)
    assert started.state == models_pb2.MODEL_STATE_LOADING
    events = list(hub_client.watch("watched", timeout=120))
    assert events[0].state == models_pb2.MODEL_STATE_LOADING
    assert events[-1].state == models_pb2.MODEL_STATE_READY
    downloading = [e.progress for e in events if e.progress.phase == "downloading" and e.progress.total_bytes]
    assert downloading, [e.progress.phase for e in events]
    done = [progress.done_bytes for progress in downloading]
    assert done == sorted(done) and 0 < done[-1] <= downloading[-1].total_bytes
    assert {"downloading", "loading weights"} <= {e.progress.phase for e in events}
    hub_client.terminate("watched")


def test_a_waiting_launch_whose_caller_leaves_mid_download_leaves_nothing(
    hub_client: Client, hub: HubStandIn, server: RunningServer
):
    hub.clear()
    folders_before = socket_folders()
    request = models_pb2.LaunchModelRequest(model_name="hub-abandoned", model_uid="abandoned")
    call = hub_client.models.LaunchModel.future(request, timeout=120)
    assert wait_until(lambda: progress_of(hub_client, "abandoned").done_bytes > 0, 60)
    pid = hub_client.get_model("abandoned").worker_pid
    call.cancel()
    assert wait_until(lambda: "abandoned" not in {m.model_uid for m in hub_client.list_models()}, 30)
    assert wait_until(lambda: not any(w["model_uid"] == "abandoned" for w in live_workers().values()))
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert wait_until(lambda: socket_folders() - folders_before == set())
    # The download stopped with its worker: the hub's write failed, short of the whole file.
    assert hub.wait_no_transfer(timeout=30), "the hub is still sending to a worker that is gone"
    assert hub.sent_bytes < len(BIG)


def test_an_engine_option_out_of_range_is_refused_before_the_hub_is_asked(
    hub_client: Client, hub: HubStandIn
):
    hub.clear()
    error = failure(
        lambda: hub_client.launch("hub-untouched", engine_options={"n_threads": 10**9}, timeout=30)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(error) == Reason.ENGINE_OPTION_INVALID
    assert hub.seen(contains="untouched") == []
    assert "hub-untouched" not in {m.model_name for m in hub_client.list_models()}


# Failures, each with its status.


@pytest.mark.parametrize("status", [401, 403])
def test_a_gated_model_is_permission_denied_naming_the_token_variable(hub_client: Client, status: int):
    error = failure(
        lambda: hub_client.launch(f"hub-gated-{status}", model_uid=f"gated-{status}", timeout=120)
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(error) == Reason.HUB_ACCESS_DENIED
    assert "HF_TOKEN" in error.details() and f"gated-{status}" in error.details()
    assert error_info(error).metadata["token_variable"] == "HF_TOKEN"
    # The load failed after its worker started: listed FAILED, with the reason, until terminated.
    failed = hub_client.get_model(f"gated-{status}")
    assert failed.state == models_pb2.MODEL_STATE_FAILED and "HF_TOKEN" in failed.error
    assert failed.condition.reason == "LoadFailed" and failed.worker_pid == 0
    hub_client.terminate(f"gated-{status}")
    assert failure(lambda: hub_client.get_model(f"gated-{status}")).code() == grpc.StatusCode.NOT_FOUND


def test_a_repository_the_hub_lacks_is_not_found(hub_client: Client):
    error = failure(lambda: download(hub_client, "hub-missing"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert reason(error) == Reason.WEIGHTS_NOT_FOUND
    assert f"{ORG}/never-uploaded" in error.details()


def test_an_unreachable_hub_is_unavailable(hub_client: Client, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    error = failure(lambda: download(hub_client, "hub-missing"))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert reason(error) == Reason.HUB_UNREACHABLE
    assert "HF_ENDPOINT" in error.details()


def test_a_disk_too_small_is_resource_exhausted_with_the_numbers_before_any_byte(
    hub_client: Client, hub: HubStandIn
):
    hub.clear()
    error = failure(lambda: download(hub_client, "hub-huge"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason(error) == Reason.INSUFFICIENT_DISK
    metadata = error_info(error).metadata
    assert int(metadata["needed_bytes"]) >= 10**15 > int(metadata["free_bytes"])
    assert f"({metadata['needed_bytes']} bytes)" in error.details()
    assert f"({metadata['free_bytes']} bytes) free" in error.details()
    assert not hub.seen("GET", "/huge/resolve/")  # sizes from the metadata only


# Offline, and local weights.


def test_offline_uses_only_the_cache_and_a_missing_file_is_failed_precondition(
    hub_client: Client, hub: HubStandIn, monkeypatch
):
    _, online = download(hub_client, "hub-offline", model_format="pytorch")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.clear()
    _, offline = download(hub_client, "hub-offline", model_format="pytorch")
    assert offline == online
    error = failure(lambda: download(hub_client, "hub-offline", model_format="ggufv2", quantization="Q4_K_M"))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(error) == Reason.WEIGHTS_MISSING
    assert "HF_HUB_OFFLINE" in error.details()
    assert hub.requests == []


def test_a_missing_model_path_is_failed_precondition(hub_client: Client, server: RunningServer):
    missing = server.allowed / "not-there"
    error = failure(lambda: hub_client.launch("hub-tiny", model_path=str(missing), timeout=120))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason(error) == Reason.WEIGHTS_MISSING


# ModelScope, and choosing the hub.


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is None, reason="modelscope is not installed")
def test_auto_falls_back_to_modelscope_when_hugging_face_lacks_the_model(
    hub_client: Client, hub: HubStandIn, hub_env: Path, tiny_files: Path
):
    hub.clear()
    progress, path = download(hub_client, "hub-both")
    assert Path(path).is_relative_to(hub_env / "modelscope")
    assert sha256(Path(path) / "model.safetensors") == sha256(tiny_files / "model.safetensors")
    assert not (Path(path) / "pytorch_model.bin").exists() and not (Path(path) / "README.md").exists()
    assert hub.seen("GET", "/api/models/llmgrpc-test/not-on-hf")  # Hugging Face was asked first
    assert hub.seen("GET", "/api/v1/models/llmgrpc-test/tiny-llama/repo?")
    assert progress[-1].done_bytes == progress[-1].total_bytes > 0

    # Asked for Hugging Face only, there is no fallback.
    error = failure(lambda: download(hub_client, "hub-both", download_hub="huggingface"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "modelscope" not in error.details().lower()


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is None, reason="modelscope is not installed")
def test_modelscope_refusing_access_is_permission_denied_naming_its_token_variable(hub_client: Client):
    error = failure(lambda: download(hub_client, "hub-modelscope-gated", download_hub="modelscope"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "MODELSCOPE_API_TOKEN" in error.details()
    assert error_info(error).metadata["hub"] == MODELSCOPE


@pytest.mark.skipif(importlib.util.find_spec("modelscope") is None, reason="modelscope is not installed")
def test_modelscope_failures_become_statuses():
    from modelscope_hub import errors

    source = downloads.ModelScopeSource(None)
    wanted = downloads.Wanted(f"{ORG}/model", patterns=downloads.PYTORCH_FILES)
    failed = errors.FileDownloadError(
        "1 file failed", failed_files={"model.safetensors": errors.NetworkError("down")}
    )
    assert source.error(failed, wanted).reason == Reason.HUB_UNREACHABLE
    assert source.error(errors.NotExistError("no such model"), wanted).reason == Reason.WEIGHTS_NOT_FOUND
    assert source.error(errors.AuthenticationError("who?"), wanted).reason == Reason.HUB_ACCESS_DENIED
    assert source.error(TypeError("a bug"), wanted) is None  # bugs stay bugs (INTERNAL)


def test_list_specs_says_whether_each_hub_can_be_used(hub_client: Client):
    (family,) = hub_client.list_specs(model_name="hub-both")
    hubs_listed = {hub.name: hub for hub in family.specs[0].hubs}
    assert hubs_listed[HUGGINGFACE].available and not hubs_listed[HUGGINGFACE].reason
    modelscope_installed = importlib.util.find_spec("modelscope") is not None
    assert hubs_listed[MODELSCOPE].available == modelscope_installed
    assert bool(hubs_listed[MODELSCOPE].reason) != modelscope_installed


def test_a_hub_the_spec_does_not_list_is_refused_before_any_worker(hub_client: Client):
    error = failure(
        lambda: hub_client.launch("hub-tiny", model_format="ggufv2", download_hub="modelscope", timeout=30)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and reason(error) == Reason.HUB_NOT_LISTED
    error = failure(lambda: hub_client.launch("hub-tiny", download_hub="gitlab", timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in bad_request(error).field_violations] == ["download_hub"]


# The pure parts.


def test_hub_order_follows_the_spec_and_skips_hubs_without_their_client():
    everything = {HUGGINGFACE: None, MODELSCOPE: None}
    assert hubs.hub_order([MODELSCOPE, HUGGINGFACE], "", everything) == [MODELSCOPE, HUGGINGFACE]
    assert hubs.hub_order([MODELSCOPE, HUGGINGFACE], "huggingface", everything) == [HUGGINGFACE]
    no_modelscope = {HUGGINGFACE: None, MODELSCOPE: "not installed"}
    assert hubs.hub_order([MODELSCOPE, HUGGINGFACE], "auto", no_modelscope) == [HUGGINGFACE]
    with pytest.raises(FailedPrecondition, match="not installed") as raised:
        hubs.hub_order([HUGGINGFACE, MODELSCOPE], "modelscope", no_modelscope)
    assert raised.value.reason == Reason.HUB_UNAVAILABLE
    with pytest.raises(InvalidArgument) as raised:
        hubs.hub_order([HUGGINGFACE], "modelscope", everything)
    assert raised.value.reason == Reason.HUB_NOT_LISTED
    with pytest.raises(FailedPrecondition) as raised:
        hubs.hub_order([], "auto", everything)
    assert raised.value.reason == Reason.WEIGHTS_MISSING


def test_a_hub_without_its_client_is_unavailable_with_the_way_to_install_it():
    def without_modelscope(module: str):
        return None if module == "modelscope" else object()

    reasons = hubs.unavailable_reasons(without_modelscope)
    assert reasons[HUGGINGFACE] is None
    assert "llmgrpc[modelscope]" in reasons[MODELSCOPE]


def test_the_disk_check_names_the_numbers(tmp_path: Path):
    downloads.check_disk(10, tmp_path, lambda folder: 10, "org/model")
    with pytest.raises(ResourceExhausted) as raised:
        downloads.check_disk(3 * 2**30, tmp_path / "not-yet", lambda folder: 2**30, "org/model")
    assert raised.value.reason == Reason.INSUFFICIENT_DISK
    assert raised.value.metadata == {
        "needed_bytes": str(3 * 2**30),
        "free_bytes": str(2**30),
        "folder": str(tmp_path / "not-yet"),
    }
    assert "3.00 GiB" in str(raised.value) and "1.00 GiB" in str(raised.value)
    assert downloads.disk_free_bytes(tmp_path / "a" / "b") > 0  # the nearest folder that exists


def test_progress_lines():
    progress = models_pb2.LoadProgress(phase="downloading", done_bytes=5 * MIB, total_bytes=20 * MIB)
    assert client_cli.progress_line(progress, width=8) == "downloading [##      ]  25% 5.0 MiB / 20.0 MiB"
    assert client_cli.progress_line(models_pb2.LoadProgress(phase="loading weights")) == "loading weights"


def test_a_lora_adapter_named_by_hub_id_is_downloaded_into_the_hubs_cache(
    hub_client: Client, hub: HubStandIn, hub_env: Path, hub_adapter: Path, tiny_files: Path
):
    """lora_modules' path as a hub id goes through the models' download path: the adapter's two
    files come from the hub into its cache, and the adapter answers as peft's merged model does."""
    hub.clear()
    module = models_pb2.LoraModule(name="from-hub", path=f"{ORG}/tiny-lora")
    hub_client.launch(TINY, model_uid="hub-lora", lora_modules=[module], timeout=240)
    try:
        fetched = sorted(r.path.rsplit("/", 1)[1] for r in hub.seen("GET", "/resolve/"))
        assert fetched == ["adapter_config.json", "adapter_model.safetensors"]  # not its README
        snapshot = next((hub_env / "hf" / "hub" / f"models--{ORG}--tiny-lora" / "snapshots").iterdir())
        assert (snapshot / "adapter_model.safetensors").is_file()
        tokens = [
            token
            for message in hub_client.generate(
                "hub-lora", "Hello there", max_tokens=8, min_tokens=8, temperature=0, adapter="from-hub"
            )
            for token in message.token_ids
        ]
        assert tokens == lora_files.peft_greedy(tiny_files, hub_adapter, "Hello there", 8)
    finally:
        hub_client.terminate("hub-lora")
