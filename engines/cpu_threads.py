"""CPU threads: how many an engine computes with when its launch does not say, and the one
rule that keeps them fast (compute happens on one long-lived thread per engine).

llama.cpp computes a step of one token (one stream decoding) with ``n_threads`` and any
larger step (several streams decoding together, or a prompt) with ``n_threads_batch``; both
default to every core this process may use: measured on 2 cores (``make bench``; the
*Thread defaults* in docs/engines.md), with compute kept on one thread (``on_a_thread_of_its_own``),
every core beat one thread for single-token steps (437 against 357 tok/s at one stream)
and one thread for everything (*One core left free* in docs/benchmarks.md). A launch
overrides either with those engine options.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) or 1


def llama_cpp_threads(cores: int) -> tuple[int, int]:
    """(n_threads, n_threads_batch) for llama.cpp on a machine of this many cores: all of them."""
    return cores, cores


async def on_a_thread_of_its_own(work: Callable[..., T], *args: Any) -> T:
    """work(*args) on a new thread that ends with it: asyncio.to_thread, but never on a thread
    that lives on in a pool (the context variables are copied, as to_thread copies them).

    OpenMP (llama.cpp's CPU threads, torch's) keeps a team of threads for each thread that has
    computed in parallel, for as long as that thread lives. Once the teams together outnumber
    the cores, libgomp cuts every team's spin-wait at its barriers to a thousand iterations,
    and each decode step runs up to 1.6x slower (bench-llama-100m on llama.cpp, one stream on
    2 cores: 1.8 ms a step against 2.9). A load that computes (its warm-up step) on a pooled
    thread would leave such a team beside the batcher thread's for the engine's whole life.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(outcome: Callable[[], None]) -> None:
        if not done.done():  # the waiter may have been cancelled meanwhile
            outcome()

    def run() -> None:
        try:
            result = context.run(work, *args)
        except BaseException as error:
            loop.call_soon_threadsafe(settle, functools.partial(done.set_exception, error))
        else:
            loop.call_soon_threadsafe(settle, functools.partial(done.set_result, result))

    # Not a daemon: like to_thread's, the process waits for it at exit (a load is never cut off
    # halfway by the interpreter shutting down).
    threading.Thread(target=run, name=getattr(work, "__name__", "work")).start()
    return await done
