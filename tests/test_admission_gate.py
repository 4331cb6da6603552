"""The admission gate (server/launched.py's AdmissionGate): priority order and waiters that leave."""

from __future__ import annotations

import asyncio

from llmgrpc.server.launched import AdmissionGate


def test_a_waiting_request_of_lower_priority_value_is_admitted_first():
    async def scenario() -> list[str]:
        gate = AdmissionGate(max_running=1, max_waiting=8)
        admitted: list[str] = []
        release = asyncio.Event()

        async def request(name: str, priority: int) -> None:
            async with gate.slot("m", priority):
                admitted.append(name)
                await release.wait()

        first = asyncio.create_task(request("running", 10))
        await asyncio.sleep(0)
        queued = [asyncio.create_task(request(f"p10-{i}", 10)) for i in range(5)]
        await asyncio.sleep(0)
        urgent = asyncio.create_task(request("p0", 0))
        await asyncio.sleep(0)
        assert gate.waiting == 6
        release.set()
        await asyncio.gather(first, *queued, urgent)
        return admitted

    assert asyncio.run(scenario()) == ["running", "p0", *(f"p10-{i}" for i in range(5))]


def test_a_waiter_that_leaves_gives_its_place_up():
    async def scenario() -> int:
        gate = AdmissionGate(max_running=1, max_waiting=2)
        release = asyncio.Event()

        async def hold() -> None:
            async with gate.slot("m"):
                await release.wait()

        holder = asyncio.create_task(hold())
        await asyncio.sleep(0)
        leaver = asyncio.create_task(hold())
        await asyncio.sleep(0)
        leaver.cancel()
        await asyncio.gather(leaver, return_exceptions=True)
        waiting = gate.waiting
        release.set()
        await holder
        assert gate.running == 0
        return waiting

    assert asyncio.run(scenario()) == 0
