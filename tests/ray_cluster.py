"""A Ray cluster of two hosts for the tests: each host a network namespace on the test's own
bridge (test_proxy's Network), Ray's head on one, a Ray worker node on the other, both run by
the vLLM environment's `ray`. Each node offers one `vllm_cpu`: room for one of vLLM's model
workers on the CPU (deploy/vllm-cpu/patch_source.py). Whatever it started is ended by process
id, namespace by namespace, and the namespaces are removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from rpc_helpers import wait_until
from test_proxy import Network

RAY_PORT = 6379
# The resource vLLM's CPU build asks Ray for, one per model worker.
CPU_WORKER_RESOURCE = "vllm_cpu"


@dataclass
class Host:
    namespace: str
    address: str


@dataclass
class RayCluster:
    ray: Path  # the `ray` command of the environment that has vLLM
    folder: Path
    network: Network = field(default_factory=Network)
    hosts: list[Host] = field(default_factory=list)

    @property
    def head(self) -> Host:
        return self.hosts[0]

    @property
    def address(self) -> str:
        """Where the head's GCS listens: what `ray start --address` and ray_address take."""
        return f"{self.head.address}:{RAY_PORT}"

    def start(self) -> None:
        Network.remove_stale()
        self.network.start()
        self.network.join()
        for name, number in (("head", 2), ("node", 3)):
            self.hosts.append(Host(*self.network.host(name, number)))
        self._ray(self.head, "--head", f"--port={RAY_PORT}", "--include-dashboard=false")
        self._ray(self.hosts[1], f"--address={self.address}")
        assert wait_until(lambda: self.nodes() == 2, timeout=120), self.status()

    def _ray(self, host: Host, *how: str) -> None:
        """`ray start` on host: it starts Ray's processes there and returns."""
        log = self.folder / f"ray-{host.namespace}.log"
        subprocess.run(
            ["ip", "netns", "exec", host.namespace, str(self.ray), "start", *how]
            + [f"--node-ip-address={host.address}", "--num-cpus=1"]
            + [f'--resources={{"{CPU_WORKER_RESOURCE}": 1}}', "--disable-usage-stats"],
            check=True,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            timeout=180,
            env=self.environment(),
        )

    def environment(self) -> dict[str, str]:
        """Ray's processes and the model workers it starts: torch.distributed (gloo, on the CPU)
        between the workers on the host's network, not on the address its name resolves to."""
        return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "GLOO_SOCKET_IFNAME": "eth0"}

    def status(self) -> str:
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.head.namespace,
                str(self.ray),
                "status",
                f"--address={self.address}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.environment(),
        )
        return done.stdout + done.stderr

    def nodes(self) -> int:
        """The nodes the head counts as alive."""
        active = self.status().partition("Active:")[2].partition("Pending:")[0]
        return len(re.findall(r"^\s*1 node_", active, re.MULTILINE))

    def pids(self, host: Host) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", host.namespace], capture_output=True, text=True)
        return [int(pid) for pid in listed.stdout.split()]

    def arguments(self, host: Host) -> list[bytes]:
        """The command lines of the processes running on host."""
        found = []
        for pid in self.pids(host):
            with contextlib.suppress(OSError):
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        return found

    def stop(self) -> None:
        """End every process of the cluster's namespaces (TERM, then KILL), then the network."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for host in self.hosts:
                for pid in self.pids(host):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + 15
            while any(self.pids(host) for host in self.hosts) and time.monotonic() < deadline:
                time.sleep(0.2)
        self.network.remove()
