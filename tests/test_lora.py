"""LoRA adapters on the Transformers engine, through the gRPC service: peft's greedy tokens,
mixed batches, adapters loaded and unloaded beside running streams, swapping with max_loras 1,
and every refusal with its status and field."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import lora_files
import pytest
from conftest import RunningServer
from rpc_helpers import rpc_error, scrape, value, wait_until
from status_details import bad_request, error_info

from llmgrpc.clients import Client
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import models_pb2

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog", "1 2 3"]
COUNT = 12
ADMIN, INFERENCE = "lora-admin-token", "lora-inference-token"


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, cache_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("adapters")
    lora_files.good_adapters(cache_dir, folder)
    return folder


@pytest.fixture(scope="module")
def server(adapter_dir: Path, cache_dir: Path):
    settings = Settings(
        port=0,
        cache_dir=cache_dir,
        device="cpu",
        max_running_requests=16,
        max_waiting_requests=16,
        shutdown_grace_s=2,
        allowed_model_dirs=[adapter_dir],
        auth_tokens={ADMIN: "admin", INFERENCE: "inference"},
        metrics_port=0,
    )
    running = RunningServer(settings)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def admin(server) -> Client:
    with Client(server.endpoint, token=ADMIN) as client:
        yield client


def modules(adapter_dir: Path, *names: str) -> list[models_pb2.LoraModule]:
    return [models_pb2.LoraModule(name=name, path=str(adapter_dir / name)) for name in names]


# The F32 GGUF with llama.cpp's exact options gives the Transformers engine's logits to ~1e-6.
ENGINES = {
    "transformers": {"model_engine": "transformers"},
    "llama.cpp": {
        "model_engine": "llama.cpp",
        "model_format": "ggufv2",
        "quantization": "F32",
        "engine_options": {"kv_cache_type": "f32", "flash_attention": False, "context_length": 16 * 512},
    },
}


@pytest.fixture(scope="module", params=list(ENGINES))
def engine(request) -> str:
    return request.param


def launch(admin: Client, uid: str, engine: str, lora_modules, **fields) -> str:
    admin.launch(
        lora_files.TINY, model_uid=uid, lora_modules=lora_modules, timeout=300, **ENGINES[engine], **fields
    )
    return uid


@pytest.fixture(scope="module")
def launched(admin: Client, adapter_dir: Path, engine: str):
    uid = launch(admin, f"lora-{engine}", engine, modules(adapter_dir, "tiny-lora-a", "tiny-lora-b"))
    yield uid
    admin.terminate(uid)


def greedy(client: Client, uid: str, prompt: str, adapter: str = "") -> list[int]:
    stream = client.generate(
        uid, prompt, max_tokens=COUNT, min_tokens=COUNT, temperature=0, adapter=adapter, timeout=120
    )
    return [token for message in stream for token in message.token_ids]


@pytest.fixture(scope="module")
def peft_tokens(cache_dir: Path, adapter_dir: Path) -> dict[tuple[str, str], list[int]]:
    """peft's merged model generating alone, per (adapter, prompt); "" is the base model."""
    base = lora_files.base_files(cache_dir)
    return {
        (name, prompt): lora_files.peft_greedy(base, adapter_dir / name if name else None, prompt, COUNT)
        for name in ("", *lora_files.GOOD)
        for prompt in PROMPTS
    }


def test_greedy_output_equals_peft_merged_and_differs_from_the_base(admin, launched, peft_tokens):
    for prompt in PROMPTS:
        base = greedy(admin, launched, prompt)
        assert base == peft_tokens[("", prompt)]
        for name in ("tiny-lora-a", "tiny-lora-b"):
            tokens = greedy(admin, launched, prompt, name)
            assert tokens == peft_tokens[(name, prompt)], (name, prompt)
            assert tokens != base


