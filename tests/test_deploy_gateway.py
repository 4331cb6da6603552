"""The gateway overlay (deploy/overlays/gateway): smg discovers the llmgrpc pods by their label,
reaches them on their gRPC port, and is scraped on its own Prometheus port; every object is
valid Kubernetes (strict schema), as the other overlays' are (tests/test_deploy.py)."""

from __future__ import annotations

import pytest
from test_deploy import KUBERNETES_VERSION, render


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return render("gateway")


def named(objects: list[dict], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def flag(args: list[str], name: str) -> str:
    """The value of --name=value or --name value in a container's args."""
    for index, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}":
            return args[index + 1]
    raise AssertionError(f"--{name} is not among {args}")


def test_every_object_is_valid_kubernetes(objects):
    import kubernetes_validate

    for item in objects:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


def test_smg_discovers_the_llmgrpc_pods_on_their_grpc_port(objects):
    llmgrpc = named(objects, "Deployment", "llmgrpc")["spec"]["template"]
    (smg,) = named(objects, "Deployment", "smg")["spec"]["template"]["spec"]["containers"]
    args = smg["args"]
    assert "--service-discovery" in args and flag(args, "backend") == "vllm"
    key, _, value = flag(args, "selector").partition("=")
    assert llmgrpc["metadata"]["labels"][key] == value
    (container,) = llmgrpc["spec"]["containers"]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    assert int(flag(args, "service-discovery-port")) == grpc_port
    # smg's own pods do not match the selector: it never routes to itself.
    smg_labels = named(objects, "Deployment", "smg")["spec"]["template"]["metadata"]["labels"]
    assert smg_labels.get(key) != value


def test_smg_may_list_pods_and_is_scraped_on_its_prometheus_port(objects):
    pod = named(objects, "Deployment", "smg")["spec"]["template"]
    (smg,) = pod["spec"]["containers"]
    metrics_port = int(flag(smg["args"], "prometheus-port"))
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    assert metrics_port in {p["containerPort"] for p in smg["ports"]}
    role = named(objects, "Role", "smg-discovery")
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["pods"]
    binding = named(objects, "RoleBinding", "smg-discovery")
    assert binding["subjects"][0]["name"] == pod["spec"]["serviceAccountName"]
