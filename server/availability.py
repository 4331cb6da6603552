"""Which engines can run here: asked of each engine's own Python environment, once.

The server never imports an engine library: it runs ``llmgrpc.engines.probe`` with the
interpreter an engine's workers will use, and keeps the answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from llmgrpc.engines.catalogue import PLUGINS_ENV, engines
from llmgrpc.engines.errors import FailedPrecondition, Reason
from llmgrpc.server.settings import Settings

PROBE_TIMEOUT_S = 120.0


class EngineAvailability:
    """Cached probe results, one per interpreter."""

    def __init__(self, settings: Settings):
        self._settings = settings
        self._probes: dict[str, asyncio.Task[dict[str, Any]]] = {}

    def python_for(self, engine: str) -> str:
        return self._settings.worker_python.get(engine, sys.executable)

    def start(self) -> None:
        """Begin probing every environment in the background."""
        for info in engines():
            self._probe(self.python_for(info.name))

    async def reasons(self) -> dict[str, str | None]:
        """Each engine's reason it cannot run here, or None when it can."""
        return {info.name: await self.reason(info.name) for info in engines()}

    async def reason(self, engine: str) -> str | None:
        report = await self._probe(self.python_for(engine))
        if "error" in report:
            return report["error"]
        return report["engines"].get(
            engine, f"the environment {self.python_for(engine)} does not know {engine}"
        )

    async def cuda_devices(self, engine: str) -> list[dict[str, Any]]:
        """CUDA devices seen by engine's environment, with free memory read now."""
        python = self.python_for(engine)
        self._probes.pop(python, None)  # free memory changes: ask again
        return (await self._probe(python)).get("cuda_devices", [])

    async def require(self, engine: str) -> None:
        reason = await self.reason(engine)
        if reason:
            raise FailedPrecondition(
                f"engine {engine} cannot run on this server: {reason}", reason=Reason.ENGINE_UNAVAILABLE
            )

    async def close(self) -> None:
        """Stop probes still running (their processes are killed)."""
        for task in self._probes.values():
            task.cancel()
        await asyncio.gather(*self._probes.values(), return_exceptions=True)

    def _probe(self, python: str) -> asyncio.Task[dict[str, Any]]:
        if python not in self._probes:
            plugins = json.dumps(self._settings.engine_plugins)
            self._probes[python] = asyncio.ensure_future(_run_probe(python, plugins))
        return self._probes[python]


async def _run_probe(python: str, plugins: str) -> dict[str, Any]:
    try:
        process = await asyncio.create_subprocess_exec(
            python,
            "-m",
            "llmgrpc.engines.probe",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, PLUGINS_ENV: plugins},
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), PROBE_TIMEOUT_S)
        except BaseException:  # timed out, or the server is stopping: leave no process behind
            process.kill()
            await process.wait()
            raise
    except (OSError, asyncio.TimeoutError) as error:
        return {"error": f"could not run {python} to check its engines: {error!r}"}
    if process.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return {
            "error": f"{python} cannot run llmgrpc's engine probe (is llmgrpc installed there?): {tail[0]}"
        }
    return json.loads(stdout)
