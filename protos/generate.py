"""Generate the Python stubs of the protos: the public contract and the worker's internal API.

protos/llmgrpc/v1 (the contract) goes to clients/v1, installed as llmgrpc.v1;
protos/llmgrpc/worker/v1 (the server's API to its worker processes, not public) goes to
worker/v1, installed as llmgrpc.worker.v1; the standard inference protocols
protos/llmgrpc/kserve/v2 and protos/llmgrpc/tgis/v1 go to server/kserve_v2 and
server/tgis_v1 (llmgrpc.kserve.v2, llmgrpc.tgis.v1). Each gets messages (_pb2.py), services
(_pb2_grpc.py) and typed stubs for both (.pyi, through mypy-protobuf, so the Stub, the async
Stub and the Servicer are typed). The contract and the inference protocols also get ``descriptors.binpb``: its
descriptors with their comments, which protoc's Python output drops, so that server
reflection (``grpcurl describe``) shows the documentation. The output is never edited by
hand: `make generate` rewrites it and `tests/test_contract.py` fails when it differs from
what the protos give.

Usage: python protos/generate.py   (writes every folder)
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PUBLIC = Path("llmgrpc") / "v1"
WORKER = Path("llmgrpc") / "worker" / "v1"
# The standard inference protocols the server also speaks: KServe v2 (package inference) and
# TGIS (package fmaas), installed as llmgrpc.kserve.v2 and llmgrpc.tgis.v1.
KSERVE = Path("llmgrpc") / "kserve" / "v2"
TGIS = Path("llmgrpc") / "tgis" / "v1"
# Each proto package and the folder its stubs are written to.
OUTPUT_DIRS = {
    PUBLIC: REPO_ROOT / "clients" / "v1",
    WORKER: REPO_ROOT / "worker" / "v1",
    KSERVE: REPO_ROOT / "server" / "kserve_v2",
    TGIS: REPO_ROOT / "server" / "tgis_v1",
}
# The packages server reflection serves, with their documented descriptors.
REFLECTED = (PUBLIC, KSERVE, TGIS)
DESCRIPTORS = "descriptors.binpb"


def generate(output_dir: Path, package: Path = PUBLIC) -> list[Path]:
    """Write the generated modules of every proto in package (a folder of protos/) into output_dir;
    the documented descriptors too for the packages reflection serves."""
    import grpc_tools
    from grpc_tools import protoc

    bin_dir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / package).glob("*.proto"))
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / package).mkdir(parents=True)
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
        ]
        if package in REFLECTED:
            args += ["--include_source_info", f"--descriptor_set_out={Path(scratch) / package / DESCRIPTORS}"]
        if protoc.main([*args, *protos]) != 0:
            raise SystemExit("protoc failed")
        output_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for produced in sorted((Path(scratch) / package).iterdir()):
            target = output_dir / produced.name
            shutil.copyfile(produced, target)
            written.append(target)
    (output_dir / "__init__.py").write_text(
        f'"""Generated from protos/{package.as_posix()} by protos/generate.py; do not edit."""\n'
    )
    (output_dir / "py.typed").write_text("")
    return written


if __name__ == "__main__":
    for package, output_dir in OUTPUT_DIRS.items():
        for path in generate(output_dir, package):
            print(path.relative_to(REPO_ROOT))
