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
RELEASED_CONTRACT = PROTOS / "released" / "llmgrpc-v1.binpb"


def test_buf_lint_standard_and_comments_is_clean():
    assert BUF.exists(), "buf is missing: run `make install` (it installs protos/package.json)"
    result = subprocess.run([str(BUF), "lint"], cwd=PROTOS, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_matches_the_protos(tmp_path: Path):
    """Both the contract's stubs (clients/v1) and the worker API's (worker/v1)."""
    spec = importlib.util.spec_from_file_location("generate", PROTOS / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    assert generate.OUTPUT_DIRS[generate.PUBLIC] == GENERATED
    for package, committed_dir in generate.OUTPUT_DIRS.items():
        fresh_dir = tmp_path / package
        generate.generate(fresh_dir, package)
        fresh = sorted(p.name for p in fresh_dir.iterdir())
        committed = sorted(p.name for p in committed_dir.iterdir() if p.name != "__pycache__")
        assert fresh == committed, committed_dir
        _, mismatch, errors = filecmp.cmpfiles(fresh_dir, committed_dir, fresh, shallow=False)
        assert not mismatch and not errors, (
            f"{committed_dir.relative_to(REPO)} is out of date: run `make generate` ({mismatch + errors})"
        )


def test_buf_lint_covers_the_worker_api():
    """The worker's internal API is held to the contract's lint rules too."""
    result = subprocess.run([str(BUF), "ls-files"], cwd=PROTOS, capture_output=True, text=True)
    assert "llmgrpc/worker/v1/worker.proto" in result.stdout.split(), result.stdout + result.stderr


def test_the_released_contract_is_not_broken():
    """Removed fields must be reserved, not renumbered: compare the protos as they are (committed
    or not) with the last released contract, an image `make release-contract` writes on a release."""
    assert RELEASED_CONTRACT.exists(), "the released contract is missing: see protos/released/README.md"
    result = subprocess.run(
        [str(BUF), "breaking", "protos", "--against", str(RELEASED_CONTRACT.relative_to(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
