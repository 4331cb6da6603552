"""The models file (llmgrpc serve --models-file): entries in LaunchModelRequest's words become
launches; a bad entry is refused naming the entry and the field; a server whose model fails to
launch exits non-zero with the reason."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmgrpc.server.models_file import ModelsFileError, launch_requests, load_models_file, parse_models
from llmgrpc.server.registry import SpecQuery

LLMGRPC = Path(sys.executable).with_name("llmgrpc")


def test_entries_become_launches():
    (full, short) = parse_models(
        yaml.safe_load(
            """
models:
  - model_name: llama-3.1
    model_uid: llama
    model_engine: llama.cpp
    model_format: ggufv2
    size_in_billions: 8
    quantization: Q4_K_M
    device: cuda:1
    engine_options: {n_gpu_layers: -1, context_length: 4096}
    download_hub: modelscope
    idle_unload_s: 600
  - model_name: tiny-llama-3.1
"""
        )
    )
    (pair,) = parse_models(
        yaml.safe_load(
            """
models:
  - model_name: llama-3.1
    model_uid: pair
    device: cuda
    n_gpu: 2
    gpu_idx: [0, 1, 2, 3]
    replica: 2
"""
        )
    )
    assert (pair.replica, pair.n_gpu, pair.gpu_idx) == (2, "2", (0, 1, 2, 3))
    assert full.query == SpecQuery("llama-3.1", "llama.cpp", "ggufv2", "8", "Q4_K_M")
    assert (full.model_uid, full.device, full.download_hub, full.idle_unload_s) == (
        "llama",
        "cuda:1",
        "modelscope",
        600,
    )
    assert full.engine_options == {"n_gpu_layers": -1, "context_length": 4096}
    assert full.wait  # a server starts ready only with every model READY
    # Like --launch NAME: the family's name is the uid; everything else is the server's default.
    assert (short.query, short.model_uid, short.idle_unload_s) == (
        SpecQuery("tiny-llama-3.1"),
        "tiny-llama-3.1",
        None,
    )


def test_json_is_read_too(tmp_path):
    path = tmp_path / "models.json"
    path.write_text('{"models": [{"model_name": "tiny-llama-3.1", "model_uid": "a"}]}')
    assert [launch.model_uid for launch in load_models_file(path)] == ["a"]


@pytest.mark.parametrize(
    ("models", "message"),
    [
        (
            [{"model_name": "tiny-llama-3.1", "model_engin": "llama.cpp"}],
            "models[0] (tiny-llama-3.1): unknown field model_engin",
        ),
        ([{"model_uid": "x"}], "models[0] (x): model_name is required"),
        (
            [{"model_name": "a"}, {"model_name": "b", "size_in_billions": 0.5}],
            "models[1] (b): size_in_billions must be text",
        ),
        (
            [{"model_name": "a", "engine_options": ["n_threads", 2]}],
            "models[0] (a): engine_options must be a mapping",
        ),
        ([{"model_name": "a", "idle_unload_s": -1}], "models[0] (a): idle_unload_s must be seconds >= 0"),
        ([{"model_name": "a", "idle_unload_s": "soon"}], "idle_unload_s must be seconds >= 0"),
        ([{"model_name": "a", "wait": False}], "unknown field wait"),
        ([{"model_name": "a", "replica": 0}], "models[0] (a): replica: 0 is not valid: 1 to 64"),
        ([{"model_name": "a", "replica": "two"}], "replica must be a whole number"),
        ([{"model_name": "a", "gpu_idx": "0,1"}], "gpu_idx must be a list of GPU indices"),
        ([{"model_name": "a", "replica": 2, "gpu_idx": [0, 1, 2]}], "cannot be shared by 2 replicas"),
        ([{"model_name": "a", "device": "cpu", "n_gpu": 2}], "GPUs cannot be asked for with device cpu"),
        ([{"model_name": "a", "model_uid": "no spaces"}], "model_uid: 'no spaces' is not valid"),
        ([{"model_name": "a"}, {"model_name": "a"}], "model_uid 'a' is launched twice"),
        ([{"model_name": "a", "lora_modules": "x=/a"}], "lora_modules must be a list"),
        ([{"model_name": "a", "lora_modules": [{"name": "x", "where": "/a"}]}], "is not name=path or"),
        ([{"model_name": "a", "lora_modules": ["x=relative"]}], "lora_modules[0].path: 'relative'"),
        ([{"model_name": "a", "lora_modules": ["x=/a", "x=/b"]}], "lora_modules[1].name: 'x' is given twice"),
        ([{"model_name": "a", "max_loras": 0}], "max_loras: 0 is not valid: 1 to 64"),
        ([{"model_name": "a", "max_lora_rank": "big"}], "max_lora_rank must be a whole number"),
        (["tiny-llama-3.1"], "models[0]: each model is a mapping"),
        ({"model_name": "a"}, "models must be a list"),
    ],
)
def test_a_bad_entry_is_named_with_its_field(models, message):
    with pytest.raises(ModelsFileError) as error:
        parse_models({"models": models})
    assert message in str(error.value)


def test_a_file_of_another_shape_is_refused(tmp_path):
    with pytest.raises(ModelsFileError, match="one key, models"):
        parse_models([{"model_name": "a"}])
    with pytest.raises(ModelsFileError, match="one key, models"):
        parse_models({"models": [], "extra": 1})
    path = tmp_path / "models.yaml"
    path.write_text("models: [\n")
    with pytest.raises(ModelsFileError, match="cannot read models file"):
        load_models_file(path)
    with pytest.raises(ModelsFileError, match="cannot read models file"):
        load_models_file(tmp_path / "missing.yaml")


def test_launch_flags_add_to_the_file(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models: [{model_name: tiny-llama-3.1, model_uid: tiny}]")
    assert [launch.model_uid for launch in launch_requests(path, ["tiny-llama-3.1"])] == [
        "tiny",
        "tiny-llama-3.1",
    ]
    assert [launch.model_uid for launch in launch_requests(None, ["tiny-llama-3.1"])] == ["tiny-llama-3.1"]
    with pytest.raises(ModelsFileError, match="between the models file and --launch"):
        launch_requests(path, ["tiny"])


# "Billion laughs": each level an alias of the one before, ten times (here a million strings).
BOMB = (
    "models:\n  - model_name: tiny-llama-3.1\n    engine_options:\n"
    f"      l0: &l0 [{', '.join(['lol'] * 10)}]\n"
    + "".join(f"      l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * 10)}]\n" for level in range(1, 6))
)


def test_yaml_aliases_are_refused_so_nothing_expands(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(BOMB)
    with pytest.raises(ModelsFileError, match=r"aliases \(\*l0\) are not allowed"):
        load_models_file(path)
    path.write_text("models: [{model_name: tiny-llama-3.1, engine_options: {a: &x 1, b: 2}}]")
    assert load_models_file(path)[0].engine_options == {"a": 1, "b": 2}  # an anchor alone is harmless


def test_only_a_regular_file_of_bounded_size_is_read(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models: []\n" + "#" * (2 * 1024 * 1024))
    with pytest.raises(ModelsFileError, match="more than 1048576"):
        load_models_file(path)
    with pytest.raises(ModelsFileError, match="not a regular file"):
        load_models_file(tmp_path)


def serve(tmp_path: Path, cache_dir: Path, models: str | None) -> subprocess.CompletedProcess:
    """Run `llmgrpc serve` on a models file of models (None: the file is already there)."""
    path = tmp_path / "models.yaml"
    if models is not None:
        path.write_text(models)
    return subprocess.run(
        [str(LLMGRPC), "serve", "--port", "0", "--models-file", str(path), "--cache-dir", str(cache_dir)],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_bad_models_file_stops_the_server_before_it_listens(tmp_path, cache_dir):
    finished = serve(tmp_path, cache_dir, "models: [{model_name: tiny-llama-3.1, quantisation: Q4_K_M}]")
    assert finished.returncode != 0
    assert "models[0] (tiny-llama-3.1): unknown field quantisation" in finished.stderr
    assert "listening" not in finished.stderr


@pytest.mark.parametrize("kind", ["bomb", "fifo"])
def test_a_models_file_that_would_never_load_stops_the_server_before_it_listens(tmp_path, cache_dir, kind):
    if kind == "fifo":  # opening it for reading would wait for a writer forever
        os.mkfifo(tmp_path / "models.yaml")
    finished = serve(tmp_path, cache_dir, BOMB if kind == "bomb" else None)
    assert finished.returncode != 0
    expected = "aliases (*l0) are not allowed" if kind == "bomb" else "it is not a regular file"
    assert expected in finished.stderr and "Traceback" not in finished.stderr
    assert "listening" not in finished.stderr


def test_a_model_that_fails_to_launch_stops_the_server_with_the_reason(tmp_path, cache_dir):
    finished = serve(
        tmp_path,
        cache_dir,
        "models:\n  - {model_name: tiny-llama-3.1, model_uid: good}\n"
        "  - {model_name: tiny-llama-3.1, model_uid: bad, quantization: Q9_X}\n",
    )
    assert finished.returncode != 0
    last_line = finished.stderr.strip().splitlines()[-1]
    assert last_line.startswith("llmgrpc: launching bad failed:"), finished.stderr[-2000:]
    assert "Q9_X" in last_line and "Traceback" not in finished.stderr
    assert "is ready on" not in finished.stdout


def test_lora_words_are_xinferences():
    """lora_modules as xinference's name=path or as mappings with a scale; max_loras, max_lora_rank."""
    (launch,) = parse_models(
        {
            "models": [
                {
                    "model_name": "tiny-llama-3.1",
                    "lora_modules": [
                        "sql=/models/sql-lora",
                        {"name": "chat", "path": "owner/chat", "scale": 0.5},
                    ],
                    "max_loras": 2,
                    "max_lora_rank": 32,
                }
            ]
        }
    )
    assert [(m.name, m.path, m.scale) for m in launch.lora_modules] == [
        ("sql", "/models/sql-lora", 1.0),
        ("chat", "owner/chat", 0.5),
    ]
    assert (launch.max_loras, launch.max_lora_rank) == (2, 32)


def test_the_launch_command_takes_lora_modules_as_xinference_writes_them():
    from llmgrpc.server.cli import build_parser

    args = build_parser().parse_args(
        [
            "launch",
            "--model-name",
            "tiny-llama-3.1",
            "--lora-modules",
            "a=/x",
            "b=owner/b",
            "--max-loras",
            "1",
        ]
    )
    assert args.lora_modules == ["a=/x", "b=owner/b"] and args.max_loras == 1
