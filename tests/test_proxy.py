"""Two llmgrpc replicas behind a real gRPC proxy, across hosts.

The test makes its own little network: three hosts, each a network namespace with its own
address on a bridge (itself in a fourth namespace), and a link from this test's namespace to the
bridge. Hosts a and b each run `llmgrpc serve` with the same models file; host proxy runs nginx
with deploy/nginx/llmgrpc.conf (its addresses replaced), passing gRPC to both. Through the proxy:
streams carry the same tokens as direct calls, a cancel stops the engine's work, a deadline
reaches the engine as grpc-timeout, and a SIGTERM to one replica while 16 streams run lets every
stream finish while new calls land on the other one without a failure a retrying client sees.

Needs root (network namespaces), iproute2 and nginx (`apt-get install nginx-light`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from conftest import TINY
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_helpers import collect, wait_until

from llmgrpc.clients import Client
from llmgrpc.v1 import generate_pb2

LLMGRPC = Path(sys.executable).with_name("llmgrpc")
NGINX_EXAMPLE = Path(__file__).parent.parent / "deploy" / "nginx" / "llmgrpc.conf"
UID = "tiny"
PORT = 50051
PROXY_PORT = 8080
GRACE_S = 60
# Ours alone: a test run's own subnet, on links that exist only inside its namespaces and one
# link from this namespace; no traffic leaves them.
PREFIX = f"10.213.{os.getpid() % 200 + 20}"
# A client as docs/deploy.md shows it: retry UNAVAILABLE (a draining replica's answer) elsewhere.
RETRY_SERVICE_CONFIG = {
    "methodConfig": [
        {
            "name": [{"service": "llmgrpc.v1.GenerateService"}, {"service": "llmgrpc.v1.ModelService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def channel(address: str, *, retries: bool = False) -> grpc.Channel:
    # Straight to the test's own hosts, never through a proxy set in the environment.
    options = [("grpc.enable_http_proxy", 0)]
    if retries:
        options += [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(RETRY_SERVICE_CONFIG))]
    return grpc.insecure_channel(address, options=options)


@dataclass
class Network:
    """Namespaces on one bridge: each host gets PREFIX.N/24 on its eth0."""

    tag: str = field(default_factory=lambda: f"llmgrpc-test-{os.getpid()}")
    namespaces: list[str] = field(default_factory=list)
    root_link: str = field(default_factory=lambda: f"lg{os.getpid()}")

    def start(self) -> None:
        self.lan = self._namespace("lan")
        run("ip", "-n", self.lan, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.lan, "link", "set", "br0", "up")

    @staticmethod
    def remove_stale() -> None:
        """Namespaces an earlier run left when it was killed: their processes, then themselves."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        for match in re.finditer(r"^(llmgrpc-test-(\d+)-\w+)", listed, re.MULTILINE):
            namespace, pid = match.group(1), int(match.group(2))
            if Path(f"/proc/{pid}").exists():
                continue  # a run still going
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
            for left in pids.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(left), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)

    def _namespace(self, name: str) -> str:
        namespace = f"{self.tag}-{name}"
        run("ip", "netns", "add", namespace)
        self.namespaces.append(namespace)
        run("ip", "-n", namespace, "link", "set", "lo", "up")
        return namespace

    def _plug(self, name: str, host_side: list[str]) -> None:
        port = f"to-{name}"
        run("ip", "link", "add", *host_side, "type", "veth", "peer", "name", port, "netns", self.lan)
        run("ip", "-n", self.lan, "link", "set", port, "master", "br0", "up")

    def host(self, name: str, number: int) -> tuple[str, str]:
        """A new host on the bridge: (namespace, address)."""
        namespace = self._namespace(name)
        address = f"{PREFIX}.{number}"
        self._plug(name, ["eth0", "netns", namespace])
        run("ip", "-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        run("ip", "-n", namespace, "link", "set", "eth0", "up")
        return namespace, address

    def join(self) -> None:
        """This test's own namespace on the bridge, as PREFIX.1, to reach the hosts."""
        self._plug("test", [self.root_link])
        run("ip", "addr", "add", f"{PREFIX}.1/24", "dev", self.root_link)
        run("ip", "link", "set", self.root_link, "up")

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.root_link], capture_output=True)
        for namespace in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)


