"""llama.cpp's build recipe runs on every x86-64 host: no AMX tile instruction in the recipe,
whatever host builds it, nor in the library installed here; and doctor's check of a build.

A machine without AMX never compiles AMX in, so the installed library alone cannot show a
bad recipe: the recipe is also compiled, flag for flag as ggml would pass them, as it would be
on an AMX host (-march=sapphirerapids standing for -march=native there)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llmgrpc.engines.llamacpp_build import check_build, compiled_features, cpu_variants

RECIPE = Path(__file__).parents[1] / "deploy" / "llama-cpp" / "recipe.env"
AMX_HOST = "sapphirerapids"

# ggml's x86 CPU variants (ggml/src/CMakeLists.txt, GGML_CPU_ALL_VARIANTS) and the GCC flags
# ggml-cpu/CMakeLists.txt gives each feature.
X86_VARIANTS = {
    "x64": (),
    "sse42": ("SSE42",),
    "sandybridge": ("SSE42", "AVX"),
    "ivybridge": ("SSE42", "AVX", "F16C"),
    "piledriver": ("SSE42", "AVX", "F16C", "FMA"),
    "haswell": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2"),
    "skylakex": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
    "cannonlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI"),
    "cascadelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI"),
    "icelake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VBMI", "AVX512_VNNI"),
    "cooperlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512", "AVX512_VNNI", "AVX512_BF16"),
    "zen4": (
        *("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
        *("AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"),
    ),
    "alderlake": ("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX_VNNI"),
    "sapphirerapids": (
        *("SSE42", "AVX", "F16C", "FMA", "AVX2", "BMI2", "AVX512"),
        *("AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16", "AMX_TILE", "AMX_INT8"),
    ),
}
GCC_FLAGS = {
    "SSE42": ["-msse4.2"],
    "F16C": ["-mf16c"],
    "FMA": ["-mfma"],
    "BMI2": ["-mbmi2"],
    "AVX": ["-mavx"],
    "AVX2": ["-mavx2"],
    "AVX_VNNI": ["-mavxvnni"],
    "AVX512": ["-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512dq", "-mavx512bw"],
    "AVX512_VBMI": ["-mavx512vbmi"],
    "AVX512_VNNI": ["-mavx512vnni"],
    "AVX512_BF16": ["-mavx512bf16"],
    "AMX_TILE": ["-mamx-tile"],
    "AMX_INT8": ["-mamx-int8"],
    "AMX_BF16": ["-mamx-bf16"],
}
AMX_MACROS = ("__AMX_TILE__", "__AMX_INT8__", "__AMX_BF16__")
# The recipe before this one: llama-cpp-python's defaults (GGML_NATIVE on, no flags).
DEFAULT_RECIPE = {"LLAMA_CPP_CMAKE_ARGS": "", "LLAMA_CPP_CFLAGS": "", "LLAMA_CPP_DROPPED_VARIANTS": ""}


def read_recipe(path: Path) -> dict[str, str]:
    names = ("LLAMA_CPP_CMAKE_ARGS", "LLAMA_CPP_CFLAGS", "LLAMA_CPP_DROPPED_VARIANTS")
    script = f". {shlex.quote(str(path))}; " + "; ".join(f'printf "%s\\0" "${name}"' for name in names)
    values = subprocess.run(["bash", "-c", script], capture_output=True, check=True).stdout.split(b"\0")
    return dict(zip(names, (value.decode() for value in values), strict=False))


def compile_flags(recipe: dict[str, str], host_march: str) -> dict[str, list[str]]:
    """Each CPU library the recipe builds, with the flags GCC gets for it on a host whose
    -march=native is host_march: CFLAGS first, then ggml's own, as CMake orders them."""
    cmake_args = recipe["LLAMA_CPP_CMAKE_ARGS"].split()
    cflags = recipe["LLAMA_CPP_CFLAGS"].split()
    if "-DGGML_NATIVE=OFF" not in cmake_args:
        return {"native": [*cflags, f"-march={host_march}"]}
    if "-DGGML_CPU_ALL_VARIANTS=ON" in cmake_args:
        dropped = recipe["LLAMA_CPP_DROPPED_VARIANTS"].split()
        return {
            name: [*cflags, *(flag for feature in features for flag in GCC_FLAGS[feature])]
            for name, features in X86_VARIANTS.items()
            if name not in dropped
        }
    return {"cpu": cflags}


