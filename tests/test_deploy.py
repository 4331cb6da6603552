"""The Kubernetes manifests agree with the server: the kustomize overlays render offline into
objects the Kubernetes schema accepts, their probes ask what the server answers SERVING for, on
the port it answers on, their settings are ones the server takes, and the models file in their
ConfigMap launches: the CPU overlay's pod, run as a process, becomes ready with every model."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from conftest import RunningServer
from fleet import ServeProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_helpers import wait_until

from llmgrpc.clients import Client
from llmgrpc.engines.catalogue import engine_info
from llmgrpc.engines.options import validate_engine_options
from llmgrpc.server.models_file import parse_models
from llmgrpc.server.registry import Registry
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import models_pb2

DEPLOY = Path(__file__).parent.parent / "deploy"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes the manifests target: the preStop sleep action is GA from 1.30.
KUBERNETES_VERSION = "1.30.0"
LLMGRPC = Path(sys.executable).with_name("llmgrpc")


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the kustomize overlays cannot be rendered")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return list(yaml.safe_load_all(rendered))


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def one(objects: list[dict], kind: str) -> dict:
    (found,) = [item for item in objects if item["kind"] == kind]
    return found


def container_of(objects: list[dict]) -> dict:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"]}


def models_file_of(objects: list[dict]) -> tuple[str, str]:
    """(path in the container, content) of the models file the Deployment mounts."""
    container = container_of(objects)
    path = Path(env_of(container)["LLMGRPC_MODELS_FILE"])
    (mount,) = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    volumes = one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    config_map = next(
        item
        for item in objects
        if item["kind"] == "ConfigMap" and item["metadata"]["name"] == volume["configMap"]["name"]
    )
    return str(path), config_map["data"][path.name]


def test_every_object_is_valid_kubernetes(rendered):
    import kubernetes_validate

    overlay, objects = rendered
    kinds = {item["kind"] for item in objects}
    assert kinds == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
    }, overlay
    for item in objects:
        # strict: unknown fields (a typo in a probe, say) are errors, not silently dropped.
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


def test_every_llmgrpc_variable_is_a_valid_setting(rendered, monkeypatch):
    _, objects = rendered
    for name, value in env_of(container_of(objects)).items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # fails on an unknown LLMGRPC_* name or a bad value
    assert settings.host == "0.0.0.0" and settings.health_port == 50052 and settings.metrics_port == 9090
    assert settings.tls_client_ca_file is not None and settings.auth_tokens_file is not None
    assert settings.models_file is not None


def test_the_models_file_launches_models_the_server_knows(rendered):
    overlay, objects = rendered
    _, content = models_file_of(objects)
    launches = parse_models(yaml.safe_load(content))
    assert launches, overlay
    registry = Registry.load()
    for launch in launches:
        # The spec each entry names exists, and its engine takes the entry's options.
        selection = registry.select(launch.query, lambda engines: engines[0])
        validate_engine_options(engine_info(selection.engine), launch.engine_options)


def test_ports_probes_and_services_agree(rendered):
    overlay, objects = rendered
    container = container_of(objects)
    env = env_of(container)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {
        "grpc": int(env["LLMGRPC_PORT"]),
        "grpc-health": int(env["LLMGRPC_HEALTH_PORT"]),
        "http-metrics": int(env["LLMGRPC_METRICS_PORT"]),
    }
    # Probes go to the plaintext health port: the kubelet speaks neither TLS nor tokens.
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[kind]["grpc"]["port"] == ports["grpc-health"], (overlay, kind)
    pod = one(objects, "Deployment")["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == env["LLMGRPC_METRICS_PORT"]
    labels = pod["metadata"]["labels"]
    services = [item for item in objects if item["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"llmgrpc", "llmgrpc-headless"}
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= set(ports)
    headless = next(s for s in services if s["metadata"]["name"] == "llmgrpc-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert [port["port"] for port in headless["spec"]["ports"]] == [ports["grpc"]]


def test_budget_volumes_and_shutdown_fit_together(rendered):
    overlay, objects = rendered
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]
    container = container_of(objects)
    labels = pod["metadata"]["labels"]
    assert one(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert one(objects, "PodDisruptionBudget")["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    grace = float(env_of(container)["LLMGRPC_SHUTDOWN_GRACE_S"])
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace + pause
    # A read-only root: everything the server writes is on a volume.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {Path(m["mountPath"]) for m in container["volumeMounts"]}
    env = env_of(container)
    for writable in ("LLMGRPC_CACHE_DIR", "LLMGRPC_HUB_CACHE_DIR", "HOME"):
        assert any(Path(env[writable]).is_relative_to(mount) for mount in mounts), writable
    assert Path("/tmp") in mounts  # the workers' sockets
    claim = one(objects, "PersistentVolumeClaim")["metadata"]["name"]
    hub_volume = next(v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v)
    assert hub_volume["persistentVolumeClaim"]["claimName"] == claim
    hub_mount = next(m for m in container["volumeMounts"] if m["name"] == hub_volume["name"])
    assert Path(hub_mount["mountPath"]) == Path(env["LLMGRPC_HUB_CACHE_DIR"])
    image = container["image"]
    assert image.endswith("-cuda" if overlay == "gpu" else "-cpu"), image


def test_the_gpu_overlay_asks_for_a_gpu():
    objects = render("gpu")
    resources = container_of(objects)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
    assert env_of(container_of(objects))["LLMGRPC_DEVICE"] == "cuda"
    assert "nvidia.com/gpu" not in container_of(render("cpu"))["resources"].get("limits", {})


def test_probes_ask_what_the_server_answers_serving_for(cache_dir):
    container = container_of(render("cpu"))
    probes = {kind: container[kind]["grpc"] for kind in ("livenessProbe", "readinessProbe")}
    # The same server, with TLS-era tokens on like the manifest's, on free ports.
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


def test_the_cpu_pod_becomes_ready_with_its_models(tmp_path, cache_dir):
    """The CPU overlay's container, as a process: its environment (less TLS and tokens, on free
    local ports) and its ConfigMap's models file. Readiness turns SERVING with every model READY."""
    objects = render("cpu")
    container = container_of(objects)
    _, content = models_file_of(objects)
    models_file = tmp_path / "models.yaml"
    models_file.write_text(content)
    expected = {launch.model_uid for launch in parse_models(yaml.safe_load(content))}
    env = {k: v for k, v in env_of(container).items() if not k.startswith(("LLMGRPC_TLS", "LLMGRPC_AUTH"))}
    env.update(
        LLMGRPC_HOST="127.0.0.1",
        LLMGRPC_PORT="0",
        LLMGRPC_HEALTH_PORT="0",
        LLMGRPC_METRICS_PORT="0",
        LLMGRPC_MODELS_FILE=str(models_file),
        LLMGRPC_CACHE_DIR=str(cache_dir),
        LLMGRPC_HUB_CACHE_DIR=str(tmp_path / "hub"),
        LLMGRPC_SHUTDOWN_GRACE_S="2",
        HOME=str(tmp_path / "home"),
    )
    with ServeProcess([str(LLMGRPC), "serve"], {**os.environ, **env}) as served:
        address, health_address = served.wait_listening()
        readiness = container["readinessProbe"]["grpc"]["service"]
        with grpc.insecure_channel(health_address) as channel, Client(address) as client:
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service)).status

            assert wait_until(
                lambda: status(readiness) == health_pb2.HealthCheckResponse.SERVING, timeout=300
            ), served.log()
            # Ready means every model of the file is READY.
            models = {model.model_uid: model.state for model in client.list_models()}
            assert models == {uid: models_pb2.MODEL_STATE_READY for uid in expected}
        assert served.stop() == 0, served.log()
