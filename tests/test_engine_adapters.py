"""The vLLM and SGLang adapters, against doubles of their APIs; and engines that cannot run here."""

from __future__ import annotations

import asyncio
import os
import sys

import grpc
import pytest
from engine_doubles import SCRIPT, FakeAsyncLLM, FakeSGLangEngine, fake_vllm_modules

from llmgrpc.clients import Client
from llmgrpc.clients.errors import FailedPrecondition, InvalidArgument, Reason
from llmgrpc.engines.base import (
    Constraint,
    FinishReason,
    GenerationRequest,
    LoadPlan,
    SamplingParams,
    SpecRef,
)
from llmgrpc.engines.catalogue import engine_info
from llmgrpc.engines.options import validate_engine_options
from llmgrpc.engines.sglang_engine import SGLangEngine
from llmgrpc.engines.vllm_engine import VllmEngine

ALL_FIELDS = SamplingParams(
    max_tokens=7,
    temperature=0.5,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    repetition_penalty=1.1,
    presence_penalty=0.2,
    frequency_penalty=0.3,
    stop=("END",),
    stop_token_ids=(9,),
    seed=42,
    ignore_eos=True,
    min_tokens=2,
    logprobs=1,
    logit_bias={7: -100.0},
)


def request(sampling: SamplingParams = ALL_FIELDS, **prompt) -> GenerationRequest:
    return GenerationRequest(request_id="req-1", sampling=sampling, **(prompt or {"prompt": "Hi"}))


def plan(device: str = "cuda:0", **options) -> LoadPlan:
    return LoadPlan(
        "m",
        "vLLM",
        SpecRef("tiny", "pytorch", "0", "none", "tiny"),
        device,
        "/tmp",
        8,
        engine_options=options,
    )


async def collect(engine, req):
    return [chunk async for chunk in engine.generate(req)]


async def first_then_leave(engine, req):
    stream = engine.generate(req)
    first = await stream.__anext__()
    await stream.aclose()
    return first


@pytest.fixture
def vllm_modules(monkeypatch):
    for name, module in fake_vllm_modules().items():
        monkeypatch.setitem(sys.modules, name, module)


def test_vllm_maps_every_sampling_field_one_to_one(vllm_modules):
    llm = FakeAsyncLLM()
    asyncio.run(collect(VllmEngine(llm, 2048, "cuda:0"), request()))
    _, params, request_id = llm.requests[0]
    assert request_id == "req-1"
    assert params.kwargs == {
        "n": 1,
        "max_tokens": 7,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.2,
        "frequency_penalty": 0.3,
        "stop": ["END"],
        "stop_token_ids": [9],
        "seed": 42,
        "ignore_eos": True,
        "min_tokens": 2,
        "skip_special_tokens": True,
        "logprobs": 1,
        "logit_bias": {7: -100.0},
        "output_kind": "DELTA",
    }


def test_vllm_streams_deltas_then_finish_and_usage(vllm_modules):
    llm = FakeAsyncLLM()
    chunks = asyncio.run(collect(VllmEngine(llm, 2048, "cuda:0"), request(prompt_token_ids=(1, 2, 3))))
    assert llm.requests[0][0] == {"prompt_token_ids": [1, 2, 3]}
    assert [t for c in chunks for t in c.token_ids] == [token for token, _ in SCRIPT]
    assert "".join(c.text for c in chunks) == "Hello, world"
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 4)
    assert llm.aborted == []


def test_vllm_aborts_a_request_its_caller_left(vllm_modules):
    llm = FakeAsyncLLM()
    engine = VllmEngine(llm, 2048, "cuda:0")
    asyncio.run(first_then_leave(engine, request()))
    assert llm.aborted == ["req-1"]
    assert engine.stats().running_requests == 0


def test_vllm_refusal_is_invalid_argument(vllm_modules):
    llm = FakeAsyncLLM(
        fail_with=ValueError("The decoder prompt (length 9000) is longer than the maximum model length")
    )
    with pytest.raises(InvalidArgument, match="longer than the maximum model length"):
        asyncio.run(collect(VllmEngine(llm, 2048, "cuda:0"), request()))