@dataclass
class Replica:
    name: str
    address: str
    process: subprocess.Popen
    log: Path

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{PORT}"

    def running_requests(self) -> int:
        with channel(self.endpoint) as direct:
            return Client(self.endpoint, channel=direct).get_model(UID, timeout=5).running_requests

    def ready(self) -> bool:
        with channel(self.endpoint) as direct:
            request = health_pb2.HealthCheckRequest(service="llmgrpc.v1.GenerateService")
            try:
                status = health_pb2_grpc.HealthStub(direct).Check(request, timeout=2).status
            except grpc.RpcError:
                return False
            return status == health_pb2.HealthCheckResponse.SERVING


@dataclass
class Fleet:
    replicas: dict[str, Replica]
    proxy: str
    access_log: Path

    def upstream_log(self) -> list[tuple[str, str, str, str]]:
        """nginx's access log, one entry per call as it ended: (path, the caller's x-call header,
        the upstream addresses tried, grpc-status)."""
        lines = self.access_log.read_text().splitlines() if self.access_log.exists() else []
        entries = []
        for line in lines:
            path, call, upstream, trailer_status, header_status = line.split("|")
            # A Trailers-Only response carries its grpc-status in the headers; nginx logs "-" for none.
            entries.append((path, call, upstream, header_status if trailer_status == "-" else trailer_status))
        return entries


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (path for path in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(path).exists()), None
    )


def nginx_config(folder: Path, listen: str, upstreams: list[str]) -> Path:
    """deploy/nginx/llmgrpc.conf as shipped, its addresses replaced, in an nginx.conf whose
    pid, logs and temporary files stay in folder."""
    example = NGINX_EXAMPLE.read_text()
    servers = "".join(f"    server {upstream};\n" for upstream in upstreams)
    site, count = re.subn(
        r"(upstream llmgrpc \{\n)(    server [^\n]+\n)+", lambda m: m.group(1) + servers, example
    )
    assert count == 1, "the example's upstream block changed shape"
    site, count = re.subn(r"listen [^ ]+ http2;", f"listen {listen} http2;", site)
    assert count == 1, "the example's listen line changed shape"
    (folder / "llmgrpc.conf").write_text(site)
    temp = folder / "temp"
    temp.mkdir()
    config = folder / "nginx.conf"
    config.write_text(
        f"""user root;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 1024; }}
http {{
    log_format upstreams '$request_uri|$http_x_call|$upstream_addr|'
                         '$upstream_trailer_grpc_status|$upstream_http_grpc_status';
    access_log {folder}/access.log upstreams;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    include {folder}/llmgrpc.conf;
}}
"""
    )
    return config


def start_replica(network: Network, name: str, number: int, models_file: Path, cache_dir: Path, folder: Path):
    namespace, address = network.host(name, number)
    log = folder / f"{name}.log"
    process = subprocess.Popen(
        ["ip", "netns", "exec", namespace, str(LLMGRPC), "serve", "--host", address, "--port", str(PORT)]
        + ["--models-file", str(models_file), "--cache-dir", str(cache_dir)]
        + ["--shutdown-grace-s", str(GRACE_S), "--max-running-requests", "16", "--log-format", "text"],
        env={**os.environ, "HOME": str(folder)},
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
    )
    return Replica(name, address, process, log)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, cache_dir) -> Iterator[Fleet]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (the ip command) is not installed")
    nginx = nginx_binary()
    if nginx is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    folder = tmp_path_factory.mktemp("fleet")
    folder.chmod(0o755)
    models_file = folder / "models.yaml"
    # Two hosts on one machine's cores: each gets its share (docs/engines.md, Thread defaults), else both
    # engines' threads contend for every core and the drain tests time out on a busy machine.
    models_file.write_text(
        f"models:\n  - {{model_name: {TINY}, model_uid: {UID}, device: cpu,"
        " engine_options: {n_threads: 1}}\n"
    )
    Network.remove_stale()
    network = Network()
    try:
        network.start()
    except subprocess.CalledProcessError as error:
        network.remove()
        pytest.skip(f"cannot make network namespaces here: {error.stderr.decode().strip()}")
    processes: list[subprocess.Popen] = []
    try:
        network.join()
        replicas = {
            name: start_replica(network, name, number, models_file, cache_dir, folder)
            for name, number in (("a", 2), ("b", 3))
        }
        processes += [replica.process for replica in replicas.values()]
        proxy_namespace, proxy_address = network.host("proxy", 4)
        config = nginx_config(
            folder, f"{proxy_address}:{PROXY_PORT}", [r.endpoint for r in replicas.values()]
        )
        nginx_process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                proxy_namespace,
                nginx,
                "-p",
                str(folder),
                "-e",
                str(folder / "error.log"),
            ]
            + ["-c", str(config), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=(folder / "nginx.out").open("w"),
        )
        processes.append(nginx_process)
        for replica in replicas.values():
            assert wait_until(lambda r=replica: r.ready() or r.process.poll() is not None, timeout=300)
            assert replica.process.poll() is None, replica.log.read_text()[-3000:]
        proxy = f"{proxy_address}:{PROXY_PORT}"

        def proxy_answers() -> bool:
            with socket.socket() as probe:
                probe.settimeout(1)
                return probe.connect_ex((proxy_address, PROXY_PORT)) == 0

        assert wait_until(proxy_answers, timeout=30), (folder / "error.log").read_text()[-2000:]
        yield Fleet(replicas, proxy, folder / "access.log")
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        network.remove()


