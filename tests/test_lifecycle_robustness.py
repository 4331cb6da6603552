"""Random interleavings of lifecycle calls: whatever the order, every call is answered, none with
INTERNAL or UNKNOWN, and afterwards ListModels, the worker processes and the socket folders agree.

Each example fires a generated program of Launch / Terminate / Generate calls on two uids,
concurrently, some with deadlines that pass mid-call and some cancelled by their caller, with
generated pauses between them. The models are served by the Gated double (fast to load,
streams as long as asked), so the examples test the lifecycle, not an engine.

Budget: the hypothesis profile (tests/conftest.py) scaled down: each example starts workers.
"""

from __future__ import annotations

import json
import os
import time

import grpc
import pytest
from conftest import TESTS, RunningServer
from fleet import Background, assert_fleet_agrees, listed_uids, socket_folders
from gated_engine import FAMILY
from hypothesis import given, settings
from hypothesis import strategies as st
from rpc_helpers import wait_until

from llmgrpc.clients import Client
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import models_pb2

UIDS = ("left", "right")
FORBIDDEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
SETTLED = (models_pb2.MODEL_STATE_READY, models_pb2.MODEL_STATE_FAILED)
deadlines = st.one_of(st.none(), st.floats(min_value=0.01, max_value=3.0))
operations = st.one_of(
    st.tuples(st.just("launch"), st.sampled_from(UIDS), deadlines),
    st.tuples(st.just("terminate"), st.sampled_from(UIDS), deadlines),
    st.tuples(st.just("generate"), st.sampled_from(UIDS), deadlines),
    st.tuples(st.just("cancel"), st.sampled_from(UIDS), st.integers(min_value=0, max_value=5)),
)
programs = st.lists(st.tuples(operations, st.floats(min_value=0, max_value=0.3)), min_size=1, max_size=10)


def run(client: Client, operation) -> None:
    """One call of a program; its gRPC error, if any, is what the test reads."""
    kind, uid, argument = operation
    if kind == "launch":
        client.launch("gated-model", model_uid=uid, engine_options={"token_delay_s": 0.01}, timeout=argument)
    elif kind == "terminate":
        client.terminate(uid, timeout=argument)
    elif kind == "generate":
        list(client.generate(uid, "x", max_tokens=50, timeout=argument))
    else:  # cancel: read a few tokens of a long stream, then leave
        stream = client.generate(uid, "x", max_tokens=10_000, timeout=60)
        for _, _ in zip(range(argument), stream, strict=False):
            pass
        stream.cancel()


@pytest.fixture(scope="module")
def lifecycle_server(tmp_path_factory, cache_dir):
    """One server for every example (started the way the gated_server fixture does)."""
    families = tmp_path_factory.mktemp("families")
    (families / "gated-model.json").write_text(json.dumps(FAMILY))
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(TESTS)  # the probe and the workers import the plugin
    server = RunningServer(
        Settings(
            port=0,
            cache_dir=cache_dir,
            device="cpu",
            engine_plugins=["gated_engine:ENGINE_INFO"],
            families_dir=families,
            worker_ping_interval_s=0.5,
            shutdown_grace_s=1,
        )
    )
    yield server
    server.stop()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@settings(max_examples=max(settings().max_examples // 25, 8))
@given(program=programs)
def test_any_interleaving_of_lifecycle_calls_leaves_a_consistent_fleet(
    lifecycle_server, robustness_tally, program
):
    folders_before = socket_folders()
    with Client(lifecycle_server.endpoint) as client:
        calls = []
        # Both uids are launched first (without waiting), so the program races live models too.
        for operation, pause in [(("launch", uid, None), 0.0) for uid in UIDS] + program:
            calls.append((operation, Background(run, client, operation)))
            time.sleep(pause)
        for operation, call in calls:
            call.wait(90)  # every call is answered
            if isinstance(call.error, grpc.RpcError):
                assert call.error.code() not in FORBIDDEN, (operation, call.error)
            else:
                assert call.error is None, (operation, call.error)
            code = call.error.code().name if call.error else "OK"
            robustness_tally[(f"lifecycle {operation[0]}", code)] += 1
        # Launches whose callers left go on: wait until each model is READY, FAILED or gone.
        assert wait_until(lambda: all(m.state in SETTLED for m in client.list_models(timeout=10)), 60)
        assert_fleet_agrees(client, folders_before)
        for uid in listed_uids(client):
            client.terminate(uid, timeout=60)
        assert listed_uids(client) == set()
        assert_fleet_agrees(client, folders_before)