def test_vllm_on_the_cpu_takes_a_fixed_kv_cache_unless_told_its_memory(vllm_modules):
    def kv_cache_bytes(**options):
        engine = VllmEngine.load(plan("cpu", **options), "/models/x", lambda *a: None)
        return vars(engine.engine.engine_args).get("kv_cache_memory_bytes")

    assert kv_cache_bytes() == 4 * 2**30
    assert kv_cache_bytes(kv_cache_memory_bytes=2.0**28) == 2**28
    assert kv_cache_bytes(gpu_memory_utilization=0.3) is None  # vLLM sizes it from that fraction


def test_vllm_that_will_not_start_is_failed_precondition_pointing_at_its_log(vllm_modules, monkeypatch):
    def refuse(engine_args):
        raise RuntimeError("Engine core initialization failed. See root cause above.")

    monkeypatch.setattr(FakeAsyncLLM, "from_engine_args", staticmethod(refuse))
    with pytest.raises(FailedPrecondition) as raised:
        VllmEngine.load(plan("cpu"), "/models/x", lambda *a: None)
    assert raised.value.reason == Reason.ENGINE_START_FAILED
    assert "server log" in str(raised.value) and "kv_cache_memory_bytes" in str(raised.value)


def test_vllm_load_passes_engine_options_to_async_engine_args(vllm_modules):
    engine = VllmEngine.load(
        plan(tensor_parallel_size=2.0, gpu_memory_utilization=0.8, enforce_eager=True),
        "/models/x",
        lambda *a: None,
    )
    args = vars(engine.engine.engine_args)
    assert args == {
        "model": "/models/x",
        "tokenizer": "/models/x",
        "max_num_seqs": 8,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
        "enforce_eager": True,
        "structured_outputs_config": args["structured_outputs_config"],
    }
    assert args["structured_outputs_config"].backend == "guidance"  # llguidance, as on every engine
    assert engine.stats().context_length == 2048


def test_sglang_maps_every_sampling_field():
    fake = FakeSGLangEngine()
    asyncio.run(collect(SGLangEngine(fake, 4096, "cuda:0"), request()))
    call = fake.calls[0]
    # A text prompt goes as ids, its special-token spellings tokenized as text (the library
    # would read them as special tokens).
    assert call["input_ids"] == [1, ord("H"), ord("i")] and call["rid"] == "req-1"
    assert call["sampling_params"] == {
        "max_new_tokens": 7,
        "min_new_tokens": 2,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "presence_penalty": 0.2,
        "frequency_penalty": 0.3,
        "stop": ["END"],
        "stop_token_ids": [9],
        "ignore_eos": True,
        "skip_special_tokens": True,
        "sampling_seed": 42,
        "logit_bias": {"7": -100.0},
    }
    assert (call["return_logprob"], call["top_logprobs_num"], call["logprob_start_len"]) == (True, 1, -1)
    unset = SamplingParams()
    asyncio.run(collect(SGLangEngine(fake, 4096, "cuda:0"), request(unset, prompt_token_ids=(5, 6))))
    assert fake.calls[1]["input_ids"] == [5, 6]
    assert fake.calls[1]["sampling_params"]["top_k"] == -1
    assert "sampling_seed" not in fake.calls[1]["sampling_params"]


@pytest.mark.parametrize("incremental", [False, True])
def test_sglang_streams_deltas_whichever_way_it_streams(incremental: bool):
    chunks = asyncio.run(
        collect(SGLangEngine(FakeSGLangEngine(incremental=incremental), 4096, "cuda:0"), request())
    )
    assert [c.text for c in chunks] == [piece for _, piece in SCRIPT]
    assert [c.token_ids for c in chunks] == [[token] for token, _ in SCRIPT]
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 4)


def test_sglang_aborts_a_request_its_caller_left():
    fake = FakeSGLangEngine()
    asyncio.run(first_then_leave(SGLangEngine(fake, 4096, "cuda:0"), request()))
    assert fake.tokenizer_manager.aborted == ["req-1"]


def test_sglang_refusal_is_invalid_argument():
    fake = FakeSGLangEngine(fail_with=ValueError("input is longer than the context length"))
    with pytest.raises(InvalidArgument, match="context length"):
        asyncio.run(collect(SGLangEngine(fake, 4096, "cuda:0"), request()))


