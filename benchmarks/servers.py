"""The servers under test, each a process of its own with its output in a log file:
``llmgrpc serve``, ``python -m llama_cpp.server``, ``xllamacpp_server.py``, ``vllm serve`` and
the model gateway ``smg`` in front of llmgrpc; and the in-process baseline (``inprocess.py``),
driven over its standard input and output.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc
from streams import Level

from llmgrpc.engines.base import LoadPlan

HERE = Path(__file__).parent
PYTHON = sys.executable
READY_SERVICE = "llmgrpc.v1.GenerateService"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Process:
    """A child process, its output in a log file, stopped with SIGINT then SIGKILL."""

    def __init__(self, command: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self._log = open(log_path, "w")  # closed in stop()
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.process.pid

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log_path.read_text(errors="replace"))
            if found:
                return found
            self.check_alive()
            time.sleep(0.05)
        raise RuntimeError(f"{self.log_path.name}: no {pattern!r} within {timeout:.0f} s; {self.tail()}")

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.log_path.name}: exited with {self.process.returncode}; {self.tail()}")

    def tail(self) -> str:
        return "log tail:\n" + self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            wait_or_kill(self.process)
        self._log.close()


def wait_or_kill(process: subprocess.Popen, timeout_s: float = 30) -> None:
    """Wait for a process asked to stop; kill it if it has not within timeout_s."""
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process so far (its threads, not its children)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class OutsideLoad:
    """CPU that processes other than this one and its descendants use meanwhile, in cores.

    The machine may be shared: a measurement taken while something else ran is told apart.
    """

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        times = psutil.cpu_times()
        busy = sum(times) - times.idle - getattr(times, "iowait", 0.0)
        ours = 0.0
        for process in [self._me, *self._me.children(recursive=True)]:
            try:
                ours += sum(process.cpu_times()[:2])
            except psutil.Error:  # it ended meanwhile
                pass
        return time.perf_counter(), busy, ours

    def cores(self) -> float:
        (then, busy_then, ours_then), (now, busy, ours) = self._start, self._sample()
        return max(0.0, (busy - busy_then) - (ours - ours_then)) / max(now - then, 1e-6)


class Llmgrpc(Process):
    """``llmgrpc serve`` on a free port; ready once health says GenerateService is SERVING."""

    def __init__(self, log_path: Path, *settings: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        command = [str(Path(PYTHON).with_name("llmgrpc")), "serve", "--port", str(self.port), *settings]
        super().__init__(command, log_path, env)

    def wait_ready(self, timeout: float = 60) -> float:
        """Seconds from process start to health SERVING."""
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.endpoint) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(service=READY_SERVICE), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - self.started
                except grpc.RpcError:
                    pass
                self.check_alive()
                time.sleep(0.005)
        raise RuntimeError(f"llmgrpc not SERVING within {timeout:.0f} s; {self.tail()}")


# llama-cpp-python's server, with ggml's CPU backend registered first: the project's build
# chooses its CPU variant at run time (engines/llamacpp_build.py), which the server itself does not.
LLAMA_CPP_SERVER = (
    "from llmgrpc.engines.llamacpp_build import import_llama_cpp; import_llama_cpp(); "
    "import runpy, sys; sys.argv[0] = 'llama_cpp.server'; "
    "runpy.run_module('llama_cpp.server', run_name='__main__')"
)


class LlamaCppServer(Process):
    """llama-cpp-python's own server (one Llama object, requests served one at a time)."""

    def __init__(self, log_path: Path, model_file: Path, threads: int, interrupt: bool):
        self.port = free_port()
        command = [PYTHON, "-c", LLAMA_CPP_SERVER, "--model", str(model_file), "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--n_threads", str(threads), "--n_threads_batch", str(threads)]
        command += ["--interrupt_requests", str(interrupt)]
        super().__init__(command, log_path)
        self.wait_for(r"Uvicorn running on", 120)


