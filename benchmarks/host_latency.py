"""How long a light process on this host waits for a CPU while an engine works.

An engine may keep the cores busy in ways that starve everything else on the host (the
gRPC server, its clients, health probes): a separate process that sleeps 10 ms at a time
measures how late its wake-ups come while the engine is measured.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

# Sleeps 10 ms at a time (select on stdin) until stdin closes, then prints its latest wake-up.
_SLEEPER = """
import select, sys, time
longest, last = 0.0, time.monotonic()
while not select.select([sys.stdin], [], [], 0.01)[0]:
    now = time.monotonic()
    longest, last = max(longest, now - last - 0.01), now
print(longest)
"""


@contextlib.contextmanager
def idle_sleeper() -> Iterator[dict[str, float]]:
    """While the block runs, a sleeper process of its own; afterwards the dict holds
    ``longest_wait_ms``: the most its wake-up was late, i.e. the longest it waited for a CPU."""
    child = subprocess.Popen(
        [sys.executable, "-c", _SLEEPER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        output, _ = child.communicate("", timeout=60)  # closing its stdin ends it
        result["longest_wait_ms"] = 1000 * float(output)