def test_sglang_load_passes_engine_options(monkeypatch):
    import types

    module = types.ModuleType("sglang")
    module.Engine = FakeSGLangEngine
    monkeypatch.setitem(sys.modules, "sglang", module)
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "")
    monkeypatch.delenv("SGLANG_RETURN_ORIGINAL_LOGPROB")  # and removed again after the test
    engine = SGLangEngine.load(plan(tp_size=2.0, mem_fraction_static=0.85), "/models/x", lambda *a: None)
    assert engine.engine.kwargs == {
        "model_path": "/models/x",
        "max_running_requests": 8,
        "grammar_backend": "llguidance",
        "tp_size": 2,
        "mem_fraction_static": 0.85,
    }
    assert engine.stats().context_length == 4096
    assert os.environ["SGLANG_RETURN_ORIGINAL_LOGPROB"] == "1"  # raw logprobs, as on every engine


FORMATS = [
    (
        Constraint("json_schema", '{"type": "object"}'),
        {"json": '{"type": "object"}'},
        {"json_schema": '{"type": "object"}'},
    ),
    (Constraint("regex", "[0-9]+"), {"regex": "[0-9]+"}, {"regex": "[0-9]+"}),
    (Constraint("choice", ("a", 'b"')), {"choice": ["a", 'b"']}, {"ebnf": 'start: "a" | "b\\""'}),
    (Constraint("grammar", 'start: "x"'), {"grammar": 'start: "x"'}, {"ebnf": 'start: "x"'}),
    (Constraint("json_object"), {"json_object": True}, {"json_schema": '{"type": "object"}'}),
]


@pytest.mark.parametrize("constraint, vllm_kwargs, sglang_params", FORMATS)
def test_structured_output_maps_onto_each_library(vllm_modules, constraint, vllm_kwargs, sglang_params):
    sampling = SamplingParams(constraint=constraint)
    llm = FakeAsyncLLM()
    asyncio.run(collect(VllmEngine(llm, 2048, "cuda:0"), request(sampling)))
    assert llm.requests[0][1].kwargs["structured_outputs"].kwargs == vllm_kwargs
    fake = FakeSGLangEngine()
    asyncio.run(collect(SGLangEngine(fake, 4096, "cuda:0"), request(sampling)))
    assert {k: fake.calls[0]["sampling_params"][k] for k in sglang_params} == sglang_params


def test_vllm_logprobs_and_the_matched_stop(vllm_modules):
    llm = FakeAsyncLLM(finish_reason="stop", stop_reason="END")
    chunks = asyncio.run(collect(VllmEngine(llm, 2048, "cuda:0"), request(SamplingParams(logprobs=1))))
    first = chunks[0].logprobs[0]
    assert (first.token_id, first.logprob) == (SCRIPT[0][0], -0.2)
    assert [t[0] for t in first.top] == [SCRIPT[0][0] + 101]  # rank 1 only: the sampled one is 2nd
    assert chunks[-1].stop == "END"
    eos = asyncio.run(collect(VllmEngine(FakeAsyncLLM(finish_reason="stop"), 2048, "cuda:0"), request()))
    assert eos[-1].stop == SCRIPT[-1][0]  # end-of-text: the token that ended it


@pytest.mark.parametrize("incremental", [False, True])
def test_sglang_logprobs_and_the_matched_stop(incremental: bool):
    fake = FakeSGLangEngine(incremental=incremental)
    chunks = asyncio.run(collect(SGLangEngine(fake, 4096, "cuda:0"), request(SamplingParams(logprobs=2))))
    logprobs = [entry for chunk in chunks for entry in chunk.logprobs]
    assert [entry.token_id for entry in logprobs] == [token for token, _ in SCRIPT]
    assert [t[0] for t in logprobs[0].top] == [SCRIPT[0][0] + 1, SCRIPT[0][0]]
    assert chunks[-1].stop == "END"


