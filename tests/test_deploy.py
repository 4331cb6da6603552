"""The Kubernetes manifest agrees with the server: its probes ask what the server answers SERVING
for, on the port it answers on, and its settings are ones the server takes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import yaml
from conftest import RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llmgrpc.server.settings import Settings

MANIFEST = Path(__file__).parent.parent / "deploy" / "kubernetes.yaml"


@pytest.fixture(scope="module")
def manifest() -> dict[str, dict]:
    return {document["kind"]: document for document in yaml.safe_load_all(MANIFEST.read_text())}


@pytest.fixture(scope="module")
def container(manifest) -> dict:
    (container,) = manifest["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


def test_every_llmgrpc_variable_is_a_valid_setting(container, monkeypatch):
    for name, value in env_of(container).items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # fails on an unknown LLMGRPC_* name or a bad value
    assert settings.host == "0.0.0.0" and settings.health_port == 50052 and settings.metrics_port == 9090
    assert settings.tls_client_ca_file is not None and settings.auth_tokens_file is not None


def test_probes_ask_what_the_server_answers_serving_for(container, cache_dir):
    env = env_of(container)
    probes = {kind: container[kind]["grpc"] for kind in ("livenessProbe", "readinessProbe")}
    # Probes go to the plaintext health port: the kubelet speaks neither TLS nor tokens.
    assert {probe["port"] for probe in probes.values()} == {int(env["LLMGRPC_HEALTH_PORT"])}
    ports = {port["containerPort"] for port in container["ports"]}
    assert int(env["LLMGRPC_HEALTH_PORT"]) in ports and int(env["LLMGRPC_PORT"]) in ports

    # The same server, with TLS and tokens on like the manifest's, on free ports.
    server = RunningServer(
        Settings(port=0, health_port=0, cache_dir=cache_dir, auth_tokens={"t": "admin"}, shutdown_grace_s=1)
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for kind, probe in probes.items():
                response = health.Check(health_pb2.HealthCheckRequest(service=probe.get("service", "")))
                assert response.status == health_pb2.HealthCheckResponse.SERVING, kind
            # The health port serves health alone.
            with pytest.raises(grpc.RpcError) as error:
                channel.unary_unary("/llmgrpc.v1.ModelService/ListModels")(b"")
            assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # Readiness goes NOT_SERVING as soon as the server starts to drain; liveness too.
            server.call(server.server.health.enter_graceful_shutdown())
            readiness = probes["readinessProbe"].get("service", "")
            response = health.Check(health_pb2.HealthCheckRequest(service=readiness))
            assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop()


def test_services_budget_and_shutdown_fit_together(manifest, container):
    pod = manifest["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    port_names = {port["name"] for port in container["ports"]}
    services = [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"llmgrpc", "llmgrpc-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names
    headless = next(s for s in services if s["metadata"]["name"] == "llmgrpc-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert manifest["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    grace = float(env_of(container)["LLMGRPC_SHUTDOWN_GRACE_S"])
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace + pause
