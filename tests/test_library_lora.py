"""LoRA on the engines whose libraries batch adapters themselves: what vLLM and SGLang are given.

vLLM runs for real in test_vllm.py (make test-vllm); SGLang has no CPU build, so its mapping is
checked against the test double of its API, as its other fields are (test_engine_adapters.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import lora_files
import pytest
from engine_doubles import FakeSGLangEngine
from test_engine_adapters import collect, plan, request

from llmgrpc.clients.errors import FailedPrecondition, NotFound
from llmgrpc.engines.lora import LibraryAdapters, LoraModule, config_layer_shapes
from llmgrpc.engines.sglang_engine import SGLangEngine, engine_kwargs
from llmgrpc.engines.vllm_engine import engine_args


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, cache_dir: Path) -> dict[str, Path]:
    return lora_files.good_adapters(cache_dir, tmp_path_factory.mktemp("adapters"))


def test_vllm_enables_lora_with_the_launchs_limits_when_adapters_are_given():
    assert "enable_lora" not in engine_args(plan(), "/models/x")
    with_modules = plan()
    with_modules.lora_modules = [{"name": "a", "path": "/a", "scale": 1.0}]
    with_modules.max_loras, with_modules.max_lora_rank = 2, 32
    args = engine_args(with_modules, "/models/x")
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (True, 2, 32)
    run_time_only = engine_args(plan(enable_lora=True), "/models/x")
    assert (run_time_only["max_loras"], run_time_only["max_lora_rank"]) == (4, 16)


def test_sglang_gets_its_lora_words_and_each_request_its_lora_path(adapters, cache_dir: Path):
    assert "enable_lora" not in engine_kwargs(plan(), "/models/x")
    kwargs = engine_kwargs(plan(enable_lora=True), "/models/x")
    assert (kwargs["enable_lora"], kwargs["max_loras_per_batch"], kwargs["max_lora_rank"]) == (True, 4, 16)
    fake = FakeSGLangEngine()
    engine = SGLangEngine(fake, 4096, "cuda:0")
    engine.adapters = LibraryAdapters("SGLang", 16)
    config = lora_files.base_files(cache_dir) / "config.json"
    engine.base_layers = config_layer_shapes(__import__("json").loads(config.read_text()))
    path = str(adapters["tiny-lora-a"])
    assert engine.load_adapter(LoraModule("a", path), path) == 8
    assert fake.loras == {"a": path}
    with_adapter = request()
    object.__setattr__(with_adapter, "adapter", "a")
    asyncio.run(collect(engine, with_adapter))
    assert fake.calls[-1]["lora_path"] == "a"
    asyncio.run(collect(engine, request()))
    assert "lora_path" not in fake.calls[-1]
    unknown = request()
    object.__setattr__(unknown, "adapter", "nope")
    with pytest.raises(NotFound, match="'nope'.*adapters: a"):
        asyncio.run(collect(engine, unknown))
    # The library applies its own scale: another one is refused, not ignored.
    with pytest.raises(FailedPrecondition, match="scale 0.5"):
        engine.load_adapter(LoraModule("half", path, 0.5), path)
    engine.unload_adapter("a")
    assert fake.loras == {}
