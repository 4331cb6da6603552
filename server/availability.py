"""Which engines and hubs can be used here: asked of each engine's own Python environment, once.

The server never imports an engine library: it runs ``llmgrpc.engines.probe`` with the
interpreter an engine's workers will use, and keeps the answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from llmgrpc.clients.errors import FailedPrecondition, Reason
from llmgrpc.engines.catalogue import PLUGINS_ENV, engines
from llmgrpc.engines.weights.hubs import HUBS
from llmgrpc.server.settings import Settings
from llmgrpc.server.worker_environment import inherited_environment

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
        report = await self._report(self.python_for(engine))
        if "error" in report:
            return report["error"]
        return report["engines"].get(
            engine, f"the environment {self.python_for(engine)} does not know {engine}"
        )

    async def hub_reasons(self, engine: str) -> dict[str, str | None]:
        """Each hub's reason it cannot be used by engine's workers, or None when it can: asked of
        engine's environment, where they download (its hub clients, not the server's, count)."""
        python = self.python_for(engine)
        report = await self._report(python)
        if "error" in report:
            return dict.fromkeys(HUBS, report["error"])
        reported = report.get("hubs", {})
        return {
            hub: reported.get(hub, f"the environment {python} does not know the hub {hub}") for hub in HUBS
        }

    async def cuda_devices(self, engine: str) -> list[dict[str, Any]]:
        """CUDA devices seen by engine's environment, with free memory read now."""
        python = self.python_for(engine)
        probe = self._probes.get(python)
        if probe is not None and probe.done():  # free memory changes: ask again (a running probe is fresh)
            del self._probes[python]
        return (await self._report(python)).get("cuda_devices", [])

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
            self._probes[python] = asyncio.ensure_future(
                _run_probe(python, probe_environment(self._settings, plugins))
            )
        return self._probes[python]

    async def _report(self, python: str) -> dict[str, Any]:
        """The probe's answer for python. The probe is shared by every caller that waits for it:
        one caller going away (cancelled, past its deadline) must not cancel it for the others,
        and a probe that ended without an answer is not kept, so the next caller asks again."""
        probe = self._probe(python)
        try:
            report = await asyncio.shield(probe)
        except asyncio.CancelledError:
            if probe.cancelled() and self._probes.get(python) is probe:
                del self._probes[python]
            raise
        except BaseException:
            if self._probes.get(python) is probe:
                del self._probes[python]
            raise
        if "error" in report and self._probes.get(python) is probe:
            del self._probes[python]  # the environment could not answer: ask again next time
        return report


def probe_environment(settings: Settings, plugins: str) -> dict[str, str]:
    """What a probe process sees: a worker's allow-listed environment (no secrets) and the plugins."""
    inherited = inherited_environment(
        os.environ, hub_credentials=False, also=settings.worker_environment_names
    )
    return {**inherited, PLUGINS_ENV: plugins}


async def _run_probe(python: str, env: dict[str, str]) -> dict[str, Any]:
    try:
        process = await asyncio.create_subprocess_exec(
            python,
            "-m",
            "llmgrpc.engines.probe",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
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
