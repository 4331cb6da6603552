"""The llama.cpp library as built here: imported with its CPU backend registered, and checked
against this host's CPU.

The project's recipe (deploy/llama-cpp/recipe.env) builds ggml's runtime CPU dispatch
(``GGML_BACKEND_DL``): the CPU backend is one of several ``libggml-cpu-<variant>.so`` files
beside ``libllama.so``, and none is registered until the application loads them. ``import_llama_cpp``
does that once, from the package's own folder only (ggml's default search would include the
working directory), and ggml takes the variant with the highest score that this CPU runs. A
build without variants (``GGML_NATIVE``, an older wheel) has its CPU backend linked in, and
nothing is loaded.

``describe`` is what ``llmgrpc doctor`` prints: the build's variants or compiled-in features,
which of them this host runs, and why a build would fail here (an instruction set the CPU
lacks, or AMX tile kernels, which die with SIGILL on worker threads: llama.cpp PR #26954).
"""

from __future__ import annotations

import ctypes
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from llmgrpc.clients.errors import FailedPrecondition

VARIANT_PREFIX = "libggml-cpu-"
REBUILD = "rebuild llama-cpp-python with the project's recipe: make install (docs/engines.md)"

# llama_print_system_info's CPU feature names -> /proc/cpuinfo flags.
CPUINFO_FLAGS = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX_VNNI": "avx_vnni",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}
AMX_FEATURES = ("AMX_INT8",)
AMX_VARIANTS = ("sapphirerapids",)


def library_folder(llama_cpp: ModuleType) -> Path:
    """Where llama-cpp-python keeps libllama, libggml and the CPU variants."""
    return Path(llama_cpp.__file__).parent / "lib"


def cpu_variants(folder: Path) -> dict[str, Path]:
    """The CPU backend variants of a runtime-dispatch build, by name; empty for other builds."""
    return {
        path.name[len(VARIANT_PREFIX) :].split(".so")[0]: path
        for path in sorted(folder.glob(f"{VARIANT_PREFIX}*.so*"))
    }


def _loaded_ggml(folder: Path) -> Path:
    """The libggml file libllama was linked against at load (libggml.so.0): a wheel holds each
    name as a copy of its own, and a copy opened by another name would be a second ggml, with
    a registry of its own that libllama never sees."""
    folder = folder.resolve()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)  # address, perms, offset, device, inode, path
        mapped = Path(fields[5]) if len(fields) == 6 else None
        if mapped and mapped.parent == folder and mapped.name.startswith("libggml.so"):
            return mapped
    return folder / "libggml.so"


def _ggml(folder: Path) -> ctypes.CDLL:
    """The libggml that llama_cpp has loaded (dlopen hands back the same library)."""
    ggml = ctypes.CDLL(str(_loaded_ggml(folder)))
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path.restype = None
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    return ggml


@functools.cache
def import_llama_cpp() -> ModuleType:
    """llama_cpp, with ggml's backends registered: what every user of the library imports."""
    import llama_cpp

    folder = library_folder(llama_cpp)
    if cpu_variants(folder):
        ggml = _ggml(folder)
        if ggml.ggml_backend_reg_count() == 0:
            ggml.ggml_backend_load_all_from_path(str(folder).encode())
        if ggml.ggml_backend_reg_count() == 0:
            raise FailedPrecondition(
                f"none of llama.cpp's CPU backend variants in {folder} runs on this CPU: {REBUILD}"
            )
    return llama_cpp


def variant_scores(variants: dict[str, Path]) -> dict[str, int]:
    """Each variant's own score on this CPU (ggml_backend_score: 0 when it cannot run here)."""
    scores = {}
    for name, path in variants.items():
        library = ctypes.CDLL(str(path))
        library.ggml_backend_score.restype = ctypes.c_int
        scores[name] = int(library.ggml_backend_score())
    return scores


def compiled_features(system_info: str) -> list[str]:
    """The CPU features llama_print_system_info says are compiled in (``AVX2 = 1``)."""
    return [name for name, value in re.findall(r"([A-Z0-9_]+) = (\d+)", system_info) if value == "1"]


@dataclass
class BuildReport:
    """What doctor says of the llama.cpp build: facts, and the problems that stop it here."""

    version: str
    folder: str
    variants: dict[str, int] = field(default_factory=dict)  # name -> score on this host
    chosen: str | None = None
    features: list[str] = field(default_factory=list)  # compiled in, for a build without variants
    problems: list[str] = field(default_factory=list)


def check_build(
    version: str,
    folder: Path,
    scores: dict[str, int],
    features: list[str],
    host_flags: set[str],
) -> BuildReport:
    """Whether the build runs on a host with host_flags (pure: the facts are passed in)."""
    report = BuildReport(version=version, folder=str(folder), variants=scores, features=features)
    if scores:
        runnable = {name: score for name, score in scores.items() if score > 0}
        report.chosen = max(runnable, key=runnable.__getitem__) if runnable else None
        if report.chosen is None:
            report.problems.append(f"no CPU variant of this build runs on this CPU: {REBUILD}")
        elif report.chosen in AMX_VARIANTS:
            report.problems.append(
                f"this CPU would run the {report.chosen} variant, whose AMX tile kernels die with "
                f"SIGILL on worker threads: {REBUILD}"
            )
        return report
    missing = [name for name in features if name in CPUINFO_FLAGS and CPUINFO_FLAGS[name] not in host_flags]
    if missing:
        report.problems.append(
            f"the build uses instructions this CPU lacks ({', '.join(missing)}), so its worker dies "
            f"with SIGILL: {REBUILD}"
        )
    amx = [name for name in features if name in AMX_FEATURES]
    if amx:
        report.problems.append(
            f"the build has AMX tile kernels compiled in ({', '.join(amx)}, from -march=native on an "
            f"AMX host), which die with SIGILL on worker threads: {REBUILD}"
        )
    return report


def describe(host_flags: set[str]) -> BuildReport:
    """The installed llama.cpp build, checked against host_flags (imports llama_cpp)."""
    import importlib.metadata

    llama_cpp = import_llama_cpp()
    folder = library_folder(llama_cpp)
    variants = cpu_variants(folder)
    scores = variant_scores(variants) if variants else {}
    features = [] if variants else compiled_features(llama_cpp.llama_print_system_info().decode())
    version = importlib.metadata.version("llama_cpp_python")
    return check_build(version, folder, scores, features, host_flags)
