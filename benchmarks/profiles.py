"""Sampling profiles of running processes with py-spy, summed up per thread and per function.

Only samples of a thread holding the GIL are kept: what Python itself runs. A native call
that releases the GIL (llama_decode through ctypes, torch's kernels, gRPC's core) does not
count, so a thread's share of the samples is the share of wall time it kept the
interpreter busy, and the shares of one process add up to at most 100%."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

PY_SPY = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
RATE = 100  # samples per second
_LINE = re.compile(r"^thread \((\d+)\): (.*) (\d+)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def available() -> bool:
    return PY_SPY is not None


def start(pid: int, duration_s: float, output: Path) -> subprocess.Popen:
    """py-spy sampling pid's thread that holds the GIL for duration_s, without pausing it, into output."""
    assert PY_SPY is not None
    command = [PY_SPY, "record", "--pid", str(pid), "--duration", str(int(duration_s)), "--rate", str(RATE)]
    command += ["--format", "raw", "--threads", "--gil", "--nonblocking", "--output", str(output)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def summarize(path: Path, duration_s: float, top: int = 6) -> dict:
    """Per thread name: the share of wall time it held the GIL, and where (its leaf frames)."""
    threads: dict[str, Counter] = {}
    for line in path.read_text().splitlines():
        found = _LINE.match(line)
        if not found:
            continue
        _, stack, count = found.groups()
        name, *frames = stack.split(";")
        name = re.sub(r"[-_]?\d+$", "", name)  # one entry for a pool's numbered threads
        leaf = _FRAME.match(frames[-1]) if frames else None
        where = f"{leaf.group(1)} ({Path(leaf.group(2)).name})" if leaf else (frames[-1] if frames else "?")
        threads.setdefault(name, Counter())[where] += int(count)
    possible = duration_s * RATE
    summary = {}
    for name, leaves in sorted(threads.items(), key=lambda item: -sum(item[1].values())):
        samples = sum(leaves.values())
        summary[name] = {
            "gil": samples / possible,
            "top": [(where, count / samples) for where, count in leaves.most_common(top)],
        }
    return summary
