"""Generate the Python stubs of protos/llmgrpc/v1 into clients/v1 (package llmgrpc.v1).

Messages (_pb2.py), services (_pb2_grpc.py), typed stubs for both (.pyi, through
mypy-protobuf, so the Stub, the async Stub and the Servicer are typed), and
``descriptors.binpb``: the protos' descriptors with their comments, which protoc's Python
output drops, so that server reflection (``grpcurl describe``) shows the documentation. The output is
never edited by hand: `make generate` rewrites it and `tests/test_contract.py` fails
when it differs from what the protos give.

Usage: python protos/generate.py [OUTPUT_DIR]   (default: clients/v1)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PROTO_PACKAGE = Path("llmgrpc") / "v1"
DESCRIPTORS = "descriptors.binpb"


def generate(output_dir: Path) -> list[Path]:
    """Write the generated modules of every proto in llmgrpc/v1 into output_dir."""
    import grpc_tools
    from grpc_tools import protoc

    bin_dir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / PROTO_PACKAGE).mkdir(parents=True)
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
            f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            f"--mypy_out={scratch}",
            f"--mypy_grpc_out={scratch}",
            "--include_source_info",
            f"--descriptor_set_out={Path(scratch) / PROTO_PACKAGE / DESCRIPTORS}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        output_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for produced in sorted((Path(scratch) / PROTO_PACKAGE).iterdir()):
            target = output_dir / produced.name
            shutil.copyfile(produced, target)
            written.append(target)
    (output_dir / "__init__.py").write_text(
        '"""Generated from protos/llmgrpc/v1 by protos/generate.py; do not edit."""\n'
    )
    (output_dir / "py.typed").write_text("")
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO_ROOT / "clients" / "v1"
    for path in generate(out):
        print(path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path)
