"""Which hubs can be used is asked of the environment whose workers download, not the server's."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RunningServer
from environments import make_environment

from llmgrpc.clients import Client
from llmgrpc.engines.weights.hubs import HUBS, HUGGINGFACE, MODELSCOPE
from llmgrpc.server.availability import EngineAvailability
from llmgrpc.server.settings import Settings

PYTORCH_ENGINES = ("vLLM", "Transformers", "SGLang")  # llama-3.1's pytorch specs; llama.cpp serves its GGUF


@pytest.fixture(scope="module")
def without_huggingface_hub(tmp_path_factory) -> Path:
    python = make_environment(tmp_path_factory.mktemp("no-hf-venv"), hidden=("huggingface_hub",))
    imported = subprocess.run([str(python), "-c", "import huggingface_hub"], capture_output=True, text=True)
    assert imported.returncode != 0 and "ModuleNotFoundError" in imported.stderr
    return python


def run_probe(python: Path | str) -> dict:
    result = subprocess.run(
        [str(python), "-m", "llmgrpc.engines.probe"], check=True, capture_output=True, text=True
    )
    return json.loads(result.stdout)


def test_the_probe_reports_each_hub_as_its_environment_sees_it(without_huggingface_hub: Path):
    here = run_probe(sys.executable)
    assert set(here["hubs"]) == set(HUBS)
    assert here["hubs"][HUGGINGFACE] is None
    assert (here["hubs"][MODELSCOPE] is None) == (importlib.util.find_spec("modelscope") is not None)

    there = run_probe(without_huggingface_hub)
    reason = there["hubs"][HUGGINGFACE]
    assert "huggingface_hub" in reason and str(without_huggingface_hub) in reason
    assert there["engines"]["Transformers"] is None  # the probe itself never imports a hub client


def test_an_environment_that_cannot_answer_makes_every_hub_unavailable(tmp_path: Path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    availability = EngineAvailability(Settings(worker_python={"llama.cpp": str(bare / "bin" / "python")}))

    async def ask() -> tuple[dict, dict]:
        try:
            return await availability.hub_reasons("llama.cpp"), await availability.hub_reasons("Transformers")
        finally:
            await availability.close()

    bare_hubs, own_hubs = asyncio.run(ask())
    assert set(bare_hubs) == set(HUBS)
    assert all("is llmgrpc installed there" in reason for reason in bare_hubs.values())
    assert own_hubs[HUGGINGFACE] is None


def test_list_specs_reports_hubs_as_the_serving_engines_environment_sees_them(
    without_huggingface_hub: Path, cache_dir: Path
):
    settings = Settings(
        port=0,
        cache_dir=cache_dir,
        device="cpu",
        worker_python=dict.fromkeys(PYTORCH_ENGINES, str(without_huggingface_hub)),
    )
    server = RunningServer(settings)
    try:
        with Client(server.endpoint) as client:
            (family,) = client.list_specs(model_name="llama-3.1")
            by_format = {spec.model_format: spec for spec in family.specs}
            pytorch_hubs = {hub.name: hub for hub in by_format["pytorch"].hubs}
            assert not pytorch_hubs[HUGGINGFACE].available
            assert "huggingface_hub" in pytorch_hubs[HUGGINGFACE].reason
            assert str(without_huggingface_hub) in pytorch_hubs[HUGGINGFACE].reason
            # llama.cpp runs on the server's own interpreter, which has the client.
            gguf_hubs = {hub.name: hub for hub in by_format["ggufv2"].hubs}
            assert gguf_hubs[HUGGINGFACE].available and not gguf_hubs[HUGGINGFACE].reason
    finally:
        server.stop()