def test_twelve_concurrent_streams_over_base_a_and_b_each_equal_their_alone_output(
    admin, launched, peft_tokens
):
    jobs = [
        (adapter, PROMPTS[i % len(PROMPTS)])
        for adapter in ("", "tiny-lora-a", "tiny-lora-b")
        for i in range(4)
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outputs = list(pool.map(lambda job: greedy(admin, launched, job[1], job[0]), jobs))
    for (adapter, prompt), tokens in zip(jobs, outputs, strict=True):
        assert tokens == peft_tokens[(adapter, prompt)], (adapter, prompt)
    assert admin.get_model(launched).peak_batch_size > 1


def test_the_model_lists_its_adapters(admin, launched):
    adapters = {adapter.name: adapter for adapter in admin.list_adapters(launched)}
    assert set(adapters) == {"tiny-lora-a", "tiny-lora-b"}
    assert all(a.state == models_pb2.ADAPTER_STATE_READY and a.rank == 8 for a in adapters.values())
    description = admin.get_model(launched)
    assert [a.name for a in description.adapters] == ["tiny-lora-a", "tiny-lora-b"]
    assert description.max_loras == 4 and description.max_lora_rank == 16


def test_load_adapter_while_streams_run_cuts_none_and_the_new_adapter_answers(
    admin, launched, adapter_dir, peft_tokens
):
    prompt = PROMPTS[1]
    started = threading.Event()

    def long_stream(adapter: str) -> list[int]:
        tokens = []
        for message in admin.generate(
            launched, prompt, max_tokens=200, min_tokens=200, temperature=0, adapter=adapter, timeout=300
        ):
            tokens += message.token_ids
            started.set()
        return tokens

    with ThreadPoolExecutor(2) as pool:
        running = [pool.submit(long_stream, adapter) for adapter in ("", "tiny-lora-a")]
        assert started.wait(120)
        loaded = admin.load_adapter(launched, "tiny-lora-c", str(adapter_dir / "tiny-lora-c"))
        assert loaded.state == models_pb2.ADAPTER_STATE_READY and loaded.rank == 8
        assert greedy(admin, launched, prompt, "tiny-lora-c") == peft_tokens[("tiny-lora-c", prompt)]
        outputs = [future.result() for future in running]
    assert [len(tokens) for tokens in outputs] == [200, 200]
    assert outputs[0][:COUNT] == peft_tokens[("", prompt)]
    assert outputs[1][:COUNT] == peft_tokens[("tiny-lora-a", prompt)]


def test_unloading_an_adapter_with_a_stream_in_flight_is_refused_and_cuts_nothing(
    admin, launched, adapter_dir, engine
):
    admin.load_adapter(launched, "tiny-lora-d", str(adapter_dir / "tiny-lora-d"))
    # A stream that takes seconds, so it is still in flight when the unload comes right after its
    # first token (on Transformers 100 tokens could all be sent by then); llama.cpp's sequences
    # here hold 512 tokens in all.
    in_flight_tokens = 3000 if engine == "transformers" else 500
    stream = admin.generate(
        launched,
        PROMPTS[0],
        max_tokens=in_flight_tokens,
        min_tokens=in_flight_tokens,
        temperature=0,
        adapter="tiny-lora-d",
        timeout=300,
    )
    first = next(stream)
    error = rpc_error(admin.unload_adapter, launched, "tiny-lora-d")
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "in flight" in error.details()
    assert error_info(error).reason == "ADAPTER_IN_USE"
    rest = [token for message in stream for token in message.token_ids]
    assert len(first.token_ids) + len(rest) == in_flight_tokens
    removed = admin.unload_adapter(launched, "tiny-lora-d")
    assert removed.name == "tiny-lora-d"
    assert "tiny-lora-d" not in {a.name for a in admin.list_adapters(launched)}
    error = rpc_error(lambda: list(admin.generate(launched, PROMPTS[0], max_tokens=2, adapter="tiny-lora-d")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_max_loras_one_swaps_three_adapters_in_turn(admin, adapter_dir, peft_tokens, engine):
    """On llama.cpp every adapter stays resident (max_loras does not apply): the answers must
    still be right."""
    names = ("tiny-lora-a", "tiny-lora-b", "tiny-lora-c")
    uid = launch(admin, f"lora-one-slot-{engine}", engine, modules(adapter_dir, *names), max_loras=1)
    try:
        for _ in range(2):
            for name in names:
                assert greedy(admin, uid, PROMPTS[0], name) == peft_tokens[(name, PROMPTS[0])]
                resident = [a.name for a in admin.list_adapters(uid) if a.resident]
                assert resident == ([name] if engine == "transformers" else list(names))
        # All three at once through one slot: each waits for the slot, none is cut or wrong.
        with ThreadPoolExecutor(3) as pool:
            outputs = list(pool.map(lambda name: greedy(admin, uid, PROMPTS[2], name), names))
        assert outputs == [peft_tokens[(name, PROMPTS[2])] for name in names]
    finally:
        admin.terminate(uid)


def test_an_unknown_adapter_is_not_found_naming_those_there_are(admin, launched):
    error = rpc_error(lambda: list(admin.generate(launched, "Hi", max_tokens=2, adapter="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert (
        "'nope'" in error.details() and "tiny-lora-a" in error.details() and "tiny-lora-b" in error.details()
    )
    assert error_info(error).reason == "ADAPTER_NOT_FOUND"


@pytest.mark.parametrize(
    "make, mismatch",
    [
        (
            lambda cache, folder: lora_files.wide_adapter(cache, folder),
            "rank 32 is above the model's max_lora_rank 16",
        ),
        (lambda cache, folder: lora_files.other_hidden_size_adapter(folder), "another hidden size"),
        (lambda cache, folder: lora_files.other_architecture_adapter(folder), "layers the base lacks"),
    ],
    ids=["rank", "hidden-size", "architecture"],
)
def test_an_adapter_the_base_cannot_take_is_refused_naming_the_mismatch(
    admin, launched, adapter_dir, cache_dir, make, mismatch
):
    path = make(cache_dir, adapter_dir / "bad")
    error = rpc_error(admin.load_adapter, launched, "bad", str(path))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
    assert mismatch in error.details()
    assert error_info(error).reason == "ADAPTER_INCOMPATIBLE"
    assert "bad" not in {a.name for a in admin.list_adapters(launched)}


def test_an_adapter_path_outside_the_allowed_folders_is_refused(admin, launched, tmp_path):
    error = rpc_error(admin.load_adapter, launched, "outside", str(tmp_path))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "adapter.path" in error.details()
    error = rpc_error(
        admin.launch,
        lora_files.TINY,
        lora_modules=[models_pb2.LoraModule(name="outside", path=str(tmp_path))],
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "lora_modules[0].path" in error.details()


def test_loading_an_adapter_needs_the_admin_role(server, launched, adapter_dir):
    with Client(server.endpoint, token=INFERENCE) as inference:
        error = rpc_error(inference.load_adapter, launched, "tiny-lora-c2", str(adapter_dir / "tiny-lora-c"))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        error = rpc_error(inference.unload_adapter, launched, "tiny-lora-a")
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert {a.name for a in inference.list_adapters(launched)} >= {"tiny-lora-a", "tiny-lora-b"}


def test_malformed_adapter_fields_are_invalid_argument_naming_the_field(admin, launched):
    error = rpc_error(
        admin.launch,
        lora_files.TINY,
        lora_modules=[models_pb2.LoraModule(name="a:b", path="relative/../x y")],
        max_loras=0,
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = {violation.field for violation in bad_request(error).field_violations}
    assert fields == {"lora_modules[0].name", "lora_modules[0].path", "max_loras"}
    error = rpc_error(lambda: list(admin.generate(launched, "Hi", adapter="base:a")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert {v.field for v in bad_request(error).field_violations} == {"adapter"}


def test_metrics_count_requests_and_tokens_per_adapter_and_show_the_running_ones(server, admin, launched):
    port = server.server.metrics_port
    before = scrape(port)
    greedy(admin, launched, PROMPTS[0], "tiny-lora-b")
    after = scrape(port)
    labels = {"model_uid": launched, "adapter": "tiny-lora-b"}
    assert (
        value(after, "llmgrpc:lora_requests_total", **labels)
        - value(before, "llmgrpc:lora_requests_total", **labels)
        == 1
    )
    assert (
        value(after, "llmgrpc:lora_generation_tokens_total", **labels)
        - value(before, "llmgrpc:lora_generation_tokens_total", **labels)
        == COUNT
    )

    def info_labels() -> dict:
        samples = scrape(port)["llmgrpc:lora_requests_info"]
        return next(dict(key) for key in samples if dict(key)["model_uid"] == launched)

    assert info_labels()["max_lora"] == "4"
    stream = admin.generate(launched, PROMPTS[1], max_tokens=300, min_tokens=300, adapter="tiny-lora-a")
    next(stream)
    assert wait_until(lambda: info_labels()["running_lora_adapters"] == "tiny-lora-a")
    stream.cancel()
    assert wait_until(lambda: info_labels()["running_lora_adapters"] == "")


def test_kserve_and_tgis_name_adapters_in_their_own_words(server, admin, launched):
    """KServe: the model name base:adapter, or the Triton vLLM backend's lora_name sampling
    parameter; TGIS: adapter_id. Each gives what Generate gives with the adapter."""
    import json

    from llmgrpc.kserve.v2 import grpc_service_pb2 as kserve_pb
    from llmgrpc.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
    from llmgrpc.server.kserve_convert import encode_bytes
    from llmgrpc.tgis.v1 import generation_pb2 as tgis_pb
    from llmgrpc.tgis.v1 import generation_pb2_grpc as tgis_grpc

    def text(adapter: str) -> str:
        stream = admin.generate(
            launched, PROMPTS[0], max_tokens=COUNT, min_tokens=COUNT, temperature=0, adapter=adapter
        )
        return "".join(message.text for message in stream)

    expected, base = text("tiny-lora-a"), text("")
    assert expected != base
    auth = (("authorization", f"Bearer {ADMIN}"),)
    sampling = {"temperature": 0, "max_tokens": COUNT, "min_tokens": COUNT}

    def infer(model_name: str, parameters: dict) -> str:
        request = kserve_pb.ModelInferRequest(model_name=model_name)
        request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
        request.inputs.add(name="exclude_input_in_output", datatype="BOOL", shape=[1])
        request.raw_input_contents.extend(
            [encode_bytes(PROMPTS[0].encode()), encode_bytes(json.dumps(parameters).encode()), b"\x01"]
        )
        response = stub.ModelInfer(request, metadata=auth, timeout=120)
        raw = response.raw_output_contents[0]
        return raw[4 : 4 + int.from_bytes(raw[:4], "little")].decode()

    with grpc.insecure_channel(server.endpoint) as channel:
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        assert infer(f"{launched}:tiny-lora-a", sampling) == expected
        assert infer(launched, {**sampling, "lora_name": "tiny-lora-a"}) == expected
        assert infer(launched, sampling) == base
        error = rpc_error(infer, f"{launched}:nope", sampling)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "tiny-lora-a" in error.details()

        tgis = tgis_grpc.GenerationServiceStub(channel)
        params = tgis_pb.Parameters(
            method=tgis_pb.GREEDY,
            stopping=tgis_pb.StoppingCriteria(max_new_tokens=COUNT, min_new_tokens=COUNT),
        )
        batch = tgis_pb.BatchedGenerationRequest(
            model_id=launched,
            adapter_id="tiny-lora-a",
            requests=[tgis_pb.GenerationRequest(text=PROMPTS[0])],
            params=params,
        )
        assert tgis.Generate(batch, metadata=auth, timeout=120).responses[0].text == expected


def test_llamacpp_takes_a_gguf_lora_file_as_it_is(
    admin, launched, engine, adapter_dir, cache_dir, peft_tokens
):
    """A GGUF LoRA made by the converter (as llama.cpp's convert_lora_to_gguf.py makes one) loads
    without conversion and answers as peft's merged model does."""
    if engine != "llama.cpp":
        pytest.skip("GGUF LoRA files are llama.cpp's")
    import json

    from llmgrpc.engines.lora import read_peft_adapter
    from llmgrpc.engines.weights.gguf_lora import write_gguf_lora

    config = json.loads((lora_files.base_files(cache_dir) / "config.json").read_text())
    adapter = read_peft_adapter("c", adapter_dir / "tiny-lora-c")
    path = adapter_dir / "tiny-lora-c.gguf"
    write_gguf_lora(adapter, path, "llama", config["num_attention_heads"], config["num_key_value_heads"])
    loaded = admin.load_adapter(launched, "c-gguf", str(path))
    assert loaded.rank == 8
    assert greedy(admin, launched, PROMPTS[2], "c-gguf") == peft_tokens[("tiny-lora-c", PROMPTS[2])]
    admin.unload_adapter(launched, "c-gguf")


def test_an_adapter_loaded_at_run_time_survives_the_idle_unload_and_reload(
    admin, adapter_dir, engine, peft_tokens
):
    """The worker that reloads an idle-unloaded model starts from the launch's plan: the server
    loads the adapters added since into it before the model is READY again."""
    uid = launch(admin, f"lora-idle-{engine}", engine, [], idle_unload_s=1.0)
    try:
        admin.load_adapter(uid, "late", str(adapter_dir / "tiny-lora-b"))
        assert wait_until(lambda: admin.get_model(uid).state == models_pb2.MODEL_STATE_UNLOADED, timeout=60)
        assert greedy(admin, uid, PROMPTS[1], "late") == peft_tokens[("tiny-lora-b", PROMPTS[1])]
        assert [(a.name, a.state) for a in admin.list_adapters(uid)] == [
            ("late", models_pb2.ADAPTER_STATE_READY)
        ]
    finally:
        admin.terminate(uid)


def test_the_prefix_cache_reuses_kv_only_under_the_adapter_that_computed_it(admin, launched, peft_tokens):
    """A prompt cached under the base model (or another adapter) is prefilled again for an
    adapter, so its output is the adapter's; the same prompt again under the same adapter is
    served from the cache, with the same output."""
    # A beginning no other test sends: what an adapter finds cached of it is its own KV at most.
    prompt = "Cache check: " + PROMPTS[1] + " and once more over the lazy dog, then home again"

    def run(adapter: str) -> tuple[list[int], int]:
        messages = list(
            admin.generate(
                launched, prompt, max_tokens=COUNT, min_tokens=COUNT, temperature=0, adapter=adapter
            )
        )
        return [t for m in messages for t in m.token_ids], messages[-1].usage.cached_prompt_tokens

    base_tokens, _ = run("")
    base_again, cached_base = run("")
    assert base_again == base_tokens and cached_base > 0  # the cache is on and holds this prompt
    a_tokens, cached_a = run("tiny-lora-a")
    assert cached_a <= 1 and a_tokens != base_tokens  # at most the beginning-of-text token
    a_again, cached_a_again = run("tiny-lora-a")
    assert cached_a_again > 0 and a_again == a_tokens
    b_tokens, cached_b = run("tiny-lora-b")
    assert cached_b <= 1 and b_tokens != a_tokens
