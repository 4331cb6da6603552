"""Soak: many concurrent streams, with random cancellations and deadlines, for a while.

Starts ``llmgrpc serve --launch MODEL`` (or uses --endpoint), runs --concurrency streams at
a time for --duration seconds (each stream: a random length; some cancelled by the caller
after a few messages, some given a short deadline), then reports:

- errors: any outcome other than a complete stream, the caller's own cancellation, or
  DEADLINE_EXCEEDED for a request that had a deadline (the goal is 0);
- whether the model is idle afterwards (no request left running or waiting);
- the server's and the worker's resident memory at the start and at the end;
- p50/p99 of time to first token, inter-token latency and end-to-end latency;
- churn: meanwhile a second model (uid ``churn``) is launched and terminated over and over,
  with --churn-lanes streams sent to it; their acceptable ends are a complete stream or
  UNAVAILABLE / NOT_FOUND saying the model is loading, terminated or absent. Afterwards
  only the soaked model is listed and exactly one worker process runs (nothing orphaned).
- unread: then --unread-callers callers (4) write requests on KServe's ModelStreamInfer as fast
  as the server takes them and never read, for --unread-duration seconds (60): half for the
  soaked model, half for a model that does not exist (answered at once). The server's resident
  memory, sampled each second, must stay within 10% of what it was a third of the way in: by
  then gRPC's flow-control windows, which it widens as data flows (BDP probing), are about full,
  and what the server holds no longer grows (before backpressure, it grew without end). The
  server is started with an unread-stream timeout beyond the case, so that backpressure alone
  holds the memory.

    python benchmarks/soak.py --duration 120 --concurrency 32 [--churn-lanes 4] [--json soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from llmgrpc.kserve.v2 import grpc_service_pb2 as kserve_pb
from llmgrpc.kserve.v2 import grpc_service_pb2_grpc as kserve_grpc
from llmgrpc.server.kserve_convert import encode_bytes
from llmgrpc.v1 import generate_pb2, generate_pb2_grpc, models_pb2, models_pb2_grpc

PROMPTS = ["Hello", "Tell me a story about", "The quick brown fox", "Once upon a time", "In 1969,"]


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


class Server:
    """llmgrpc serve in a subprocess; its address from the 'llmgrpc listening on' line."""

    def __init__(self, model: str, extra: list[str]):
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "llmgrpc"),
                "serve",
                "--port",
                "0",
                "--launch",
                model,
                *extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.endpoint: str | None = None
        self.log_tail: list[str] = []
        found = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.log_tail = (self.log_tail + [line])[-50:]
                match = re.search(r"llmgrpc listening on ([\w.]+:\d+)", line)
                if match:
                    self.endpoint = match.group(1)
                    found.set()

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(120):
            raise SystemExit("the server did not start:\n" + "".join(self.log_tail))

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)


async def wait_ready(channel: grpc.aio.Channel, timeout: float = 600) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            request = health_pb2.HealthCheckRequest(service="llmgrpc.v1.GenerateService")
            if (await health.Check(request, timeout=5)).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("the server did not become ready")


class Tally:
    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.errors: list[str] = []
        self.ttft: list[float] = []
        self.itl: list[float] = []
        self.e2e: list[float] = []
        self.tokens = 0


CHURN_UID = "churn"
# How a stream to the churning model may end besides completing: it was loading, terminated or gone.
CHURN_ENDINGS = {
    ("UNAVAILABLE", "MODEL_LOADING"),
    ("UNAVAILABLE", "MODEL_TERMINATED"),
    ("NOT_FOUND", "MODEL_NOT_FOUND"),
}


def error_reason(error: grpc.aio.AioRpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def worker_processes(server_pid: int) -> int:
    """How many llmgrpc worker processes the server has (its children running the worker module)."""
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        count += parent == server_pid and b"llmgrpc.worker" in arguments
    return count


async def churn(models, family: str, ends: float, rng: random.Random, tally: Tally) -> None:
    """Launch and terminate CHURN_UID until ends, each life a random 0.5-3 s."""
    while time.monotonic() < ends:
        request = models_pb2.LaunchModelRequest(model_name=family, model_uid=CHURN_UID)
        try:
            await models.LaunchModel(request, timeout=300)
            tally.outcomes["churn: launched"] += 1
            await asyncio.sleep(rng.uniform(0.5, 3.0))
            await models.TerminateModel(models_pb2.TerminateModelRequest(model_uid=CHURN_UID), timeout=60)
            tally.outcomes["churn: terminated"] += 1
        except grpc.aio.AioRpcError as error:
            tally.outcomes[f"churn: error {error.code().name}"] += 1
            tally.errors.append(f"churn: {error.code().name}: {error.details()}")


async def one_stream(stub, model_uid: str, rng: random.Random, tally: Tally) -> None:
    plan = rng.choices(["complete", "cancel", "deadline"], weights=[70, 15, 15])[0]
    max_tokens = rng.randint(8, 256)
    request = generate_pb2.GenerateRequest(
        model_uid=model_uid,
        prompt=rng.choice(PROMPTS),
        max_tokens=max_tokens,
        temperature=rng.choice([0.0, 0.7, 1.0]),
        ignore_eos=True,
    )
    timeout = rng.uniform(0.05, 1.5) if plan == "deadline" else None
    cancel_after = rng.randint(1, 8) if plan == "cancel" else None
    started = time.monotonic()
    last = None
    messages = 0
    call = stub.Generate(request, timeout=timeout)
    try:
        async for message in call:
            now = time.monotonic()
            messages += 1
            count = len(message.token_ids)
            if count:
                if last is None:
                    tally.ttft.append(now - started)
                else:
                    tally.itl.extend([(now - last) / count] * count)
                last = now
                tally.tokens += count
            if cancel_after is not None and messages >= cancel_after:
                call.cancel()
                break
        if cancel_after is not None and messages >= cancel_after:
            tally.outcomes["cancelled by the caller"] += 1
        else:
            tally.outcomes["complete"] += 1
            tally.e2e.append(time.monotonic() - started)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and timeout is not None:
            tally.outcomes["deadline exceeded (as asked)"] += 1
        elif model_uid == CHURN_UID and (error.code().name, error_reason(error)) in CHURN_ENDINGS:
            tally.outcomes[f"churn: {error.code().name} {error_reason(error)}"] += 1
        elif error.code() == grpc.StatusCode.CANCELLED and cancel_after is not None:
            tally.outcomes["cancelled by the caller"] += 1
        else:
            tally.outcomes[f"error {error.code().name}"] += 1
            tally.errors.append(f"{plan}: {error.code().name}: {error.details()}")
    except asyncio.CancelledError:
        tally.outcomes["cancelled by the caller"] += 1


async def soak(
    endpoint: str, model_uid: str, duration: float, concurrency: int, churn_lanes: int, seed: int
) -> dict:
    tally = Tally()
    async with grpc.aio.insecure_channel(endpoint) as channel:
        await wait_ready(channel)
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        models = models_pb2_grpc.ModelServiceStub(channel)
        model = (await models.GetModel(models_pb2.GetModelRequest(model_uid=model_uid))).model
        # Warm up, so the start figures are those of a model that has served.
        async for _ in stub.Generate(
            generate_pb2.GenerateRequest(model_uid=model_uid, prompt="Hi", max_tokens=4)
        ):
            pass
        model = (await models.GetModel(models_pb2.GetModelRequest(model_uid=model_uid))).model
        start_worker_rss = model.memory_bytes
        ends = time.monotonic() + duration

        async def lane(index: int, uid: str) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < ends:
                await one_stream(stub, uid, rng, tally)
                if uid == CHURN_UID:
                    await asyncio.sleep(0.05)  # not a busy loop while the model is absent

        began = time.monotonic()
        lanes = [lane(i, model_uid) for i in range(concurrency)]
        if churn_lanes:
            lanes += [lane(concurrency + i, CHURN_UID) for i in range(churn_lanes)]
            lanes.append(churn(models, model.model_name, ends, random.Random(seed), tally))
        await asyncio.gather(*lanes)
        elapsed = time.monotonic() - began
        await asyncio.sleep(1.0)  # let cancellations reach the engine
        model = (await models.GetModel(models_pb2.GetModelRequest(model_uid=model_uid))).model
        listed = [m.model_uid for m in (await models.ListModels(models_pb2.ListModelsRequest())).models]
        return {
            "duration_s": round(elapsed, 1),
            "concurrency": concurrency,
            "requests": sum(tally.outcomes.values()),
            "outcomes": dict(tally.outcomes),
            "errors": len(tally.errors),
            "error_examples": tally.errors[:10],
            "idle_after": model.running_requests == 0 and model.waiting_requests == 0,
            "state_after": models_pb2.ModelState.Name(model.state),
            "listed_after": listed,
            "tokens": tally.tokens,
            "tokens_per_s": round(tally.tokens / elapsed, 1),
            "worker_rss_mib": {"start": start_worker_rss / 2**20, "end": model.memory_bytes / 2**20},
            "ttft_s": {"p50": percentile(tally.ttft, 50), "p99": percentile(tally.ttft, 99)},
            "itl_s": {"p50": percentile(tally.itl, 50), "p99": percentile(tally.itl, 99)},
            "e2e_s": {"p50": percentile(tally.e2e, 50), "p99": percentile(tally.e2e, 99)},
        }


# The unread case: memory within this fraction of its level a third of the way in.
UNREAD_FLAT = 0.10


def unread_request(model_uid: str, number: int) -> kserve_pb.ModelInferRequest:
    """A streamed ModelInferRequest of 16 tokens: for the soaked model, or every other one for a
    model that does not exist (answered at once, as fast as the server can answer)."""
    request = kserve_pb.ModelInferRequest(model_name=model_uid if number % 2 else "absent", id=str(number))
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    request.inputs.add(name="stream", datatype="BOOL", shape=[1])
    request.inputs.add(name="sampling_parameters", datatype="BYTES", shape=[1])
    request.raw_input_contents.extend(
        [encode_bytes(PROMPTS[number % len(PROMPTS)].encode()), b"\x01", encode_bytes(b'{"max_tokens": 16}')]
    )
    return request


async def unread(
    endpoint: str, model_uid: str, duration: float, callers: int, server_pid: int | None
) -> dict:
    """callers write ModelStreamInfer requests and never read, for duration seconds; the server's
    RSS is sampled each second (when this script started the server)."""
    written = [0] * callers
    samples: list[tuple[float, int]] = []
    async with grpc.aio.insecure_channel(endpoint) as channel:
        models = models_pb2_grpc.ModelServiceStub(channel)
        before = rss_bytes(server_pid) if server_pid else 0
        stub = kserve_grpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelStreamInfer() for _ in range(callers)]

        async def write(index: int) -> None:
            while True:
                await calls[index].write(unread_request(model_uid, written[index]))
                written[index] += 1

        writers = [asyncio.ensure_future(write(index)) for index in range(callers)]
        began = time.monotonic()
        while (elapsed := time.monotonic() - began) < duration:
            await asyncio.sleep(1.0)
            if server_pid:
                samples.append((elapsed, rss_bytes(server_pid)))
        for writer in writers:
            writer.cancel()
        for call in calls:
            call.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
        idle = False
        for _ in range(100):  # the cancelled calls' generations stop within a decode step or so
            model = (await models.GetModel(models_pb2.GetModelRequest(model_uid=model_uid))).model
            if idle := model.running_requests == 0 and model.waiting_requests == 0:
                break
            await asyncio.sleep(0.1)
    report = {
        "callers": callers,
        "duration_s": duration,
        "requests_written": sum(written),
        "idle_after": idle,
    }
    if samples:
        settled = [rss for at, rss in samples if at >= duration / 3]
        baseline = settled[0]
        report["server_rss_mib"] = {
            "before": before / 2**20,
            "baseline": baseline / 2**20,
            "min": min(settled) / 2**20,
            "max": max(settled) / 2**20,
            "end": settled[-1] / 2**20,
            "every_tenth": [rss / 2**20 for rss in settled[:: max(1, len(settled) // 10)]],
        }
        report["flat"] = all(abs(rss - baseline) <= UNREAD_FLAT * baseline for rss in settled)
    return report


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    parser.add_argument("--concurrency", type=int, default=32, help="streams at a time (default 32)")
    parser.add_argument("--model", default="tiny-llama-3.1", help="model family to launch (its uid too)")
    parser.add_argument("--endpoint", help="use this running server instead of starting one")
    parser.add_argument(
        "--churn-lanes", type=int, default=4, help="streams at a time to the churning model (0: no churn)"
    )
    parser.add_argument(
        "--unread-duration", type=float, default=60.0, help="seconds of the unread case (0: skip it)"
    )
    parser.add_argument(
        "--unread-callers", type=int, default=4, help="ModelStreamInfer callers that never read"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args()

    # The unread case's streams must outlast it: backpressure, not the timeout, holds the memory.
    unread_timeout = ["--stream-unread-timeout-s", str(args.unread_duration + 60)]
    server = None if args.endpoint else Server(args.model, unread_timeout)
    endpoint = args.endpoint or server.endpoint
    server_pid = server.process.pid if server else None
    try:
        start_server_rss = rss_bytes(server_pid) if server_pid else 0
        report = asyncio.run(
            soak(endpoint, args.model, args.duration, args.concurrency, args.churn_lanes, args.seed)
        )
        if args.unread_duration > 0:
            report["unread_stream_infer"] = asyncio.run(
                unread(endpoint, args.model, args.unread_duration, args.unread_callers, server_pid)
            )
        if server_pid:
            report["worker_processes_after"] = worker_processes(server_pid)
            report["server_rss_mib"] = {
                "start": start_server_rss / 2**20,
                "end": rss_bytes(server_pid) / 2**20,
            }
    finally:
        if server is not None:
            exit_code = server.stop()
    if server is not None:
        report["server_exit_code"] = exit_code
    report["command"] = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    report = _rounded(report)
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    unread_case = report.get("unread_stream_infer", {})
    failed = (
        report["errors"]
        or unread_case.get("flat") is False
        or unread_case.get("idle_after") is False
        or not report["idle_after"]
        or report["listed_after"] != [args.model]
        or report.get("worker_processes_after", 1) != 1
        or report.get("server_exit_code", 0) != 0
    )
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