def generate(address: str, prompt: str, **sampling) -> Iterator[generate_pb2.GenerateResponse]:
    """A stream on its own channel, closed when the stream is read or dropped."""
    with channel(address, retries=True) as through:
        yield from Client(address, channel=through).generate(UID, prompt, **sampling)


def both_idle(fleet: Fleet) -> bool:
    return all(replica.running_requests() == 0 for replica in fleet.replicas.values())


def test_streams_through_the_proxy_carry_what_direct_calls_do(fleet):
    sampling = {"max_tokens": 48, "temperature": 0.0, "ignore_eos": True}
    direct = {
        name: collect(generate(r.endpoint, "Once upon a time", **sampling))
        for name, r in fleet.replicas.items()
    }

    def generates() -> list[str]:
        return [upstream for path, _, upstream, _ in fleet.upstream_log() if path.endswith("/Generate")]

    before = len(generates())
    for _ in range(2):  # round-robin: one through each replica
        tokens, text, messages = collect(generate(fleet.proxy, "Once upon a time", **sampling))
        assert len(messages) > 1  # streamed, not one buffered reply
        assert messages[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        for direct_tokens, direct_text, _ in direct.values():
            assert (tokens, text) == (direct_tokens, direct_text)
    # nginx writes a call's log line once it has finished the call, which may be after the caller
    # has its last message.
    assert wait_until(lambda: len(generates()) >= before + 2, timeout=10), generates()
    assert set(generates()[before : before + 2]) == {r.endpoint for r in fleet.replicas.values()}


def test_a_cancel_through_the_proxy_stops_the_engine(fleet):
    stream = Client(fleet.proxy, channel=channel(fleet.proxy)).generate(
        UID, "Cancel me", max_tokens=8000, ignore_eos=True
    )
    for _ in range(3):
        next(stream)
    assert sum(r.running_requests() for r in fleet.replicas.values()) == 1
    cancelled = time.monotonic()
    stream.cancel()
    assert wait_until(lambda: both_idle(fleet), timeout=10, interval=0.01)
    stopped_s = time.monotonic() - cancelled
    print(f"cancel through the proxy: the engine's running requests back to 0 in {stopped_s * 1000:.0f} ms")
    assert stopped_s < 2


def raw_stream_with_deadline(proxy: str, timeout_header: bytes, request: bytes) -> tuple[str, int, float]:
    """A Generate call over a bare HTTP/2 connection that sends grpc-timeout and never cancels
    by itself: (grpc-status, response messages, seconds). Only a deadline that reached the server
    ends it early."""
    host, port = proxy.rsplit(":", 1)
    config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    connection = h2.connection.H2Connection(config=config)
    started = time.monotonic()
    messages = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(
            stream,
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", "/llmgrpc.v1.GenerateService/Generate"),
                (":authority", proxy),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-timeout", timeout_header.decode()),
            ],
        )
        connection.send_data(stream, b"\x00" + len(request).to_bytes(4, "big") + request, end_stream=True)
        sock.sendall(connection.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                return "connection closed", messages, time.monotonic() - started
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    messages += 1
                    connection.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    status = dict(event.headers).get("grpc-status")
                    if status is not None:
                        return status, messages, time.monotonic() - started
                elif isinstance(event, h2.events.StreamReset):
                    return f"stream reset ({event.error_code})", messages, time.monotonic() - started
            sock.sendall(connection.data_to_send())


def test_a_deadline_reaches_the_engine_through_the_proxy(fleet):
    request = generate_pb2.GenerateRequest(
        model_uid=UID, prompt="Take your time", max_tokens=8000, ignore_eos=True
    ).SerializeToString()
    status, messages, seconds = raw_stream_with_deadline(fleet.proxy, b"700m", request)
    print(f"deadline 700 ms through the proxy: grpc-status {status} after {seconds * 1000:.0f} ms")
    assert status == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert messages > 0 and 0.6 < seconds < 5
    assert wait_until(lambda: both_idle(fleet), timeout=5, interval=0.01)

    # A client library's deadline does the same.
    with pytest.raises(grpc.RpcError) as error:
        collect(generate(fleet.proxy, "Take your time", max_tokens=8000, ignore_eos=True, timeout=0.7))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: both_idle(fleet), timeout=5, interval=0.01)


