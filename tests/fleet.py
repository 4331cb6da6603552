"""What a test server's models really are: worker processes and socket folders, read from the system.

Tests compare these with what ListModels says, so that nothing runs unlisted and nothing
is left behind (a worker of a terminated model, a socket folder of a stopped worker).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from rpc_helpers import wait_until

from llmgrpc.clients import Client

WORKER_MODULE = "llmgrpc.worker"
SOCKET_FOLDER_PREFIX = "llmgrpc-worker-"


def _arguments(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # it exited meanwhile
        return []


def _parent(pid: int) -> int:
    try:
        # The command name (field 2) may hold spaces: the parent id follows its closing ')'.
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""


def live_workers(parent: int | None = None) -> dict[int, dict]:
    """pid -> {"model_uid", "engine", "socket"} of this process's running worker processes (zombies
    left out). Every test server runs in this process: tell theirs apart by engine."""
    parent = os.getpid() if parent is None else parent
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or _parent(int(entry.name)) != parent:
            continue
        pid = int(entry.name)
        arguments = _arguments(pid)
        if WORKER_MODULE not in arguments or _state(pid) in ("Z", "X", ""):
            continue
        plan = json.loads(arguments[arguments.index("--plan") + 1])
        workers[pid] = {
            "model_uid": plan["model_uid"],
            "engine": plan["engine"],
            "socket": arguments[arguments.index("--socket") + 1],
        }
    return workers


def socket_folders() -> set[Path]:
    """Every worker socket folder in the temporary folder (of any server)."""
    return set(Path(tempfile.gettempdir()).glob(f"{SOCKET_FOLDER_PREFIX}*"))


class Gate:
    """A file whose creation lets whatever waits on it go on."""

    def __init__(self, folder: Path, name: str):
        self.path = folder / name

    def open(self) -> None:
        self.path.touch()

    def waited_on(self) -> bool:
        """Whether a Gated engine's load is waiting at this gate (see gated_engine)."""
        return Path(f"{self.path}.waiting").exists()


class Background:
    """A blocking call run in a thread: its result or error, once it has ended."""

    def __init__(self, call, *args, **kwargs):
        self.result = self.error = None
        self._thread = threading.Thread(target=self._run, args=(call, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, call, args, kwargs) -> None:
        try:
            self.result = call(*args, **kwargs)
        except Exception as error:  # the test reads it
            self.error = error

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float = 60.0):
        self._thread.join(timeout)
        assert self.done(), "the call did not end"
        return self


def gated_python(folder: Path, gate: Gate) -> str:
    """An interpreter for the Gated engine's probe and workers that starts only once gate is open."""
    script = folder / "gated-python"
    script.write_text(
        f"#!/bin/sh\nwhile [ ! -e '{gate.path}' ]; do sleep 0.02; done\nexec '{sys.executable}' \"$@\"\n"
    )
    script.chmod(0o755)
    return str(script)


def listed_uids(client: Client) -> set[str]:
    return {model.model_uid for model in client.list_models(timeout=30)}


def gated_workers() -> list[dict]:
    """The running workers of the Gated engine (the servers these tests start)."""
    return [worker for worker in live_workers().values() if worker["engine"] == "Gated"]


def worker_uids() -> set[str]:
    return {worker["model_uid"] for worker in gated_workers()}


def fleet_disagreement(client: Client) -> str:
    """How ListModels and the Gated workers disagree ("" when they agree): every running worker
    is of a listed model, and a listed model shows a worker pid for each of its replicas exactly
    when that replica's worker runs (READY and LOADING ones do; UNLOADED and FAILED ones do not).
    The model's own worker_pid is its first replica's."""
    models = client.list_models(timeout=30)
    listed = {model.model_uid: {r.worker_pid for r in model.replicas} - {0} for model in models}
    running: dict[str, set[int]] = {}
    for pid, worker in live_workers().items():
        if worker["engine"] == "Gated":
            running.setdefault(worker["model_uid"], set()).add(pid)
    unlisted = set(running) - set(listed)
    wrong = {uid for uid, pids in listed.items() if pids != running.get(uid, set())}
    wrong |= {
        model.model_uid
        for model in models
        if not model.replicas or model.worker_pid != model.replicas[0].worker_pid
    }
    return (
        f"workers of unlisted models {unlisted}, listed pids that do not run {wrong}"
        if unlisted or wrong
        else ""
    )


def assert_fleet_agrees(client: Client, folders_before: set[Path]) -> None:
    """ListModels, the worker processes and the socket folders tell the same story."""
    assert wait_until(lambda: not fleet_disagreement(client), timeout=20), fleet_disagreement(client)
    sockets = {Path(worker["socket"]).parent for worker in live_workers().values()}  # any server's
    assert wait_until(lambda: socket_folders() - folders_before <= sockets, timeout=20), (
        socket_folders() - folders_before - sockets
    )


def launch_held_at(client: Client, uid: str, gate: Gate) -> Background:
    """Launch gated-model as uid in the background and return once its load waits at gate
    (its worker is running and cannot stop until the gate opens)."""
    launch = Background(
        client.launch, "gated-model", model_uid=uid, engine_options={"load_gate": str(gate.path)}
    )
    assert wait_until(gate.waited_on, 60)
    return launch


class ServeProcess:
    """`llmgrpc serve` as its own process (settings from env); its gRPC and health addresses
    read from its log. Use as a context manager: on leaving, it is stopped (SIGTERM, then KILL)."""

    def __init__(self, command: list[str], env: dict[str, str], cwd: Path | None = None):
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=cwd
        )
        self.log_lines: list[str] = []
        self.addresses: dict[str, str] = {}
        threading.Thread(target=self._read_log, daemon=True).start()

    def _read_log(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line)
            for key, pattern in (
                ("grpc", r"listening on ([\w.]+:\d+)"),
                ("health", r"health.* on ([\w.]+:\d+)"),
            ):
                if match := re.search(pattern, line):
                    self.addresses.setdefault(key, match.group(1))

    def wait_listening(self, timeout: float = 60) -> tuple[str, str]:
        """The gRPC and health addresses, once the log has said both."""
        assert wait_until(lambda: len(self.addresses) == 2, timeout=timeout), self.log()
        return self.addresses["grpc"], self.addresses["health"]

    def log(self, last: int = 20) -> str:
        return "".join(self.log_lines[-last:])

    def stop(self) -> int:
        """SIGTERM, and the exit code once it has drained."""
        self.process.terminate()
        return self.process.wait(timeout=30)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
