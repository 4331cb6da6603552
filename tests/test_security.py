"""TLS and mutual TLS, bearer tokens with roles, and the launch policies (model_path, remote code)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from certs import Certificates, make_certificates
from conftest import TINY, RunningServer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_helpers import rpc_error
from status_details import error_info, reason

from llmgrpc.clients import Client
from llmgrpc.server.auth import TokenTable, authorize, check_model_path, read_tokens_file
from llmgrpc.server.settings import Settings
from llmgrpc.v1 import models_pb2

GRPCURL = Path(sys.executable).parent / "grpcurl"
ADMIN_TOKEN = "admin-7f3c9e1d2b"
INFERENCE_TOKEN = "inference-4a8b6c0e9f"


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def secure_server(certs: Certificates, cache_dir: Path, tmp_path_factory):
    tokens_file = tmp_path_factory.mktemp("secrets") / "tokens"
    tokens_file.write_text(f"# role token\nadmin {ADMIN_TOKEN}\ninference {INFERENCE_TOKEN}\n")
    server = RunningServer(
        Settings(
            port=0,
            cache_dir=cache_dir,
            shutdown_grace_s=2,
            tls_cert_file=certs.server.cert,
            tls_key_file=certs.server.key,
            tls_client_ca_file=certs.ca.cert,
            auth_tokens_file=tokens_file,
        )
    )
    yield server
    server.stop()


def connect(server: RunningServer, certs: Certificates, token: str | None = None, pair=None) -> Client:
    pair = pair or certs.client
    cert, key = pair.read() if pair != "none" else (None, None)
    return Client(
        f"localhost:{server.port}",
        token=token,
        root_certificates=certs.ca.cert.read_bytes(),
        private_key=key,
        certificate_chain=cert,
    )


@pytest.fixture(scope="module")
def secure_tiny(secure_server, certs):
    """An admin token launches the tiny model on the TLS server."""
    with connect(secure_server, certs, ADMIN_TOKEN) as admin:
        return admin.launch(TINY, model_uid="tiny", timeout=300)


def test_admin_token_can_launch(secure_tiny: models_pb2.ModelDescription):
    assert secure_tiny.state == models_pb2.MODEL_STATE_READY


def test_client_without_certificate_is_refused(secure_server, certs):
    for pair in ("none", certs.stranger):
        with connect(secure_server, certs, ADMIN_TOKEN, pair=pair) as client:
            error = rpc_error(client.list_models)
            assert error.code() == grpc.StatusCode.UNAVAILABLE
    with Client(f"127.0.0.1:{secure_server.port}") as plaintext:
        assert rpc_error(plaintext.list_models).code() == grpc.StatusCode.UNAVAILABLE


def test_inference_token_generates_but_cannot_launch_or_terminate(secure_server, certs, secure_tiny):
    with connect(secure_server, certs, INFERENCE_TOKEN) as client:
        messages = list(client.generate("tiny", "Hello", max_tokens=4, temperature=0))
        assert messages[-1].usage.completion_tokens == 4
        assert [m.model_uid for m in client.list_models()] == ["tiny"]
        assert client.get_model("tiny").model_uid == "tiny"
        assert client.list_specs(model_name=TINY)
        for call, args in ((client.launch, (TINY,)), (client.terminate, ("tiny",))):
            error = rpc_error(call, *args)
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            assert reason(error) == "ROLE_NOT_ALLOWED"
            assert "admin" in error.details()
    assert [m.model_uid for m in connect(secure_server, certs, ADMIN_TOKEN).list_models()] == ["tiny"]


def test_the_inference_role_may_watch_a_model_as_it_may_get_it(secure_server, certs, secure_tiny):
    with connect(secure_server, certs, INFERENCE_TOKEN) as client:
        descriptions = list(client.watch("tiny", timeout=60))
    assert [d.model_uid for d in descriptions] == ["tiny"]
    assert descriptions[-1].state == models_pb2.MODEL_STATE_READY


def test_missing_or_unknown_token_is_unauthenticated(secure_server, certs, secure_tiny):
    with connect(secure_server, certs) as client:
        error = rpc_error(client.list_models)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason(error) == "TOKEN_MISSING"
        assert "authorization: Bearer" in error.details()
    with connect(secure_server, certs, "not-a-token") as client:
        error = rpc_error(client.generate, "tiny", "Hello", max_tokens=2)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reason(error) == "TOKEN_INVALID"
        assert "not-a-token" not in error.details()


def test_health_and_reflection_need_no_token(secure_server, certs):
    with connect(secure_server, certs) as client:
        health = health_pb2_grpc.HealthStub(client.channel)
        response = health.Check(health_pb2.HealthCheckRequest(service="llmgrpc.v1.GenerateService"))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def grpcurl(server: RunningServer, certs: Certificates, *args: str, token: str | None = None, cert=True):
    flags = ["-cacert", str(certs.ca.cert)]
    if cert:
        flags += ["-cert", str(certs.client.cert), "-key", str(certs.client.key)]
    if token:
        flags += ["-H", f"authorization: Bearer {token}"]
    return subprocess.run(
        [str(GRPCURL), *flags, *args[:-1], f"localhost:{server.port}", args[-1]],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_grpcurl_with_client_certificate_and_token(secure_server, certs, secure_tiny):
    listed = grpcurl(secure_server, certs, "list")
    assert listed.returncode == 0, listed.stderr
    assert "llmgrpc.v1.GenerateService" in listed.stdout.split()

    request = json.dumps({"model_uid": "tiny", "prompt": "Hello", "max_tokens": 3, "temperature": 0})
    generated = grpcurl(
        secure_server, certs, "-d", request, "llmgrpc.v1.GenerateService/Generate", token=INFERENCE_TOKEN
    )
    assert generated.returncode == 0, generated.stderr
    assert '"completionTokens": 3' in generated.stdout

    launch = json.dumps({"model_name": TINY, "model_uid": "second"})
    refused = grpcurl(
        secure_server, certs, "-d", launch, "llmgrpc.v1.ModelService/LaunchModel", token=INFERENCE_TOKEN
    )
    assert refused.returncode != 0 and "PermissionDenied" in refused.stderr

    without_certificate = grpcurl(secure_server, certs, "list", cert=False)
    assert without_certificate.returncode != 0


# Tokens, roles and paths as pure functions.


def test_token_table_roles_and_bearer_parsing(tmp_path):
    table = TokenTable({"a-token": "admin", "i-token": "inference"})
    assert table.role_of("Bearer a-token") == "admin"
    assert table.role_of("bearer  i-token ") == "inference"
    for bad in (None, "", "a-token", "Basic a-token", "Bearer", "Bearer a-tokenX", "Bearer \udcff"):
        with pytest.raises(Exception) as caught:
            table.role_of(bad)
        assert caught.value.reason in ("TOKEN_MISSING", "TOKEN_INVALID")
    assert not TokenTable({}).enabled
    with pytest.raises(ValueError):
        TokenTable({"x": "root"})

    authorize("/llmgrpc.v1.ModelService/LaunchModel", "admin")
    authorize("/llmgrpc.v1.GenerateService/Generate", "inference")
    authorize("/llmgrpc.v1.GenerateService/Tokenize", "inference")
    authorize("/llmgrpc.v1.GenerateService/Detokenize", "inference")
    for method in (
        "/llmgrpc.v1.ModelService/LaunchModel",
        "/llmgrpc.v1.ModelService/TerminateModel",
        "/llmgrpc.v1.ModelService/SomethingNew",
    ):
        with pytest.raises(Exception) as caught:
            authorize(method, "inference")
        assert caught.value.reason == "ROLE_NOT_ALLOWED"

    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\n\nadmin  spaced-token \ninference t2\n")
    assert read_tokens_file(tokens) == {"spaced-token": "admin", "t2": "inference"}
    tokens.write_text("superuser t3\n")
    with pytest.raises(ValueError, match="tokens:1"):
        read_tokens_file(tokens)


def test_tokens_are_never_shown(caplog, secure_server, certs):
    settings = Settings(auth_tokens={"s3cret-value": "admin"})
    assert "s3cret-value" not in repr(settings) and "s3cret-value" not in str(settings)
    with caplog.at_level(logging.DEBUG):
        with connect(secure_server, certs, INFERENCE_TOKEN) as client:
            client.list_models()
        with connect(secure_server, certs, "wrong-" + INFERENCE_TOKEN) as client:
            rpc_error(client.list_models)
    assert caplog.records and INFERENCE_TOKEN not in caplog.text


def test_model_path_must_stay_inside_the_allowed_folders(tmp_path):
    allowed = tmp_path / "models"
    (allowed / "llama").mkdir(parents=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (allowed / "escape").symlink_to(outside)

    assert check_model_path(str(allowed / "llama"), [allowed]) == str((allowed / "llama").resolve())
    assert check_model_path(str(allowed / "llama" / ".." / "llama"), [allowed])
    assert check_model_path("", []) == ""
    for path in (
        str(outside),
        str(allowed / ".." / "elsewhere"),
        str(allowed / "escape"),
        str(allowed / "escape" / "weights.safetensors"),
        "/etc/passwd",
        str(tmp_path / "models-evil"),  # a sibling sharing the prefix
    ):
        with pytest.raises(Exception) as caught:
            check_model_path(path, [allowed])
        assert caught.value.reason == "MODEL_PATH_NOT_ALLOWED", path
    with pytest.raises(Exception) as caught:
        check_model_path(str(allowed / "llama"), [])
    assert "allowed_model_dirs" in str(caught.value)


def test_launch_policies_through_the_server(client: Client, start_server, tmp_path):
    # Off by default: no folder is allowed.
    error = rpc_error(client.launch, TINY, model_path=str(tmp_path))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(error).reason == "MODEL_PATH_NOT_ALLOWED"
    assert error_info(error).domain == "llmgrpc.v1"

    error = rpc_error(client.launch, TINY, engine_options={"trust_remote_code": True})
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason(error) == "TRUST_REMOTE_CODE_DISABLED"

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    os.symlink("/", allowed / "root")
    server = start_server(allowed_model_dirs=[allowed])
    with Client(server.endpoint) as other:
        error = rpc_error(other.launch, TINY, model_path=str(allowed / "root" / "etc"))
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        assert str(allowed) in error.details()
