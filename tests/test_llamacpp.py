"""The llama.cpp engine: GGUF conversion of the tiny model, every quantization, continuous batching."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")

import gguf  # noqa: E402
from conftest import TINY
from rpc_helpers import collect

from llmgrpc.clients import Client  # noqa: E402
from llmgrpc.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from llmgrpc.engines.weights import gguf_convert  # noqa: E402
from llmgrpc.v1 import generate_pb2, models_pb2  # noqa: E402

pytestmark = pytest.mark.llamacpp

# The f32 KV cache without flash attention keeps llama.cpp's logits within ~1e-6 of torch's.
EXACT_OPTIONS = {"kv_cache_type": "f32", "flash_attention": False}
# A small cache: 256 tokens for each of the 8 sequence slots of the test server (its
# max_running_requests); 256 is the granularity llama.cpp sizes each slot's stream in.
SMALL_CONTEXT = 2048
SLOTS = 8


def launch_gguf(client: Client, uid: str, quantization: str, **options) -> models_pb2.ModelDescription:
    return client.launch(
        TINY,
        model_format="ggufv2",
        quantization=quantization,
        model_engine="llama.cpp",
        model_uid=uid,
        engine_options=options or None,
        timeout=300,
    )


@pytest.fixture(scope="module")
def gguf_f32(client: Client):
    model = launch_gguf(client, "tiny-gguf-f32", "F32", **EXACT_OPTIONS)
    yield model
    client.terminate(model.model_uid)


@pytest.fixture(scope="module")
def gguf_q8(client: Client):
    """Q8_0 without flash attention: llama.cpp's kernels then give each row the same logits
    whatever the batch, so greedy outputs must not depend on the other requests. (Flash
    attention pads every sequence's keys to the longest in the step, which moves rounding
    once sequences of different lengths share a step.)"""
    model = launch_gguf(client, "tiny-gguf-q8", "Q8_0", flash_attention=False)
    yield model
    client.terminate(model.model_uid)


@pytest.fixture(scope="module")
def gguf_small(client: Client):
    """A small KV cache in one buffer shared by all slots."""
    model = launch_gguf(client, "tiny-gguf-small", "Q4_K_M", context_length=SMALL_CONTEXT, kv_unified=True)
    yield model
    client.terminate(model.model_uid)


# Conversion.


def test_llama3_rope_factors_match_transformers(tiny_files: Path):
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = json.loads((tiny_files / "config.json").read_text())
    factors = gguf_convert.llama3_rope_factors(config)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](AutoConfig.from_pretrained(tiny_files), "cpu")
    head_dim, theta = config["head_dim"], config["rope_parameters"]["rope_theta"]
    unscaled = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    np.testing.assert_allclose(unscaled / factors, scaled.numpy(), rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == config["rope_parameters"]["factor"]


def test_converted_file_has_the_llama_metadata(gguf_f32, cache_dir: Path, tiny_files: Path):
    reader = gguf.GGUFReader(cache_dir / TINY / "ggufv2" / f"{TINY}.F32.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    config = json.loads((tiny_files / "config.json").read_text())
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == config["num_hidden_layers"]
    assert fields["llama.attention.head_count_kv"] == config["num_key_value_heads"]
    assert fields["llama.vocab_size"] == config["vocab_size"]
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.token_type"][:5] == [gguf.TokenType.CONTROL] * 5
    tensors = {tensor.name for tensor in reader.tensors}
    assert {"token_embd.weight", "output.weight", "rope_freqs.weight", "blk.1.ffn_down.weight"} <= tensors


@pytest.fixture(scope="module")
def in_process_runner(cache_dir: Path):
    """The F32 tiny model in this process, two sequence slots, the exact options."""
    from llmgrpc.engines.base import LoadPlan, SpecRef
    from llmgrpc.engines.llamacpp_engine import LlamaCppEngine

    path = gguf_convert.ensure_tiny_gguf(cache_dir, "F32")
    spec = SpecRef(TINY, "ggufv2", "0_002", "F32", "llmgrpc/tiny-llama-3.1-GGUF")
    plan = LoadPlan("in-process", "llama.cpp", spec, "cpu", str(cache_dir), 2, engine_options=EXACT_OPTIONS)
    engine = LlamaCppEngine.load(plan, str(path), lambda *progress: None)
    engine.batcher.close()  # this test drives the runner itself, on this one thread
    yield engine.runner
    engine.runner.close()


def test_tokenizer_and_detokenizer_match_hugging_face(in_process_runner, tiny_files: Path):
    from transformers import AutoTokenizer

    runner = in_process_runner
    hf = AutoTokenizer.from_pretrained(tiny_files)
    assert runner.eos_token_ids == {hf.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eot_id|>")}
    for text in ["Hello there", "Bonjour, olá, नमस्ते 3.14159!\n\n  x", "  tabs\tand  spaces  ", "ünïcödé"]:
        ids = runner.tokenize(text)
        assert ids == hf(text).input_ids
        assert runner.detokenize(ids) == hf.decode(ids, skip_special_tokens=True) == text
    # User text that spells a control token stays text.
    assert hf.convert_tokens_to_ids("<|eot_id|>") not in runner.tokenize("<|eot_id|>")[1:]


def test_prefill_longer_than_one_batch_is_split_and_equals_prefill_alone(in_process_runner):
    runner = in_process_runner
    rng = np.random.default_rng(0)
    # Two prompts of 1500 tokens: 3000 do not fit one llama_decode (2048), so the second is cut in two.
    prompts = [[0, *rng.integers(5, runner.vocab_size, 1499).tolist()] for _ in range(2)]
    cold = GenerationRequest("cold", SamplingParams(), cache_prompt=False)
    runner.admit(1, prompts[0], cold)
    runner.admit(2, prompts[1], cold)
    together = runner.prefill([(1, prompts[0]), (2, prompts[1])])
    next_together = runner.decode({1: 7, 2: 7}).copy()  # a view of llama.cpp's buffer until the next call
    runner.release(1)
    runner.release(2)
    for row, prompt in enumerate(prompts):
        runner.admit(3, prompt, cold)
        alone = runner.prefill([(3, prompt)])
        next_alone = runner.decode({3: 7})
        runner.release(3)
        np.testing.assert_allclose(together[row], alone[0], atol=1e-4)
        np.testing.assert_allclose(next_together[row], next_alone[0], atol=1e-4)


def test_model_path_folder_picks_the_quantization_the_template_names(gguf_f32, cache_dir: Path):
    from llmgrpc.clients.errors import FailedPrecondition
    from llmgrpc.engines import weights
    from llmgrpc.engines.base import LoadPlan, SpecRef

    folder = cache_dir / TINY / "ggufv2"
    template = f"{TINY}.{{quantization}}.gguf"
    spec = SpecRef(TINY, "ggufv2", "0_002", "F32", "llmgrpc/tiny-llama-3.1-GGUF", [], template)
    plan = LoadPlan("x", "llama.cpp", spec, "cpu", str(cache_dir), 1, model_path=str(folder))
    assert weights.resolve(plan, lambda *progress: None) == str(folder / f"{TINY}.F32.gguf")
    spec.quantization = "IQ1_S"
    with pytest.raises(FailedPrecondition, match=f"{TINY}.F32.gguf"):
        weights.resolve(plan, lambda *progress: None)


# Equality with the Transformers engine.


@pytest.mark.parametrize("prompt", ["Hello there", "The quick brown fox", "Beautiful is better than ugly."])
def test_f32_gguf_greedy_tokens_equal_the_transformers_engine(client: Client, tiny, gguf_f32, prompt: str):
    sampling = dict(max_tokens=48, temperature=0, ignore_eos=True)
    expected, _, _ = collect(client.generate("tiny", prompt, **sampling))
    token_ids, _, messages = collect(client.generate(gguf_f32.model_uid, prompt, **sampling))
    assert token_ids == expected
    assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH


# Every quantization.


def test_registry_offers_every_seed_quantization(client: Client):
    (family,) = client.list_specs(model_name=TINY, model_format="ggufv2")
    (spec,) = family.specs
    assert set(gguf_convert.QUANTIZATIONS) <= set(spec.quantizations)
    assert [engine.name for engine in spec.engines if engine.available] == ["llama.cpp"]


@pytest.mark.parametrize("quantization", gguf_convert.QUANTIZATIONS)
def test_each_quantization_loads_and_streams(client: Client, cache_dir: Path, quantization: str):
    uid = f"tiny-gguf-{quantization.lower()}"
    model = launch_gguf(client, uid, quantization)
    try:
        assert (model.model_format, model.quantization) == ("ggufv2", quantization)
        assert model.model_engine == "llama.cpp"
        token_ids, text, messages = collect(
            client.generate(uid, "Hello there", max_tokens=6, temperature=0, ignore_eos=True)
        )
        assert len(token_ids) == 6 and text
        assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    finally:
        client.terminate(uid)
    reader = gguf.GGUFReader(cache_dir / TINY / "ggufv2" / f"{TINY}.{quantization}.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType[f"MOSTLY_{quantization}"]


# Continuous batching.


def run_together(client: Client, uid: str, prompts: list, **sampling) -> list[list[int]]:
    """Every call is started before any is read (a call starts when made), so the engine has them
    all at once however fast it decodes: threads could each finish before the next one began."""
    streams = [client.generate(uid, prompt, **sampling) for prompt in prompts]
    return [collect(stream)[0] for stream in streams]


def test_concurrent_greedy_streams_equal_each_alone(client: Client, gguf_q8):
    uid = gguf_q8.model_uid
    prompts = [f"Request number {i}: the quick brown fox" for i in range(SLOTS)]
    # Long enough that the streams overlap: the prompts are cached by then, and 48 tokens each
    # were once all done before the next request reached the engine (the peak batch left at 1).
    sampling = dict(max_tokens=256, temperature=0, ignore_eos=True)
    alone = [collect(client.generate(uid, prompt, **sampling))[0] for prompt in prompts]
    assert client.get_model(uid).peak_batch_size == 1
    together = run_together(client, uid, prompts, **sampling)
    assert together == alone
    assert client.get_model(uid).peak_batch_size > 1


def test_cancelling_one_stream_leaves_the_others_intact(client: Client, gguf_q8):
    uid = gguf_q8.model_uid
    prompts = [f"Stream {i} keeps talking" for i in range(4)]
    sampling = dict(max_tokens=400, temperature=0, ignore_eos=True)
    alone = [collect(client.generate(uid, prompt, **sampling))[0] for prompt in prompts[1:]]

    doomed = client.generate(uid, prompts[0], **sampling)
    with ThreadPoolExecutor(3) as pool:
        others = [
            pool.submit(lambda p: collect(client.generate(uid, p, **sampling))[0], p) for p in prompts[1:]
        ]
        next(doomed)
        deadline = time.monotonic() + 10
        while client.get_model(uid).running_requests < len(prompts) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get_model(uid).running_requests == len(prompts)  # all four decoding together
        doomed.cancel()
        with pytest.raises(grpc.RpcError) as error:
            list(doomed)
        assert error.value.code() == grpc.StatusCode.CANCELLED
        assert [future.result() for future in others] == alone

    deadline = time.monotonic() + 10
    while client.get_model(uid).running_requests and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get_model(uid).running_requests == 0
    # Every sequence slot was given back: a full batch runs again.
    results = run_together(client, uid, [f"Again {i}" for i in range(SLOTS)], max_tokens=4, ignore_eos=True)
    assert all(len(ids) == 4 for ids in results)


# Context length and the shared KV cache.


def test_context_is_the_cache_divided_among_the_sequences(gguf_small, gguf_q8):
    assert gguf_small.context_length == SMALL_CONTEXT // SLOTS
    assert gguf_q8.context_length == 4096  # the default: 4096 per sequence, below the model's 16384


def test_prompt_longer_than_the_context_is_invalid(client: Client, gguf_small):
    context = gguf_small.context_length
    with pytest.raises(grpc.RpcError) as error:
        collect(client.generate(gguf_small.model_uid, [5] * context, max_tokens=4))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert str(context) in error.value.details()

    long_text = "The quick brown fox jumps over the lazy dog. " * 40
    with pytest.raises(grpc.RpcError) as error:
        collect(client.generate(gguf_small.model_uid, long_text, max_tokens=4))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_sequence_can_fill_its_context_at_once(client: Client, gguf_small):
    """All slots run to the end of their context together: the one shared buffer has room for all."""
    uid, context = gguf_small.model_uid, gguf_small.context_length
    prompts = [[5 + i] * (context // 2) for i in range(SLOTS)]
    sampling = dict(max_tokens=10 * context, ignore_eos=True)
    with ThreadPoolExecutor(SLOTS) as pool:
        results = list(pool.map(lambda p: collect(client.generate(uid, p, **sampling)), prompts))
    for token_ids, _, messages in results:
        assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert len(token_ids) == context - context // 2
    assert client.get_model(gguf_small.model_uid).peak_batch_size > 1