class XllamacppServer(Process):
    """llama.cpp's C++ server from the xllamacpp wheel, with parallel slots."""

    def __init__(self, log_path: Path, model_file: Path, threads: int, slots: int, context_per_slot: int):
        command = [PYTHON, str(HERE / "xllamacpp_server.py"), str(model_file), "--threads", str(threads)]
        command += ["--parallel", str(slots), "--context-per-slot", str(context_per_slot)]
        super().__init__(command, log_path)
        self.port = int(self.wait_for(r"listening on http://[\d.]+:(\d+)", 120).group(1))


class VllmServer(Process):
    """vLLM's own OpenAI-compatible server (``vllm serve``, from the environment that has vLLM)
    on a free port, serving model_dir as served_name; ready once its application has started."""

    def __init__(
        self, log_path: Path, python: str, model_dir: Path, served_name: str, *options: str, env=None
    ):
        self.port = free_port()
        command = [str(Path(python).with_name("vllm")), "serve", str(model_dir)]
        command += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--disable-uvicorn-access-log", *options]
        super().__init__(command, log_path, env)
        try:
            self.wait_for(r"Application startup complete", 900)
        except RuntimeError:
            self.stop()
            raise


class SmgGateway(Process):
    """The Shepherd Model Gateway (``smg``, the dev extra's binary) in front of one llmgrpc
    engine-contract listener, with `make gateway`'s options; ready once /v1/models lists model.
    It reads the tokenizer from the folder the worker's GetModelInfo names."""

    def __init__(self, log_path: Path, worker: str, model: str, timeout: float = 120):
        self.port = free_port()
        command = [str(Path(PYTHON).with_name("smg")), "launch", "--backend", "vllm"]
        command += ["--worker-urls", f"grpc://{worker}", "--tool-call-parser", "llama"]
        command += ["--policy", "cache_aware"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), "--prometheus-port", str(free_port())]
        super().__init__(command, log_path)
        self.base_url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while model not in self.models():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"smg did not list {model} within {timeout:.0f} s; {self.tail()}")
            time.sleep(0.2)

    def models(self) -> list[str]:
        try:
            with urllib.request.urlopen(f"{self.base_url}/v1/models", timeout=2) as answer:
                return [model["id"] for model in json.load(answer).get("data", [])]
        except OSError:  # not listening yet
            return []


def gateway_token_ids(worker: str, texts: list[str]) -> dict[str, list[int]]:
    """Each text's token ids as smg makes them: the tokenizer folder the worker's GetModelInfo
    names, no beginning-of-text token."""
    from smg_grpc_proto.generated import vllm_engine_pb2, vllm_engine_pb2_grpc
    from transformers import AutoTokenizer

    with grpc.insecure_channel(worker) as channel:
        info = vllm_engine_pb2_grpc.VllmEngineStub(channel).GetModelInfo(
            vllm_engine_pb2.GetModelInfoRequest(), timeout=60
        )
    tokenizer = AutoTokenizer.from_pretrained(info.tokenizer_path)
    return {text: tokenizer(text, add_special_tokens=False).input_ids for text in texts}


class InProcess:
    """inprocess.py in one mode on one plan: the model loaded once, levels run on request."""

    def __init__(self, log_path: Path, mode: str, plan: LoadPlan, env: dict[str, str] | None = None):
        self._log = open(log_path, "w")  # closed in stop()
        self.log_path = log_path
        self.process = subprocess.Popen(
            [PYTHON, str(HERE / "inprocess.py"), mode, json.dumps(plan.to_json_dict())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.pid = self.process.pid
        self.load_s = json.loads(self._answer())["load_s"]

    def _answer(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"{self.log_path.name}: exited with {self.process.returncode}; log tail:\n{tail}"
            )
        return line

    def level(self, concurrency: int, max_tokens: int) -> Level:
        self.process.stdin.write(json.dumps({"concurrency": concurrency, "max_tokens": max_tokens}) + "\n")
        self.process.stdin.flush()
        return Level.from_json(json.loads(self._answer()))

    def stop(self) -> None:
        self.process.stdin.close()
        wait_or_kill(self.process)
        self._log.close()
