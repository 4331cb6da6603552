"""Malformed input is the caller's or the operator's to fix: INVALID_ARGUMENT or
FAILED_PRECONDITION saying what is wrong, never INTERNAL (kept for bugs), and never a
sampling that quietly turns to NaN."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TINY
from rpc_helpers import collect, rpc_error
from status_details import bad_request, reason

from llmgrpc.clients import Client
from llmgrpc.clients.errors import FailedPrecondition, InvalidArgument, Reason
from llmgrpc.engines import model_folder
from llmgrpc.engines.base import LoadPlan, SamplingParams, SpecRef
from llmgrpc.engines.catalogue import ENGINES, engine_info
from llmgrpc.engines.options import validate_engine_options
from llmgrpc.engines.sampling import Sampler
from llmgrpc.server import logs
from llmgrpc.worker.service import Worker
from llmgrpc.worker.v1 import worker_pb2, worker_pb2_grpc

# Engine options.


@pytest.mark.parametrize(
    "options, valid",
    [
        ({"n_threads": 1e18}, "[1, 1024]"),
        ({"n_threads": -2}, "[1, 1024]"),
        ({"n_threads": 1.5}, "[1, 1024]"),
        ({"context_length": 1e300}, "[2, 16777216]"),
        ({"dtype": "int8"}, "auto, float32, bfloat16, float16"),
        ({"decode": "fast"}, "plain, static, compiled"),
    ],
)
def test_an_engine_option_out_of_range_is_invalid_and_says_the_range(client: Client, options, valid):
    error = rpc_error(client.launch, TINY, model_engine="transformers", engine_options=options, timeout=120)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert reason(error) == Reason.ENGINE_OPTION_INVALID
    name = next(iter(options))
    assert f"engine_options.{name}" in error.details() and valid in error.details()
    assert not re.search(r"\d{20}", error.details()), "a huge number is echoed digit by digit"


def test_an_engines_rules_between_its_options_refuse_the_launch_before_any_worker(client: Client):
    options = {"decode": "static", "attn_implementation": "eager"}
    error = rpc_error(client.launch, TINY, model_engine="transformers", engine_options=options, timeout=120)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert reason(error) == Reason.ENGINE_OPTION_INVALID
    assert "engine_options.decode static and compiled need attn_implementation sdpa" in error.details()


def test_an_engines_option_rules_follow_the_device_the_launch_runs_on():
    transformers = engine_info("transformers")
    transformers.check_option_rules({"attn_implementation": "eager"}, "cpu")  # decode plain by default
    with pytest.raises(InvalidArgument) as caught:
        transformers.check_option_rules({"attn_implementation": "eager"}, "cuda")  # decode compiled
    assert caught.value.reason == Reason.ENGINE_OPTION_INVALID
    assert "(decode compiled is the default on cuda)" in str(caught.value)
    assert [v.field for v in caught.value.violations] == ["engine_options.attn_implementation"]
    assert engine_info("vllm").runs_across_hosts({"ray_address": "10.0.0.1:6379"})
    assert not engine_info("llama.cpp").runs_across_hosts({"n_threads": 2})


def test_a_llamacpp_thread_count_beyond_32_bits_is_refused_not_wrapped(client: Client):
    pytest.importorskip("llama_cpp")
    error = rpc_error(
        client.launch,
        TINY,
        model_engine="llama.cpp",
        model_format="ggufv2",
        quantization="F32",
        engine_options={"n_threads": 2**32 + 4},
        timeout=120,
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert reason(error) == Reason.ENGINE_OPTION_INVALID
    assert "n_threads" in error.details() and "4.29497e+09" in error.details()


def test_the_llamacpp_engine_refuses_a_wrapping_thread_count_itself(tmp_path: Path):
    """Defence in depth: a plan that reached a worker unchecked still never wraps in ctypes."""
    llamacpp_engine = pytest.importorskip("llmgrpc.engines.llamacpp_engine")
    spec = SpecRef(TINY, "ggufv2", "0_002", "F32", "m")
    plan = LoadPlan("x", "llama.cpp", spec, "cpu", str(tmp_path), 1, engine_options={"n_threads": 2**32 + 4})
    with pytest.raises(InvalidArgument, match="n_threads"):
        llamacpp_engine.LlamaCppEngine.load(plan, str(tmp_path / "absent.gguf"), lambda *progress: None)


def test_every_declared_option_has_a_valid_value_and_a_range_or_choices():
    for info in ENGINES:
        for option in info.options:
            if option.kind in (int, float):
                assert option.minimum is not None and option.maximum is not None, (info.name, option.name)
            if option.choices:
                validate_engine_options(info, {option.name: option.choices[0]})


@pytest.mark.parametrize(
    "engine, options",
    [
        ("vllm", {"gpu_memory_utilization": 0}),
        ("vllm", {"gpu_memory_utilization": 1.5}),
        ("vllm", {"kv_cache_memory_bytes": 1e300}),
        ("sglang", {"tp_size": 0}),
        ("llama.cpp", {"n_gpu_layers": -2}),
        ("llama.cpp", {"kv_cache_type": "q8_0"}),
        ("transformers", {"trust_remote_code": 1}),
        ("transformers", {"n_threads": "4"}),
    ],
)
def test_each_engine_refuses_values_out_of_its_declared_range(engine, options):
    with pytest.raises(InvalidArgument) as caught:
        validate_engine_options(engine_info(engine), options)
    assert caught.value.reason == Reason.ENGINE_OPTION_INVALID
    assert f"engine_options.{next(iter(options))} must be" in str(caught.value)
    assert len(str(caught.value)) < 200


def test_an_option_that_implies_another_refuses_a_contradicting_value():
    vllm = engine_info("vllm")
    validate_engine_options(vllm, {"ray_address": "10.0.0.1:6379", "distributed_executor_backend": "ray"})
    with pytest.raises(InvalidArgument) as caught:
        validate_engine_options(vllm, {"ray_address": "10.0.0.1:6379", "distributed_executor_backend": "mp"})
    assert caught.value.reason == Reason.ENGINE_OPTION_INVALID
    assert "ray_address means distributed_executor_backend ray" in str(caught.value)
    assert [v.field for v in caught.value.violations] == ["engine_options.distributed_executor_backend"]


def test_values_at_the_ends_of_the_ranges_are_accepted():
    validate_engine_options(engine_info("vllm"), {"gpu_memory_utilization": 1, "tensor_parallel_size": 1.0})
    validate_engine_options(engine_info("llama.cpp"), {"n_gpu_layers": -1, "n_threads": 1024})


# Local model folders.


@pytest.fixture
def folder_server(start_server, tmp_path: Path):
    """A server that takes model_path inside tmp_path/models."""
    allowed = tmp_path / "models"
    allowed.mkdir()
    return start_server(device="cpu", allowed_model_dirs=[allowed]), allowed


def _copy_of_tiny(tiny_files: Path, allowed: Path) -> Path:
    folder = allowed / "tiny"
    shutil.copytree(tiny_files, folder)
    return folder


def _launch_folder(server, folder: Path) -> grpc.RpcError:
    with Client(server.endpoint) as other:
        return rpc_error(other.launch, TINY, model_engine="transformers", model_path=str(folder), timeout=300)


@pytest.mark.parametrize(
    "break_folder, file_name, what",
    [
        (lambda folder: (folder / "config.json").unlink(), "config.json", "does not exist"),
        (lambda folder: (folder / "config.json").write_text("{not json"), "config.json", "not JSON"),
        (
            lambda folder: (folder / "config.json").write_text(
                json.dumps({**json.loads((folder / "config.json").read_text()), "num_attention_heads": 0})
            ),
            "config.json",
            "num_attention_heads is 0",
        ),
        (lambda folder: (folder / "tokenizer.json").write_text("[1, 2"), "tokenizer.json", "not JSON"),
    ],
    ids=["no-config", "config-not-json", "zero-heads", "tokenizer-not-json"],
)
def test_a_broken_model_folder_is_a_failed_precondition_naming_the_file(
    folder_server, tiny_files: Path, break_folder, file_name: str, what: str
):
    server, allowed = folder_server
    folder = _copy_of_tiny(tiny_files, allowed)
    break_folder(folder)
    error = _launch_folder(server, folder)
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert reason(error) == Reason.MODEL_FILES_INVALID
    assert file_name in error.details() and what in error.details()


def test_read_model_config_refuses_what_is_not_a_config(tmp_path: Path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(FailedPrecondition, match="it holds an array, not a JSON object"):
        model_folder.read_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": -4096}))
    with pytest.raises(FailedPrecondition, match="hidden_size is -4096"):
        model_folder.read_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 1e300}))
    with pytest.raises(FailedPrecondition, match="num_hidden_layers") as caught:
        model_folder.read_model_config(tmp_path)
    assert not re.search(r"\d{30}", str(caught.value))
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(FailedPrecondition, match="not a regular file"):
        model_folder.read_model_config(tmp_path)


def test_read_model_config_keeps_a_config_of_another_architecture(tmp_path: Path):
    config = {"model_type": "t5", "d_model": 512, "num_heads": 8, "head_dim": None, "text_config": {}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_folder.read_model_config(tmp_path) == config
    model_folder.check_tokenizer_files(tmp_path)  # none present: nothing to refuse


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_named_config_json_is_refused_without_blocking(tmp_path: Path):
    os.mkfifo(tmp_path / "config.json")
    outcome: list[BaseException] = []
    reader = threading.Thread(target=lambda: _catch(outcome, model_folder.read_model_config, tmp_path))
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():  # unblock the reader before failing
        with open(tmp_path / "config.json", "w"):
            pass
        pytest.fail("reading a FIFO named config.json blocked")
    assert isinstance(outcome[0], FailedPrecondition) and "not a regular file" in str(outcome[0])


def _catch(outcome: list, function, *args) -> None:
    try:
        function(*args)
    except BaseException as error:
        outcome.append(error)


# Sampling parameters at the edge of float32.


def test_a_temperature_near_zero_samples_greedily():
    # Divided by 1e-38, these overflow float32: inf - inf was NaN, and NaN drew the last id.
    logits = np.array([1.0, 30.0, 20.0, -10.0], dtype=np.float32)
    for temperature in (1e-38, 1e-6):
        sampler = Sampler(SamplingParams(temperature=temperature, seed=3), [])
        assert [sampler.sample(logits) for _ in range(5)] == [1] * 5


def test_a_tiny_repetition_penalty_gives_no_nan():
    logits = np.array([1.0, 3.0, 2.0, -1.0, 0.5], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=1.0, repetition_penalty=1e-45, seed=3), [0, 2])
    # Seen tokens with positive logits become as likely as can be: never the last id by NaN.
    assert {sampler.sample(logits) for _ in range(20)} <= {0, 1, 2}


def test_a_huge_logit_over_a_small_temperature_is_still_sampled():
    logits = np.array([3e38, 1e38, -3e38], dtype=np.float32)
    sampler = Sampler(SamplingParams(temperature=1e-4, seed=3), [])
    assert sampler.sample(logits) == 0


def test_extreme_sampling_parameters_through_the_service(client: Client, tiny):
    prompt = [1, 400, 500, 600]
    greedy, _, _ = collect(client.generate("tiny", prompt, max_tokens=8, temperature=0, ignore_eos=True))
    cold, _, _ = collect(client.generate("tiny", prompt, max_tokens=8, temperature=1e-38, ignore_eos=True))
    assert cold == greedy
    penalized, _, _ = collect(
        client.generate(
            "tiny", prompt, max_tokens=8, temperature=1.0, repetition_penalty=1e-45, seed=5, ignore_eos=True
        )
    )
    # Every token seen (prompt or output) outweighs the rest: each output is one of them.
    seen = set(prompt)
    for token in penalized:
        assert token in seen, f"{token} was not seen before: {penalized}"
        seen.add(token)


# JSON nested deeper than Python's parser goes: json.loads raises RecursionError, not a ValueError.
DEEP_OBJECT = '{"a": ' * 5000 + "1" + "}" * 5000
DEEP_ARRAY = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"structured_output": {"json_schema": DEEP_OBJECT}}, "structured_output.json_schema"),
        ({"structured_output": {"json_schema": DEEP_ARRAY}}, "structured_output.json_schema"),
        # Deep, yet within the parser: past the bound, where jsonschema and templates recurse.
        (
            {"structured_output": {"json_schema": '{"a": ' * 200 + "1" + "}" * 200}},
            "structured_output.json_schema",
        ),
    ],
)
def test_deeply_nested_json_is_invalid_argument_naming_the_field(client: Client, tiny, fields, field):
    error = rpc_error(lambda: list(client.generate("tiny", "Hi", max_tokens=2, timeout=60, **fields)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert [v.field for v in bad_request(error).field_violations] == [field]
    assert "nested more than 64 deep" in error.details()


def test_deep_tool_parameters_are_refused_before_jsonschema_recurses(client: Client, tiny):
    parameters = json.dumps(
        nested_schema(120)
    )  # JSON 241 deep: jsonschema's check recurses past Python's limit
    error = rpc_error(
        lambda: list(
            client.chat(
                "tiny", [{"role": "user", "content": "hi"}], tools=[{"name": "t", "parameters": parameters}]
            )
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert [v.field for v in bad_request(error).field_violations] == ["tools[0].parameters"]


def nested_schema(depth: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


# Worker-side logs.


def test_a_worker_logs_an_unexpected_load_error_with_the_servers_request_id(tmp_path: Path, monkeypatch):
    """The server sends its call's request id to the worker: the worker's traceback carries it,
    so the operator can match it to the server's log line of the call."""
    plan = LoadPlan(
        "broken", "Transformers", SpecRef("m", "pytorch", "1", "none", "m"), "cpu", str(tmp_path), 1
    )

    def resolve_with_a_bug(plan, report):
        raise RuntimeError("a bug while resolving weights")

    monkeypatch.setattr("llmgrpc.worker.service.weights.resolve", resolve_with_a_bug)
    stream = io.StringIO()
    handler = logs.handler("json", stream)
    root = logging.getLogger()
    root.addHandler(handler)

    async def scenario() -> grpc.StatusCode:
        server = grpc.aio.server()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(Worker(plan), server)
        socket = tmp_path / "worker.sock"
        server.add_insecure_port(f"unix:{socket}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
                load = worker_pb2_grpc.WorkerServiceStub(channel).Load
                try:
                    request, metadata = worker_pb2.LoadRequest(), (("x-request-id", "launch-42"),)
                    [event async for event in load(request, metadata=metadata)]
                except grpc.aio.AioRpcError as error:
                    return error.code()
                return grpc.StatusCode.OK
        finally:
            await server.stop(0)

    try:
        code = asyncio.run(scenario())
    finally:
        root.removeHandler(handler)
    assert code == grpc.StatusCode.INTERNAL
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (failure,) = [line for line in lines if "a bug while resolving weights" in line.get("exception", "")]
    assert failure["request_id"] == "launch-42"
