"""An engine's workers run on the interpreter its settings name, not the server's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RunningServer
from environments import make_environment

from llmgrpc.clients import Client
from llmgrpc.server.settings import Settings


@pytest.fixture(scope="module")
def second_environment(tmp_path_factory) -> Path:
    """A separate virtual environment that sees this one's packages (as an engine's own venv
    would see its own), so it can run llmgrpc's worker."""
    return make_environment(tmp_path_factory.mktemp("engine-venv"))


def test_workers_start_with_the_engine_interpreter(second_environment: Path, cache_dir: Path):
    settings = Settings(
        port=0, cache_dir=cache_dir, device="cpu", worker_python={"Transformers": str(second_environment)}
    )
    server = RunningServer(settings)
    try:
        with Client(server.endpoint) as client:
            engines = {e.name: e for e in client.list_specs(model_name="tiny-llama-3.1")[0].specs[0].engines}
            assert engines["Transformers"].available
            model = client.launch("tiny-llama-3.1", model_uid="elsewhere", timeout=300)
            command_line = Path(f"/proc/{model.worker_pid}/cmdline").read_bytes().split(b"\0")
            assert os.fsdecode(command_line[0]) == str(second_environment)
            assert os.fsdecode(command_line[0]) != sys.executable
            pieces = list(client.generate("elsewhere", "Hello", max_tokens=4, temperature=0))
            assert pieces[-1].usage.completion_tokens == 4
    finally:
        server.stop()


def test_an_environment_without_llmgrpc_is_reported_not_crashed(tmp_path: Path, cache_dir: Path):
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    settings = Settings(
        port=0, cache_dir=cache_dir, device="cpu", worker_python={"vLLM": str(bare / "bin" / "python")}
    )
    server = RunningServer(settings)
    try:
        with Client(server.endpoint) as client:
            engines = {e.name: e for e in client.list_specs(model_name="tiny-llama-3.1")[0].specs[0].engines}
            assert not engines["vLLM"].available
            assert "is llmgrpc installed there" in engines["vLLM"].reason
            assert engines["Transformers"].available  # other environments are unaffected
    finally:
        server.stop()
