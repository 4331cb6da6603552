"""The whole path through a real server: list, launch, stream, terminate."""

from __future__ import annotations

import grpc
import pytest
import torch
from conftest import TINY
from rpc_helpers import collect
from transformers import AutoModelForCausalLM, AutoTokenizer

from llmgrpc.clients import Client
from llmgrpc.v1 import generate_pb2, models_pb2


def test_list_specs_shows_families_and_engine_availability(client: Client):
    families = {family.model_name: family for family in client.list_specs()}
    assert {"llama-3.1", TINY} <= set(families)
    llama = families["llama-3.1"]
    assert llama.context_length == 131072
    pytorch_8b = llama.specs[0]
    engines = {engine.name: engine for engine in pytorch_8b.engines}
    assert engines["Transformers"].available and not engines["Transformers"].reason
    assert not engines["vLLM"].available
    assert "vllm" in engines["vLLM"].reason.lower()
    assert [hub.name for hub in pytorch_8b.hubs] == ["huggingface", "modelscope"]

    only_gguf = client.list_specs(model_name="llama-3.1", model_format="ggufv2")
    assert [[spec.model_format for spec in family.specs] for family in only_gguf] == [["ggufv2"]]
    assert client.list_specs(model_engine="TRANSFORMERS")  # engine names match case-insensitively


def test_launch_returns_a_ready_model(client: Client, tiny: models_pb2.ModelDescription):
    assert tiny.model_uid == "tiny"
    assert tiny.state == models_pb2.MODEL_STATE_READY
    assert (tiny.model_name, tiny.model_engine, tiny.model_format) == (TINY, "Transformers", "pytorch")
    assert tiny.device == "cpu"
    assert tiny.context_length == 16384
    assert tiny.worker_pid > 0 and tiny.memory_bytes > 0
    listed = {model.model_uid: model for model in client.list_models()}
    assert listed["tiny"].state == models_pb2.MODEL_STATE_READY


def test_generate_streams_pieces_then_finish_reason_and_usage(client: Client, tiny, tiny_files):
    token_ids, text, messages = collect(client.generate("tiny", "Hello there", max_tokens=12, temperature=0))
    assert len(messages) > 1
    assert all(m.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED for m in messages[:-1])
    last = messages[-1]
    assert last.finish_reason in (generate_pb2.FINISH_REASON_LENGTH, generate_pb2.FINISH_REASON_STOP)
    assert last.usage.completion_tokens == len(token_ids)
    assert last.usage.prompt_tokens == len(AutoTokenizer.from_pretrained(tiny_files)("Hello there").input_ids)
    assert text


@pytest.mark.parametrize("prompt", ["Hello there", "The quick brown fox", "Beautiful is better than ugly."])
def test_greedy_output_equals_transformers_generate(client: Client, tiny, tiny_files, prompt: str):
    token_ids, text, _ = collect(client.generate("tiny", prompt, max_tokens=32, temperature=0))
    tokenizer = AutoTokenizer.from_pretrained(tiny_files)
    model = AutoModelForCausalLM.from_pretrained(tiny_files).eval()
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = model.generate(input_ids, max_new_tokens=32, do_sample=False)[0, input_ids.shape[1] :]
    assert token_ids == expected.tolist()
    assert text == tokenizer.decode(expected, skip_special_tokens=True)


def test_prompt_token_ids_are_used_as_given(client: Client, tiny, tiny_files):
    tokenizer = AutoTokenizer.from_pretrained(tiny_files)
    ids = tokenizer("Hello there").input_ids
    from_text, _, _ = collect(client.generate("tiny", "Hello there", max_tokens=8, temperature=0))
    from_ids, _, messages = collect(client.generate("tiny", ids, max_tokens=8, temperature=0))
    assert from_ids == from_text
    assert messages[-1].usage.prompt_tokens == len(ids)


def test_same_seed_same_text_other_seed_other_text(client: Client, tiny):
    def sample(seed: int) -> list[int]:
        return collect(
            client.generate("tiny", "Hello", max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True)
        )[0]

    first, again, other = sample(1234), sample(1234), sample(4321)
    assert first == again
    assert first != other


def test_stop_strings_and_stop_token_ids_end_the_output(client: Client, tiny):
    token_ids, text, _ = collect(
        client.generate("tiny", "Hello there", max_tokens=32, temperature=0, ignore_eos=True)
    )
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    _, cut_text, messages = collect(
        client.generate("tiny", "Hello there", max_tokens=32, temperature=0, ignore_eos=True, stop=[stop])
    )
    assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_STOP
    assert cut_text == text[: text.index(stop)]

    stop_token = token_ids[5]
    stopped_ids, _, messages = collect(
        client.generate("tiny", "Hello there", max_tokens=32, temperature=0, stop_token_ids=[stop_token])
    )
    assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_STOP
    assert stopped_ids == token_ids[: token_ids.index(stop_token) + 1]


def test_min_tokens_and_ignore_eos_give_fixed_lengths(client: Client, tiny):
    token_ids, _, messages = collect(
        client.generate("tiny", "Hi", max_tokens=40, min_tokens=40, temperature=0.8, seed=3)
    )
    assert len(token_ids) == 40
    assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH


def test_concurrent_requests_are_decoded_in_shared_batches(client: Client, tiny):
    from concurrent.futures import ThreadPoolExecutor

    prompts = [f"Request number {i}" for i in range(6)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(
            pool.map(
                lambda p: collect(client.generate("tiny", p, max_tokens=48, temperature=0, ignore_eos=True)),
                prompts,
            )
        )
    assert all(len(ids) == 48 for ids, _, _ in results)
    assert client.get_model("tiny").peak_batch_size > 1


def test_terminate_frees_the_uid(client: Client, tiny):
    launched = client.launch(TINY, model_uid="short-lived")
    assert launched.state == models_pb2.MODEL_STATE_READY
    terminated = client.terminate("short-lived")
    assert terminated.state == models_pb2.MODEL_STATE_TERMINATED
    with pytest.raises(grpc.RpcError) as error:
        client.get_model("short-lived")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "short-lived" not in [model.model_uid for model in client.list_models()]
    # The uid is free again.
    assert client.launch(TINY, model_uid="short-lived").state == models_pb2.MODEL_STATE_READY
    client.terminate("short-lived")
