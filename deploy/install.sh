#!/usr/bin/env bash
# Install llmgrpc, with its engines, into a new virtual environment: the one install step of
# deploy/Containerfile's images, and what tests/test_container.py runs on a fresh environment,
# so that the images are built the way the tests verify.
#
#   deploy/install.sh VENV [SOURCE]      (SOURCE: the llmgrpc checkout; default: this one)
#
# Environment (the defaults are the CPU image's):
#   PYTHON     interpreter the environment is made from (python3)
#   TORCH      torch requirement: torch==2.13.0, the CPU build where the package index serves it;
#              `torch` takes the default (CUDA) build; empty: none (an engine that pins its own)
#   LLAMA_CPP  1: build llama-cpp-python with the project's recipe (deploy/llama-cpp/build.sh,
#              which reads LLAMA_CPP_EXTRA_CMAKE_ARGS, e.g. -DGGML_CUDA=on); empty: none
#   EXTRAS     llmgrpc's extras (transformers,llamacpp)
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 VENV [SOURCE]" >&2
    exit 2
fi
VENV=$1
SOURCE=${2:-$(cd "$(dirname "$0")/.." && pwd)}
PYTHON=${PYTHON:-python3}
TORCH=${TORCH-torch==2.13.0}
LLAMA_CPP=${LLAMA_CPP-1}
EXTRAS=${EXTRAS-transformers,llamacpp}

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" --upgrade pip
# torch first, so the engines' extras find it installed rather than pull another build.
if [ -n "$TORCH" ]; then "${PIP[@]}" "$TORCH"; fi
if [ -n "$LLAMA_CPP" ]; then "$SOURCE/deploy/llama-cpp/build.sh" "$VENV/bin/python"; fi
"${PIP[@]}" "$SOURCE${EXTRAS:+[$EXTRAS]}"
# The entrypoint runs: every module of the server imports in this environment.
"$VENV/bin/llmgrpc" serve --help >/dev/null
echo "llmgrpc installed in $VENV"
