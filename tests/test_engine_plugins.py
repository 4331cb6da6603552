"""Engines defined outside llmgrpc: loaded from engine_plugins by the server, its probe and its workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plugin_engine import plugin_family

from llmgrpc.clients import Client
from llmgrpc.engines.catalogue import load_plugins

TESTS = Path(__file__).parent
PLUGIN = "plugin_engine:ENGINE_INFO"
FAMILY = plugin_family("echo-model", "echo")


def test_a_plugin_engine_is_launched_and_streams_through_a_real_server(start_server, tmp_path, monkeypatch):
    # The probe and the worker are processes of their own: they import the plugin from PYTHONPATH.
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    (tmp_path / "echo-model.json").write_text(json.dumps(FAMILY))
    server = start_server(device="cpu", engine_plugins=[PLUGIN], families_dir=tmp_path)
    with Client(server.endpoint) as client:
        (engine,) = client.list_specs(model_name="echo-model")[0].specs[0].engines
        assert (engine.name, engine.available, engine.reason) == ("Echo", True, "")
        model = client.launch("echo-model", model_uid="echo", engine_options={"shout": True}, timeout=300)
        assert model.model_engine == "Echo"
        pieces = list(client.generate("echo", "Hello, plugin", max_tokens=5))
        assert "".join(p.text for p in pieces) == "[HELL"
        assert pieces[-1].usage.completion_tokens == 5
        with pytest.raises(Exception, match="not an option of Echo"):
            client.launch("echo-model", model_uid="echo-2", engine_options={"whisper": True})


def test_workers_on_the_cpu_start_with_the_engine_defaults_unless_the_operator_set_them(
    start_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))
    monkeypatch.setenv("ECHO_CLOSE", "}")  # the operator's own value for one of the two
    (tmp_path / "echo-model.json").write_text(json.dumps(FAMILY))
    server = start_server(device="cpu", engine_plugins=[PLUGIN], families_dir=tmp_path)
    with Client(server.endpoint) as client:
        client.launch("echo-model", model_uid="echo", timeout=300)
        text = "".join(p.text for p in client.generate("echo", "hi", max_tokens=16))
    assert text == "[hi}"


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        ("plugin_engine", "not of the form module:attribute"),
        ("plugin_engine:EchoEngine", "not an EngineInfo"),
        ("plugin_engine_that_does_not_exist:ENGINE_INFO", "No module named"),
    ],
)
def test_a_bad_plugin_is_refused_with_what_is_wrong(plugin, message, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    with pytest.raises((ValueError, ImportError), match=message):
        load_plugins([plugin])
