"""How a worker process ended, in words a person can act on: its exit code or signal, a plain
reading of that signal, and the last lines it wrote to stderr.

The server passes a worker's stderr through to its own (``StderrTail``), keeping the last
``TAIL_BYTES``, so that the model's condition, the status a caller gets and the log line all
say why the worker died: "killed by signal SIGILL" alone does not tell a person that the
engine's build does not fit the host's CPU, nor what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from dataclasses import dataclass

# Bounded so that the status a caller gets stays well inside gRPC's 8 KiB of trailing metadata.
TAIL_BYTES = 1024

# What a signal usually means for a model worker, and what to do about it.
SIGNAL_READINGS = {
    signal.SIGILL: (
        "the engine's build uses a CPU instruction this host cannot run: rebuild it "
        "(see docs/engines.md, The llama.cpp build; `llmgrpc doctor` checks the build against this host)"
    ),
    signal.SIGKILL: "killed, often by the kernel's out-of-memory killer (see the kernel log, dmesg)",
    signal.SIGSEGV: "the engine crashed on an invalid memory access (a bug in its library or its build)",
    signal.SIGABRT: "the engine aborted, usually on a failed assertion in the engine library",
    signal.SIGBUS: "a bus error, often a model file that was truncated or replaced while mapped",
    signal.SIGFPE: "the engine crashed on an arithmetic fault",
    signal.SIGTERM: "terminated by another process",
}


@dataclass(frozen=True)
class WorkerExit:
    """A worker's exit status (Popen's returncode: negative for a signal) and its stderr's end."""

    returncode: int
    stderr_tail: str = ""

    @property
    def signal(self) -> signal.Signals | None:
        if self.returncode >= 0:
            return None
        with contextlib.suppress(ValueError):
            return signal.Signals(-self.returncode)
        return None

    @property
    def signal_name(self) -> str | None:
        if self.returncode >= 0:
            return None
        return self.signal.name if self.signal else f"signal {-self.returncode}"

    @property
    def message(self) -> str:
        if self.returncode >= 0:
            what = f"the worker process exited with code {self.returncode}"
        else:
            what = f"the worker process was killed by signal {self.signal_name}"
            if self.signal in SIGNAL_READINGS:
                what += f": {SIGNAL_READINGS[self.signal]}"
        if self.stderr_tail:
            what += f"; its last words on stderr: {self.stderr_tail}"
        return what

    def metadata(self) -> dict[str, str]:
        """Facts for the status's ErrorInfo metadata (the stderr tail is in the message alone)."""
        facts = {"exit_code": str(self.returncode)}
        if self.signal_name:
            facts["signal"] = self.signal_name
        return facts


def last_lines(data: bytes) -> str:
    """The tail's whole lines (a cut first line dropped), joined for one log or status line."""
    lines = data.decode("utf-8", errors="replace").splitlines()
    if len(data) >= TAIL_BYTES and len(lines) > 1:
        lines = lines[1:]
    return " | ".join(line.strip() for line in lines if line.strip())


class StderrTail:
    """Copies a worker's stderr to the server's own, keeping the last TAIL_BYTES of it."""

    def __init__(self, stream: asyncio.StreamReader):
        self._tail = bytearray()
        self._copying = asyncio.ensure_future(self._copy(stream))

    async def _copy(self, stream: asyncio.StreamReader) -> None:
        out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
        while chunk := await stream.read(65536):
            if out is not None:
                with contextlib.suppress(OSError, ValueError):
                    out.write(chunk)
                    out.flush()
            self._tail += chunk
            del self._tail[:-TAIL_BYTES]

    async def drained(self, within_s: float) -> None:
        """Wait for the end of the stream (the process and whatever inherited its stderr closed
        it), at most within_s: an engine's child may keep it open after the worker died."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._copying), within_s)

    def close(self) -> None:
        self._copying.cancel()

    @property
    def text(self) -> str:
        return last_lines(bytes(self._tail))
