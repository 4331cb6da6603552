"""The contract: buf lint clean, every element documented, and generated code in step with it."""

from __future__ import annotations

import filecmp
import importlib.util
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROTOS = REPO / "protos"
GENERATED = REPO / "clients" / "v1"
BUF = PROTOS / "node_modules" / ".bin" / "buf"


def test_buf_lint_standard_and_comments_is_clean():
    assert BUF.exists(), "buf is missing: run `make install` (it installs protos/package.json)"
    result = subprocess.run([str(BUF), "lint"], cwd=PROTOS, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_matches_the_protos(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("generate", PROTOS / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    generate.generate(tmp_path)
    fresh = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in GENERATED.iterdir() if p.name != "__pycache__")
    assert fresh == committed
    _, mismatch, errors = filecmp.cmpfiles(tmp_path, GENERATED, fresh, shallow=False)
    assert not mismatch and not errors, (
        f"clients/v1 is out of date: run `make generate` ({mismatch + errors})"
    )


def test_field_numbers_are_never_reused():
    """Removed fields must be reserved, not renumbered: compare against the last committed protos."""
    result = subprocess.run(
        [str(BUF), "breaking", "--against", f"{REPO}/.git#subdir=protos"],
        cwd=PROTOS,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
