#!/usr/bin/env bash
# Build vLLM for this CPU into its own virtual environment (`make vllm-cpu`).
#
# vLLM's published wheels are CUDA builds. This builds the CPU backend from vLLM's source
# distribution with only the package registries (see patch_source.py for what changes and
# why), keeps the wheel in a cache outside the checkout, and installs it, with llmgrpc
# itself, into VENV. Model workers for engine "vllm" then run with VENV's interpreter
# (LLMGRPC_WORKER_PYTHON='{"vLLM": "VENV/bin/python"}'); the server never imports vLLM.
#
#   deploy/vllm-cpu/build.sh [VENV]
set -euo pipefail

VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH=${TORCH:-torch==2.13.0}
ONEDNN_VERSION=${ONEDNN_VERSION:-2023.2.0}
# Ray: vLLM's executor across hosts (distributed_executor_backend "ray", docs/multi-node.md).
RAY=${RAY:-ray[default]==2.60.0}
PYTHON=${PYTHON:-python3}
VENV=$(realpath -m "${1:-.venv-vllm}")
HERE=$(cd "$(dirname "$0")" && pwd)
# A wheel is cached per version of the source patch: a changed patch_source.py builds anew.
PATCH_ID=$(sha256sum "$HERE/patch_source.py" | cut -c1-12)
WHEEL_CACHE=${LLMGRPC_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmgrpc/wheels}/vllm-cpu-$PATCH_ID
REPO=$(cd "$HERE/../.." && pwd)
WORK=$REPO/build/vllm-cpu

note() { printf '\n== %s\n' "$*"; }

# NUMA headers: vLLM's CPU backend binds threads to NUMA nodes (libnuma.so.1 at run time).
if [ ! -f /usr/include/numa.h ]; then
    note "installing libnuma-dev (the NUMA headers vLLM's CPU backend compiles against)"
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y -q libnuma-dev >/dev/null
    else
        sudo apt-get install -y -q libnuma-dev >/dev/null
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    note "creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip)
# torch first and pinned: vLLM's CPU build requires exactly this CPU build of torch.
# oneDNN: the CPU-only OpenMP build (the 2026 `onednn` wheels are SYCL builds that find
# no CPU device). Its shared library is what vLLM's _C extension links against.
"${PIP[@]}" install -q "$TORCH" "onednn-cpu-gomp==$ONEDNN_VERSION" "onednn-devel-cpu-gomp==$ONEDNN_VERSION"

shopt -s nullglob
cached=("$WHEEL_CACHE"/vllm-"$VLLM_VERSION"+cpu-*.whl)
if [ ${#cached[@]} -eq 0 ]; then
    note "building vLLM $VLLM_VERSION for the CPU: about 10 minutes on 2 cores (once; the wheel is cached in $WHEEL_CACHE)"
    started=$(date +%s)
    "${PIP[@]}" install -q "cmake>=3.26.1" ninja "packaging>=24.2" "setuptools>=77.0.3,<81" \
        "setuptools-scm>=8" "setuptools-rust>=1.9" wheel jinja2
    rm -rf "$WORK" && mkdir -p "$WORK"
    "$VENV/bin/python" "$HERE/fetch_sdist.py" vllm "$VLLM_VERSION" "$WORK"
    tar -xzf "$WORK/vllm-$VLLM_VERSION.tar.gz" -C "$WORK"
    "$VENV/bin/python" "$HERE/patch_source.py" "$WORK/vllm-$VLLM_VERSION"
    mkdir -p "$WHEEL_CACHE"
    (
        cd "$WORK/vllm-$VLLM_VERSION"
        export PATH="$VENV/bin:$PATH"
        VLLM_TARGET_DEVICE=cpu ONEDNN_PREFIX="$VENV" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            "${PIP[@]}" wheel --no-build-isolation --no-deps -w "$WORK/dist" .
    )
    cp "$WORK"/dist/vllm-*.whl "$WHEEL_CACHE/"
    note "built in $(( ($(date +%s) - started) / 60 )) min $(( ($(date +%s) - started) % 60 )) s"
    cached=("$WHEEL_CACHE"/vllm-"$VLLM_VERSION"+cpu-*.whl)
fi

note "installing ${cached[0]##*/}, Ray and llmgrpc into $VENV"
"${PIP[@]}" install -q --force-reinstall --no-deps "${cached[0]}"
"${PIP[@]}" install -q "${cached[0]}" "$RAY"
"${PIP[@]}" install -q -e "$REPO[vllm]"
"$VENV/bin/python" -m llmgrpc.engines.probe; echo
touch "$VENV/.installed"
