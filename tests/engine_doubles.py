"""Test doubles of vLLM's and SGLang's public APIs (never used by the product).

Each streams a scripted completion the way the real library does: vLLM as DELTA
RequestOutputs, SGLang as dicts with cumulative (default) or incremental text and ids.
Both record what they were given and what was aborted.
"""

from __future__ import annotations

import asyncio
import types
from dataclasses import dataclass, field

SCRIPT = [(11, "Hel"), (12, "lo"), (13, ","), (14, " world")]


# vLLM


class FakeVllmSamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class FakeStructuredOutputsParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@dataclass
class FakeLogprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FakeCompletion:
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[dict[int, FakeLogprob]] | None = None


@dataclass
class FakeRequestOutput:
    outputs: list[FakeCompletion]
    finished: bool
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])


class FakeAsyncLLM:
    def __init__(
        self,
        engine_args=None,
        fail_with: Exception | None = None,
        finish_reason: str = "length",
        stop_reason: int | str | None = None,
    ):
        self.engine_args = engine_args
        self.fail_with = fail_with
        self.finish_reason = finish_reason
        self.stop_reason = stop_reason
        self.tokenizer = FakeTokenizer()
        self.model_config = types.SimpleNamespace(max_model_len=2048)
        self.requests: list[tuple[object, FakeVllmSamplingParams, str]] = []
        self.aborted: list[str] = []
        self.unfinished: set[str] = set()  # what vLLM still holds: until finished or aborted
        self.shut_down = False

    @classmethod
    def from_engine_args(cls, engine_args):
        return cls(engine_args)

    async def generate(self, prompt, params, request_id, lora_request=None):
        self.requests.append((prompt, params, request_id))
        if self.fail_with:
            raise self.fail_with
        self.unfinished.add(request_id)
        for index, (token, text) in enumerate(SCRIPT):
            await asyncio.sleep(0)
            last = index == len(SCRIPT) - 1
            if last:
                self.unfinished.discard(request_id)
            completion = FakeCompletion([token], text, self.finish_reason if last else None)
            if last:
                completion.stop_reason = self.stop_reason
            if params.kwargs.get("logprobs") is not None:
                # vLLM's: the sampled token (ranked 2nd here) and the top logprobs ones.
                top = {token + 100 + rank: FakeLogprob(-0.1 * rank, rank, f"t{rank}") for rank in (1, 3)}
                completion.logprobs = [{token: FakeLogprob(-0.2, 2, text), **top}]
            yield FakeRequestOutput([completion], finished=last)

    async def abort(self, request_id):
        self.aborted.append(request_id)
        self.unfinished.discard(request_id)

    def get_tokenizer(self):
        return self.tokenizer

    def get_num_unfinished_requests(self) -> int:
        return len(self.unfinished)

    def shutdown(self):
        self.shut_down = True


def fake_vllm_modules() -> dict[str, types.ModuleType]:
    """sys.modules entries that make `import vllm` give the doubles."""
    vllm = types.ModuleType("vllm")
    vllm.SamplingParams = FakeVllmSamplingParams
    vllm.AsyncEngineArgs = lambda **kwargs: types.SimpleNamespace(**kwargs)
    sampling_params = types.ModuleType("vllm.sampling_params")
    sampling_params.RequestOutputKind = types.SimpleNamespace(DELTA="DELTA")
    sampling_params.StructuredOutputsParams = FakeStructuredOutputsParams
    config = types.ModuleType("vllm.config")
    config.StructuredOutputsConfig = lambda **kwargs: types.SimpleNamespace(**kwargs)
    async_llm = types.ModuleType("vllm.v1.engine.async_llm")
    async_llm.AsyncLLM = FakeAsyncLLM
    return {
        "vllm": vllm,
        "vllm.sampling_params": sampling_params,
        "vllm.config": config,
        "vllm.v1": types.ModuleType("vllm.v1"),
        "vllm.v1.engine": types.ModuleType("vllm.v1.engine"),
        "vllm.v1.engine.async_llm": async_llm,
    }


class FakeTokenizer:
    """A Hugging Face tokenizer's surface: one token per character, BOS (id 1) first."""

    def __len__(self) -> int:
        return 300

    def encode(self, text: str, split_special_tokens: bool = False) -> list[int]:
        return [1, *(ord(c) for c in text)]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(chr(t) if t != 1 else ("" if skip_special_tokens else "<s>") for t in ids)


# SGLang


class FakeTokenizerManager:
    def __init__(self):
        self.context_len = 4096
        self.aborted: list[str] = []
        self.tokenizer = FakeTokenizer()

    def abort_request(self, rid: str = "", abort_all: bool = False):
        self.aborted.append(rid)


class FakeSGLangEngine:
    def __init__(self, incremental: bool = False, fail_with: Exception | None = None, **kwargs):
        self.kwargs = kwargs
        self.incremental = incremental
        self.fail_with = fail_with
        self.tokenizer_manager = FakeTokenizerManager()
        self.calls: list[dict] = []
        self.shut_down = False
        self.loras: dict[str, str] = {}

    async def async_generate(self, stream: bool = False, **kwargs):
        assert stream is True
        self.calls.append(kwargs)
        if self.fail_with:
            raise self.fail_with
        return self._stream(kwargs)

    async def _stream(self, kwargs):
        ids, text = [], ""
        for index, (token, piece) in enumerate(SCRIPT):
            await asyncio.sleep(0)
            ids, text = ids + [token], text + piece
            last = index == len(SCRIPT) - 1
            meta = {
                "prompt_tokens": 3,
                "completion_tokens": len(ids),
                "finish_reason": {"type": "stop", "matched": "END"} if last else None,
            }
            if kwargs.get("return_logprob"):
                # SGLang's (logprob, token id, text) per token, cumulative like its text unless incremental.
                entries = [(-0.5, t, chr(t)) for t in ids]
                tops = [[(-0.25, t + 1, "x"), (-0.5, t, chr(t))] for t in ids]
                meta["output_token_logprobs"] = entries[-1:] if self.incremental else entries
                meta["output_top_logprobs"] = tops[-1:] if self.incremental else tops
            if self.incremental:
                yield {"text": piece, "output_ids": [token], "meta_info": meta}
            else:
                yield {"text": text, "output_ids": list(ids), "meta_info": meta}

    def load_lora_adapter(self, lora_name: str, lora_path: str):
        self.loras[lora_name] = lora_path

    def unload_lora_adapter(self, lora_name: str):
        del self.loras[lora_name]

    def shutdown(self):
        self.shut_down = True
