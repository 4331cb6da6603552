"""vLLM really running: the tiny model on a CPU build of vLLM in its own virtual environment,
driven through the gRPC service (`make test-vllm`, which builds it with `make vllm-cpu`).

The server runs here; the model's worker runs on the vLLM environment's interpreter
(settings.worker_python). Skipped unless LLMGRPC_TEST_VLLM_PYTHON names that interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import jsonschema
import lora_files
import pytest
from conftest import TINY, RunningServer
from fleet import ServeProcess
from ray_cluster import RayCluster
from rpc_helpers import rpc_error, wait_until
from test_structured_output import SCHEMA

from llmgrpc.clients import Client
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import models_pb2

VLLM_PYTHON = os.environ.get("LLMGRPC_TEST_VLLM_PYTHON", "")

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not (VLLM_PYTHON and Path(VLLM_PYTHON).exists()),
        reason="no vLLM environment: run `make test-vllm` (LLMGRPC_TEST_VLLM_PYTHON names its python)",
    ),
]

VLLM_UID = "tiny-on-vllm"
TRANSFORMERS_UID = "tiny-on-transformers"
# float32 like the Transformers engine on the CPU, so greedy decoding can be compared token
# for token; a 256 MiB KV cache (the tiny model needs 2 KiB per token).
VLLM_OPTIONS = {"dtype": "float32", "kv_cache_memory_bytes": 256 * 2**20, "max_model_len": 16384}
# A stream long enough to be still decoding while the test looks: vLLM decodes the tiny model
# at thousands of tokens per second, faster than a client reads them.
LONG = 15000
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time"
# How vLLM titles its model worker processes (VLLM::Worker_TP0, VLLM::Worker_PP1, ...).
MODEL_WORKER_TITLE = b"VLLM::Worker"
# And on Ray, where each is an actor of vLLM's Ray executor.
RAY_MODEL_WORKER_TITLE = b"ray::RayWorkerProc"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, cache_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    lora_files.good_adapters(cache_dir, folder)
    return folder


@pytest.fixture(scope="module")
def server(cache_dir: Path, adapter_dir: Path) -> Iterator[RunningServer]:
    settings = Settings(
        port=0,
        cache_dir=cache_dir,
        device="cpu",
        worker_python={"vLLM": VLLM_PYTHON},
        max_running_requests=16,
        allowed_model_dirs=[adapter_dir],
    )
    server = RunningServer(settings)
    try:
        with Client(server.endpoint) as client:
            client.launch(
                TINY, model_engine="vLLM", model_uid=VLLM_UID, engine_options=VLLM_OPTIONS, timeout=900
            )
            client.launch(TINY, model_engine="Transformers", model_uid=TRANSFORMERS_UID, timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with Client(server.endpoint) as client:
        yield client


def token_ids(client: Client, model_uid: str, prompt: str, **sampling) -> list[int]:
    return [token for piece in client.generate(model_uid, prompt, **sampling) for token in piece.token_ids]


def requests_in_vllm(server: RunningServer) -> int:
    """The requests vLLM itself still holds (AsyncLLM's unfinished requests)."""
    return server.engine_stats(VLLM_UID).running_requests


def wait_until_vllm_is_idle(server: RunningServer, within_s: float = 30.0) -> int:
    """Poll until vLLM holds no request; return what it held last."""
    deadline = time.monotonic() + within_s
    held = requests_in_vllm(server)
    while held and time.monotonic() < deadline:
        time.sleep(0.05)
        held = requests_in_vllm(server)
    return held


def test_the_model_runs_in_the_vllm_environment(client: Client):
    model = client.get_model(VLLM_UID)
    assert model.model_engine == "vLLM"
    command_line = Path(f"/proc/{model.worker_pid}/cmdline").read_bytes().split(b"\0")
    assert os.fsdecode(command_line[0]) == VLLM_PYTHON
    assert model.context_length == VLLM_OPTIONS["max_model_len"]
    engines = {e.name: e for e in client.list_specs(model_name=TINY)[0].specs[0].engines}
    assert engines["vLLM"].available, engines["vLLM"].reason
    assert "built for the CPU" in engines["vLLM"].support_note


def test_greedy_tokens_equal_the_transformers_engine(client: Client):
    sampling = {"max_tokens": 48, "temperature": 0, "ignore_eos": True}
    on_vllm = list(client.generate(VLLM_UID, PROMPT, **sampling))
    on_transformers = list(client.generate(TRANSFORMERS_UID, PROMPT, **sampling))
    assert [t for p in on_vllm for t in p.token_ids] == [t for p in on_transformers for t in p.token_ids]
    assert "".join(p.text for p in on_vllm) == "".join(p.text for p in on_transformers)
    assert on_vllm[-1].usage.prompt_tokens == on_transformers[-1].usage.prompt_tokens
    assert on_vllm[-1].usage.completion_tokens == 48
    assert len(on_vllm) > 1  # streamed as it decodes, not in one piece


def test_vllms_prefix_cache_serves_a_shared_prefix_and_says_so(client: Client):
    prefix = [20 + (13 * n) % 600 for n in range(600)]
    sampling = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    list(client.generate(VLLM_UID, [*prefix, 30], **sampling))
    *_, last = client.generate(VLLM_UID, [*prefix, 31, 32], **sampling)
    # vLLM caches whole blocks: most of the shared 600 tokens, at least.
    assert 300 <= last.usage.cached_prompt_tokens <= 600


def test_structured_output_holds_for_20_seeds(client: Client):
    schema = SCHEMA
    for seed in range(20):
        sampling = {"max_tokens": 200, "temperature": 1.0, "seed": seed}
        pieces = list(
            client.generate(VLLM_UID, PROMPT, structured_output={"regex": "[0-9]{3}-[0-9]{4}"}, **sampling)
        )
        assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", "".join(p.text for p in pieces))
        pieces = list(
            client.generate(
                VLLM_UID, PROMPT, structured_output={"json_schema": json.dumps(schema)}, **sampling
            )
        )
        jsonschema.validate(json.loads("".join(p.text for p in pieces)), schema)
    with pytest.raises(grpc.RpcError) as raised:
        list(client.generate(VLLM_UID, PROMPT, structured_output={"regex": "[0-9"}))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_logprobs_and_tokenize_agree_with_the_transformers_engine(client: Client):
    sampling = {"max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 3}
    on_vllm = [e for p in client.generate(VLLM_UID, PROMPT, **sampling) for e in p.logprobs]
    on_transformers = [e for p in client.generate(TRANSFORMERS_UID, PROMPT, **sampling) for e in p.logprobs]
    for a, b in zip(on_vllm, on_transformers, strict=True):
        assert a.token_id == b.token_id == a.top_logprobs[0].token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    tokens = client.tokenize(VLLM_UID, PROMPT)
    assert list(tokens.token_ids) == list(client.tokenize(TRANSFORMERS_UID, PROMPT).token_ids)
    assert client.detokenize(VLLM_UID, list(tokens.token_ids)) == PROMPT


def test_seeded_sampling_is_reproducible(client: Client):
    sampling = {"max_tokens": 24, "temperature": 1.0, "top_p": 0.95, "ignore_eos": True}
    first = token_ids(client, VLLM_UID, PROMPT, seed=1234, **sampling)
    again = token_ids(client, VLLM_UID, PROMPT, seed=1234, **sampling)
    other = token_ids(client, VLLM_UID, PROMPT, seed=4321, **sampling)
    assert first == again
    assert first != other


def test_a_cancelled_stream_is_aborted_in_vllm(server: RunningServer, client: Client):
    stream = client.generate(VLLM_UID, PROMPT, max_tokens=LONG, temperature=0, ignore_eos=True)
    received = [next(stream) for _ in range(3)]
    assert all(piece.token_ids for piece in received)
    assert requests_in_vllm(server) == 1  # vLLM is decoding it now
    stream.cancel()
    assert wait_until_vllm_is_idle(server) == 0
    # and the engine serves the next request as before
    assert len(token_ids(client, VLLM_UID, "Hello", max_tokens=4, temperature=0, ignore_eos=True)) == 4


def test_a_passed_deadline_aborts_the_request_in_vllm(server: RunningServer, client: Client):
    error = rpc_error(
        client.generate, VLLM_UID, PROMPT, max_tokens=LONG, temperature=0, ignore_eos=True, timeout=0.5
    )
    assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until_vllm_is_idle(server) == 0


def test_two_concurrent_streams_are_decoded_together(server: RunningServer, client: Client):
    long_stream = client.generate(VLLM_UID, PROMPT, max_tokens=LONG, temperature=0, ignore_eos=True)
    long_tokens: list[int] = []

    def read_long() -> None:  # read as it comes, as a client does
        with contextlib.suppress(grpc.RpcError):  # cancelled below
            for piece in long_stream:
                long_tokens.extend(piece.token_ids)

    reader = threading.Thread(target=read_long)
    reader.start()
    try:
        while not long_tokens:  # vLLM is decoding the long stream now
            time.sleep(0.001)
        short = token_ids(client, VLLM_UID, "Hello", max_tokens=64, temperature=0, ignore_eos=True)
        long_still_running = requests_in_vllm(server)
        long_read_so_far = len(long_tokens)
    finally:
        long_stream.cancel()
        reader.join(timeout=60)
    assert len(short) == 64
    assert long_still_running == 1 and long_read_so_far < LONG  # served beside the long one, not after it
    assert client.get_model(VLLM_UID).peak_batch_size >= 2
    assert wait_until_vllm_is_idle(server) == 0


@pytest.mark.parametrize("parallel", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_two_parallel_workers_serve_the_same_greedy_tokens_as_one(
    server: RunningServer, client: Client, parallel
):
    """The model sharded over two of vLLM's CPU workers (tensor parallel: each holds half of
    every layer's heads; pipeline parallel: each holds one of its two layers) decodes as one does."""
    uid = f"tiny-{parallel}-2"
    sampling = {"max_tokens": 48, "temperature": 0, "ignore_eos": True}
    client.launch(
        TINY, model_engine="vLLM", model_uid=uid, engine_options={**VLLM_OPTIONS, parallel: 2}, timeout=900
    )
    try:
        worker = client.get_model(uid).worker_pid
        model_workers = [
            pid for pid in live_processes_in_group(worker) if MODEL_WORKER_TITLE in process_arguments(pid)
        ]
        assert len(model_workers) == 2  # vLLM's two model workers, started by the model's worker
        assert token_ids(client, uid, PROMPT, **sampling) == token_ids(client, VLLM_UID, PROMPT, **sampling)
    finally:
        client.terminate(uid)


@pytest.fixture
def ray_cluster(tmp_path: Path) -> Iterator[RayCluster]:
    """Two hosts (network namespaces on a bridge of the test's own), a Ray node on each."""
    ray = Path(VLLM_PYTHON).with_name("ray")
    if not ray.exists():
        pytest.skip("Ray is not installed in the vLLM environment (make vllm-cpu installs it)")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (the ip command)")
    cluster = RayCluster(ray, tmp_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_across_two_ray_hosts_each_runs_one_pipeline_stage(
    client: Client, ray_cluster: RayCluster, cache_dir
):
    """vLLM's Ray executor: llmgrpc serves on the Ray head's host, the launch names the cluster
    (ray_address), and vLLM places one of the model's two pipeline stages on each Ray node."""
    head = ray_cluster.head
    command = ["ip", "netns", "exec", head.namespace, str(Path(sys.executable).with_name("llmgrpc")), "serve"]
    command += ["--host", head.address, "--port", "50051", "--cache-dir", str(cache_dir), "--device", "cpu"]
    environment = {**os.environ, "LLMGRPC_WORKER_PYTHON": json.dumps({"vLLM": VLLM_PYTHON})}
    sampling = {"max_tokens": 48, "temperature": 0, "ignore_eos": True}
    with ServeProcess(command + ["--log-format", "text"], environment) as serve:
        assert wait_until(lambda: "grpc" in serve.addresses or serve.process.poll() is not None, 120)
        endpoint = serve.addresses.get("grpc", "")
        assert endpoint, serve.log()
        # Straight to the head's host, never through a proxy set in the environment.
        with grpc.insecure_channel(endpoint, options=[("grpc.enable_http_proxy", 0)]) as channel:
            on_ray = Client(endpoint, channel=channel)
            options = {**VLLM_OPTIONS, "pipeline_parallel_size": 2, "ray_address": ray_cluster.address}
            try:
                on_ray.launch(
                    TINY, model_engine="vLLM", model_uid="tiny-on-ray", engine_options=options, timeout=900
                )
            except grpc.RpcError as error:
                pytest.fail(f"{error.details()}\n{serve.log(120)}")

            def stages() -> dict[str, int]:
                """vLLM's model workers on each host."""
                return {
                    host.address: sum(
                        RAY_MODEL_WORKER_TITLE in arguments for arguments in ray_cluster.arguments(host)
                    )
                    for host in ray_cluster.hosts
                }

            assert stages() == {host.address: 1 for host in ray_cluster.hosts}, serve.log()
            tokens = token_ids(on_ray, "tiny-on-ray", PROMPT, **sampling)
            assert tokens == token_ids(client, VLLM_UID, PROMPT, **sampling)
            on_ray.terminate("tiny-on-ray")
            # The model's worker was Ray's driver: Ray ends the model workers on every node.
            assert wait_until(lambda: not any(stages().values()), 60), stages()


def process_arguments(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def live_processes_in_group(group_id: int) -> list[int]:
    """Processes (not zombies) whose process group is group_id, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _parent, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # gone while listed
        if int(group) == group_id and state != "Z":
            members.append(int(stat.parent.name))
    return members


def test_terminating_the_model_ends_every_process_vllm_started(client: Client):
    worker = client.get_model(VLLM_UID).worker_pid
    started = live_processes_in_group(worker)
    assert worker in started and len(started) >= 3  # the worker, vLLM's engine core and its worker
    client.terminate(VLLM_UID)
    deadline = time.monotonic() + 30
    while live_processes_in_group(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert live_processes_in_group(worker) == []


def test_a_kv_cache_larger_than_memory_is_refused_before_vllm_starts(client: Client):
    error = rpc_error(
        client.launch,
        TINY,
        model_engine="vLLM",
        model_uid="too-big",
        engine_options={**VLLM_OPTIONS, "kv_cache_memory_bytes": 2**50},
    )
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "needs about" in error.details()
    assert all(model.model_uid != "too-big" for model in client.list_models())


def test_chat_on_vllm_renders_the_models_own_template(client: Client, cache_dir: Path):
    """The same messages give the same prompt ids on vLLM as Hugging Face's apply_chat_template."""
    instruct = "tiny-llama-3.1-instruct"
    client.launch(
        instruct, model_engine="vLLM", model_uid="chat-on-vllm", engine_options=VLLM_OPTIONS, timeout=900
    )
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cache_dir / instruct / "pytorch")
        messages = [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Name a colour."},
        ]
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        *_, last = client.chat("chat-on-vllm", messages, max_tokens=2, temperature=0)
        assert last.usage.prompt_tokens == len(expected)
    finally:
        client.terminate("chat-on-vllm")


def test_twelve_concurrent_streams_over_base_and_two_peft_adapters_each_equal_peft_alone(
    client: Client, adapter_dir: Path, cache_dir: Path
):
    """vLLM's own LoRA (enable_lora, a LoRARequest per request) over the same PEFT adapters as the
    other engines: 4 streams each on the base, A and B at once, each the tokens peft's merged
    model generates alone."""
    names = ("tiny-lora-a", "tiny-lora-b")
    uid = "tiny-lora-on-vllm"
    client.launch(
        TINY,
        model_engine="vLLM",
        model_uid=uid,
        engine_options=VLLM_OPTIONS,
        lora_modules=[models_pb2.LoraModule(name=name, path=str(adapter_dir / name)) for name in names],
        timeout=900,
    )
    try:
        base = lora_files.base_files(cache_dir)
        prompts = ["Hello there", "The quick brown fox jumps over the lazy dog", "1 2 3"]
        count = 12
        jobs = [(adapter, prompts[i % len(prompts)]) for adapter in ("", *names) for i in range(4)]
        expected = {
            job: lora_files.peft_greedy(base, adapter_dir / job[0] if job[0] else None, job[1], count)
            for job in set(jobs)
        }

        def greedy(job: tuple[str, str]) -> list[int]:
            adapter, prompt = job
            return token_ids(
                client, uid, prompt, max_tokens=count, min_tokens=count, temperature=0, adapter=adapter
            )

        with ThreadPoolExecutor(len(jobs)) as pool:
            outputs = list(pool.map(greedy, jobs))
        for job, tokens in zip(jobs, outputs, strict=True):
            assert tokens == expected[job], job
        assert expected[("tiny-lora-a", prompts[0])] != expected[("", prompts[0])]
        assert {a.name: a.rank for a in client.list_adapters(uid)} == dict.fromkeys(names, 8)
        error = rpc_error(lambda: list(client.generate(uid, "Hi", max_tokens=2, adapter="nope")))
        assert error.code() == grpc.StatusCode.NOT_FOUND and "tiny-lora-a" in error.details()
    finally:
        client.terminate(uid)