def test_library_engines_tokenize_truncate_and_detokenize(vllm_modules):
    llm = FakeAsyncLLM()
    engine = VllmEngine(llm, 2048, "cuda:0")
    tokens = asyncio.run(engine.tokenize("Hi"))
    assert (tokens.token_ids, tokens.tokens) == ([1, ord("H"), ord("i")], ["<s>", "H", "i"])
    assert asyncio.run(engine.detokenize(tokens.token_ids)) == "Hi"
    with pytest.raises(InvalidArgument) as raised:
        asyncio.run(engine.detokenize([10**6]))
    assert raised.value.violations[0].field == "token_ids"
    asyncio.run(collect(engine, request(SamplingParams(truncate_prompt_tokens=2), prompt="abc")))
    assert llm.requests[0][0] == {"prompt_token_ids": [ord("b"), ord("c")]}
    asyncio.run(collect(engine, request(SamplingParams(), prompt="abc", parse_special_tokens=True)))
    assert llm.requests[1][0] == "abc"  # the library reads special tokens itself, as asked
    fake = FakeSGLangEngine()
    asyncio.run(
        collect(SGLangEngine(fake, 4096, "cuda:0"), request(SamplingParams(truncate_prompt_tokens=2)))
    )
    assert fake.calls[0]["input_ids"] == [ord("H"), ord("i")]


@pytest.mark.skipif(
    "vllm" in sys.modules or "sglang" in sys.modules, reason="an engine library is imported here"
)
def test_engines_missing_here_are_listed_with_why_and_refused(client: Client):
    engines = {e.name: e for e in client.list_specs(model_name="tiny-llama-3.1")[0].specs[0].engines}
    for name, extra in (("vLLM", "llmgrpc[vllm]"), ("SGLang", "llmgrpc[sglang]")):
        assert not engines[name].available
        assert extra in engines[name].reason
        with pytest.raises(grpc.RpcError) as error:
            client.launch("tiny-llama-3.1", model_engine=name)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert extra in error.value.details()
    # The server (in this process) checked all that without importing either library.
    assert "vllm" not in sys.modules and "sglang" not in sys.modules
    # What the project has not proven about an adapter is said, whether or not it can run here.
    assert "not yet run by this project" in engines["SGLang"].support_note
    assert engines["Transformers"].support_note == ""


def test_vllm_ray_address_runs_the_workers_on_that_ray_cluster():
    from llmgrpc.engines.vllm_engine import engine_args, process_environment

    ray = plan("cuda:0", ray_address="10.0.0.1:6379", pipeline_parallel_size=2.0)
    args = engine_args(ray, "/models/x")
    assert "ray_address" not in args
    assert args["distributed_executor_backend"] == "ray" and args["pipeline_parallel_size"] == 2
    assert process_environment(ray, {}, {0, 1}) == {"RAY_ADDRESS": "10.0.0.1:6379"}
    # A contradicting backend never reaches engine_args: the server's one check refuses it.
    with pytest.raises(InvalidArgument) as refused:
        validate_engine_options(
            engine_info("vllm"), {"ray_address": "10.0.0.1:6379", "distributed_executor_backend": "mp"}
        )
    assert refused.value.violations[0].field == "engine_options.distributed_executor_backend"


def test_vllm_workers_on_the_cpu_share_the_hosts_cores_unless_the_operator_binds_them():
    from llmgrpc.engines.vllm_engine import process_environment

    bind = "VLLM_CPU_OMP_THREADS_BIND"
    assert process_environment(plan("cpu", tensor_parallel_size=2), {}, range(8)) == {bind: "0,1,2,3|4,5,6,7"}
    assert process_environment(plan("cpu", pipeline_parallel_size=2), {}, {3, 1}) == {bind: "1|3"}
    assert process_environment(plan("cpu", tensor_parallel_size=4), {}, {0, 1}) == {bind: "nobind"}
    # One worker, the operator's binding, Ray's nodes (each binds its own) or a GPU: left alone.
    assert process_environment(plan("cpu"), {}, {0, 1}) == {}
    assert process_environment(plan("cpu", tensor_parallel_size=2), {bind: "0|1"}, {0, 1}) == {}
    on_ray = plan("cpu", pipeline_parallel_size=2, distributed_executor_backend="ray")
    assert process_environment(on_ray, {}, {0, 1}) == {}
    assert process_environment(plan("cuda:0", tensor_parallel_size=2), {}, {0, 1}) == {}
