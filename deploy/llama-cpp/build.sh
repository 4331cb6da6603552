#!/usr/bin/env bash
# Build llama-cpp-python with the project's one recipe (recipe.env) and install it into the
# environment of PYTHON.
#
#   deploy/llama-cpp/build.sh PYTHON
#
# The wheel is kept in a wheelhouse named after the recipe (LLMGRPC_WHEEL_CACHE, default
# ~/.cache/llmgrpc/wheels), and carries the recipe in its version (0.3.36+llmgrpc.<recipe id>):
# pip's own cache is keyed by version alone, so a wheel built with other flags is never reused,
# and `pip list` says which build is installed.
#
# Environment:
#   LLAMA_CPP_EXTRA_CMAKE_ARGS  appended to the recipe's CMake arguments (a GPU backend, e.g.
#                               "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=80;86;89;90"); part of
#                               the recipe id
#   LLMGRPC_WHEEL_CACHE         where built wheels are kept
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 PYTHON" >&2
    exit 2
fi
PYTHON=$1
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=recipe.env
. "$HERE/recipe.env"
EXTRA_CMAKE_ARGS=${LLAMA_CPP_EXTRA_CMAKE_ARGS:-}
CMAKE_ARGS_ALL="$LLAMA_CPP_CMAKE_ARGS${EXTRA_CMAKE_ARGS:+ $EXTRA_CMAKE_ARGS}"
# The recipe id covers recipe.env and the extra arguments; a change to how this script builds
# bumps LLAMA_CPP_RECIPE_REVISION there.
RECIPE_ID=$(cat "$HERE/recipe.env" <(printf '%s' "$EXTRA_CMAKE_ARGS") | sha256sum | cut -c1-12)
LOCAL_VERSION="$LLAMA_CPP_VERSION+llmgrpc.$RECIPE_ID"
WHEELHOUSE=${LLMGRPC_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/llmgrpc/wheels}/llama-cpp-python-$LOCAL_VERSION
PIP=("$PYTHON" -m pip --disable-pip-version-check)

note() { printf '== %s\n' "$*"; }

installed=$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama_cpp_python"))' 2>/dev/null || true)
if [ "$installed" = "$LOCAL_VERSION" ]; then
    note "llama-cpp-python $LOCAL_VERSION is installed"
    exit 0
fi

shopt -s nullglob
wheels=("$WHEELHOUSE"/llama_cpp_python-*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    note "building llama-cpp-python $LOCAL_VERSION (every CPU variant but: $LLAMA_CPP_DROPPED_VARIANTS); once, into $WHEELHOUSE"
    started=$(date +%s)
    "${PIP[@]}" download -q --no-deps --no-binary :all: -d "$work" "llama-cpp-python==$LLAMA_CPP_VERSION"
    tar -xzf "$work"/llama_cpp_python-"$LLAMA_CPP_VERSION".tar.gz -C "$work"
    src=$work/llama_cpp_python-$LLAMA_CPP_VERSION
    variants=$src/vendor/llama.cpp/ggml/src/CMakeLists.txt
    for variant in $LLAMA_CPP_DROPPED_VARIANTS; do
        grep -q "ggml_add_cpu_backend_variant($variant " "$variants" \
            || { echo "recipe: no CPU variant '$variant' in $variants" >&2; exit 1; }
        sed -i "/ggml_add_cpu_backend_variant($variant /d" "$variants"
    done
    sed -i "s/^__version__ = \"$LLAMA_CPP_VERSION\"/__version__ = \"$LOCAL_VERSION\"/" "$src/llama_cpp/__init__.py"
    grep -q "$LOCAL_VERSION" "$src/llama_cpp/__init__.py" \
        || { echo "recipe: could not set the local version in llama_cpp/__init__.py" >&2; exit 1; }
    CMAKE_ARGS="$CMAKE_ARGS_ALL" CFLAGS="$LLAMA_CPP_CFLAGS" CXXFLAGS="$LLAMA_CPP_CFLAGS" \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "${PIP[@]}" wheel -q --no-deps --no-cache-dir -w "$work/dist" "$src"
    mkdir -p "$WHEELHOUSE"
    cp "$work"/dist/llama_cpp_python-*.whl "$WHEELHOUSE/"
    note "built in $(( ($(date +%s) - started) / 60 )) min $(( ($(date +%s) - started) % 60 )) s"
    wheels=("$WHEELHOUSE"/llama_cpp_python-*.whl)
fi

note "installing ${wheels[0]##*/}"
"${PIP[@]}" install -q --force-reinstall --no-deps "${wheels[0]}"
"${PIP[@]}" install -q "${wheels[0]}"