class Streams:
    """Streams through the proxy, each read to the end in its own thread."""

    def __init__(self, proxy: str, count: int, max_tokens: int):
        self.results: list = [None] * count
        self.started = threading.Barrier(count + 1)
        self.threads = [
            threading.Thread(target=self._read, args=(proxy, index, max_tokens), daemon=True)
            for index in range(count)
        ]
        for thread in self.threads:
            thread.start()
        self.started.wait(timeout=120)

    def _read(self, proxy: str, index: int, max_tokens: int) -> None:
        try:
            stream = generate(proxy, f"Stream {index}", max_tokens=max_tokens, ignore_eos=True)
            messages = [next(stream)]
            self.started.wait(timeout=120)
            messages.extend(stream)
            self.results[index] = messages
        except grpc.RpcError as error:
            self.results[index] = error

    def join(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)


def test_sigterm_drains_a_replica_while_new_calls_land_on_the_other(fleet):
    a, b = fleet.replicas["a"], fleet.replicas["b"]
    max_tokens = 600
    streams = Streams(fleet.proxy, 16, max_tokens)
    in_flight = {name: r.running_requests() for name, r in fleet.replicas.items()}
    assert sum(in_flight.values()) == 16 and in_flight["a"] > 0, in_flight

    signalled = time.monotonic()
    a.process.send_signal(signal.SIGTERM)
    # New calls while a drains, from a client with the retry policy: none fails.
    with channel(fleet.proxy, retries=True) as through:
        client = Client(fleet.proxy, channel=through)
        new_calls = [
            collect(
                client.generate(
                    UID, f"New {i}", max_tokens=4, ignore_eos=True, timeout=60, metadata=(("x-call", "new"),)
                )
            )
            for i in range(8)
        ]
    a_was_draining = a.process.poll() is None
    assert all(
        messages[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH for _, _, messages in new_calls
    )

    assert a.process.wait(timeout=GRACE_S + 15) == 0, a.log.read_text()[-3000:]
    drained_s = time.monotonic() - signalled
    streams.join(timeout=30)
    for result in streams.results:  # every stream in flight completed, none cut
        assert isinstance(result, list), result
        assert result[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
        assert sum(len(message.token_ids) for message in result) == max_tokens

    # Each new call was served by b: attempts that reached a were refused (UNAVAILABLE) and retried.
    new_generates = [
        (upstream, status) for _, call, upstream, status in fleet.upstream_log() if call == "new"
    ]
    served = [upstream.split(", ")[-1] for upstream, status in new_generates if status == "0"]
    refused = [upstream for upstream, status in new_generates if status == "14"]
    print(
        f"SIGTERM with {in_flight} streams in flight: all 16 complete ({max_tokens} tokens each), "
        f"replica a exited after {drained_s:.1f} s; 8 new calls meanwhile (a still draining: "
        f"{a_was_draining}): {len(refused)} attempts refused by a and retried, all served by b"
    )
    assert served == [b.endpoint] * 8, new_generates
    assert all(upstream.endswith(a.endpoint) for upstream in refused)