def predefined_macros(flags: list[str]) -> set[str]:
    command = ["gcc", "-march=x86-64", *flags, "-dM", "-E", "-x", "c", "-"]
    output = subprocess.run(command, input="", capture_output=True, text=True, check=True).stdout
    return {line.split()[1] for line in output.splitlines() if line.startswith("#define ")}


def amx_in(recipe: dict[str, str]) -> dict[str, list[str]]:
    """The libraries of the recipe whose code, built on an AMX host, may use AMX tiles."""
    found = {}
    for library, flags in compile_flags(recipe, AMX_HOST).items():
        macros = predefined_macros(flags) & set(AMX_MACROS)
        if macros:
            found[library] = sorted(macros)
    return found


def test_the_recipe_compiles_no_amx_even_on_an_amx_host():
    recipe = read_recipe(RECIPE)
    assert amx_in(recipe) == {}
    # ... and keeps the AVX-512 speed of the hosts that have it.
    fastest = [predefined_macros(flags) for flags in compile_flags(recipe, AMX_HOST).values()]
    assert any({"__AVX512F__", "__AVX512VNNI__", "__AVX512BF16__"} <= macros for macros in fastest)


def test_the_check_catches_the_recipe_that_crashed_on_amx_hosts():
    """llama-cpp-python's default build (GGML_NATIVE) on an AMX host compiles AMX in; keeping every
    variant, sapphirerapids included, does too."""
    assert amx_in(DEFAULT_RECIPE) == {"native": sorted(AMX_MACROS)}
    every_variant = dict(read_recipe(RECIPE), LLAMA_CPP_DROPPED_VARIANTS="")
    assert list(amx_in(every_variant)) == ["sapphirerapids"]


TILE_INSTRUCTION = re.compile(r"\t(tile\w*|ldtilecfg|sttilecfg|tdp\w+)\s")


@pytest.mark.llamacpp
def test_the_installed_library_holds_no_tile_instruction():
    llama_cpp = pytest.importorskip("llama_cpp")
    folder = Path(llama_cpp.__file__).parent / "lib"
    libraries = sorted(folder.glob("libggml-cpu*.so*"))
    assert libraries, f"no ggml CPU library in {folder}"
    for library in libraries:
        listing = subprocess.run(
            ["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
        ).stdout
        tiles = sorted({match.group(1) for match in TILE_INSTRUCTION.finditer(listing)})
        assert tiles == [], f"{library.name} holds AMX tile instructions: {tiles}"


@pytest.mark.llamacpp
def test_the_installed_build_dispatches_at_run_time_and_runs_here():
    llama_cpp = pytest.importorskip("llama_cpp")
    variants = cpu_variants(Path(llama_cpp.__file__).parent / "lib")
    assert "x64" in variants and "sapphirerapids" not in variants
    doctor = subprocess.run(
        [sys.executable, "-m", "llmgrpc.server.cli", "doctor"], capture_output=True, text=True, timeout=120
    )
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert "runtime CPU dispatch" in doctor.stdout and "this CPU runs:" in doctor.stdout


def test_doctor_refuses_builds_that_cannot_run_on_the_host():
    avx2_host = {"pni", "ssse3", "avx", "avx2", "f16c", "fma", "bmi2"}
    amx_host = avx2_host | {"avx512f", "avx512vbmi", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_tile"}
    native_avx512 = compiled_features("CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 |")
    assert check_build("v", Path("lib"), {}, native_avx512, amx_host).problems == []
    (lacking,) = check_build("v", Path("lib"), {}, native_avx512, avx2_host).problems
    assert "AVX512, AVX512_VNNI" in lacking and "SIGILL" in lacking
    native_amx = compiled_features("CPU : AVX512 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1")
    (amx,) = check_build("v", Path("lib"), {}, native_amx, amx_host).problems
    assert "AMX" in amx and "make install" in amx
    scores = {"x64": 1, "zen4": 0, "haswell": 4}
    assert check_build("v", Path("lib"), scores, [], avx2_host).chosen == "haswell"
    (none,) = check_build("v", Path("lib"), {"zen4": 0}, [], avx2_host).problems
    assert "no CPU variant" in none
    (chosen_amx,) = check_build("v", Path("lib"), {"x64": 1, "sapphirerapids": 9}, [], amx_host).problems
    assert "sapphirerapids" in chosen_amx
