"""Adapt vLLM 0.32.0's source tree to build for this CPU from the package registries alone.

Each change is a small, checked substitution: a pattern must match exactly as often as
expected, or the script stops, so a different vLLM version fails loudly instead of
building something half-patched. Run once on a freshly extracted sdist:

    python patch_source.py SOURCE_DIR

What changes, and why:
- oneDNN: CMake normally clones oneDNN's source at configure time, which needs a code
  host this build cannot reach. The prebuilt CPU/OpenMP oneDNN from the Python
  environment (`onednn-devel-cpu-gomp`, which ships `dnnl-config.cmake`) is used
  instead, found under ONEDNN_PREFIX, with an rpath from the extension to `<venv>/lib`.
- `csrc/cpu/dnnl_helper.{h,cpp}` reach into oneDNN's private headers (`common/memory.hpp`)
  to swap data pointers and edit descriptors in place, which a prebuilt library does not
  ship. They are moved to the public API: `dnnl::memory::set_data_handle`, and a new
  `dnnl::memory` when the number of rows or the row stride changes.
- GCC: the x86 check asks for 12.3; Debian 12 ships 12.2, which builds the `_C` extension.
- GCC 12.2 has an internal compiler error on `flash_mla.cpp`'s stack arrays sized by a
  `constexpr` local; the same size is written as a literal.
- Only the `_C` extension (AVX512 + BF16 + VNNI) is built, which is what vLLM imports on
  a CPU with AVX512-BF16; the AVX512-only and AVX2 variants would triple the build time.
- The Rust HTTP front end (`vllm-rs`) is skipped: it needs crates from the network, and
  llmgrpc drives vLLM's Python engine API, not its HTTP server.
- Runtime requirements: triton-cpu is a wheel on a code host (vLLM then uses its C++
  fallbacks), and torchvision/torchaudio/torchcodec would pull a torch other than the
  CPU build; all are only for multimodal models.
- `vllm/utils/cpu_triton_utils.py`: the CPU fallback for the slot-mapping kernel takes
  the arguments in the order vLLM 0.33.0 fixed it to (0.32.0's version fails at the
  first forward pass).
- Ray (`distributed_executor_backend: ray`, vLLM's way across hosts): the CPU platform
  names no Ray resource, so vLLM refuses Ray on it ("current platform cpu does not support
  ray"). It gets the custom resource `vllm_cpu` (Ray reserves the name `CPU` for its own
  count of cores): each Ray node declares how many of this model's workers it hosts
  (`ray start --resources '{"vllm_cpu": 1}'`). Ray assigns no device ids for a custom
  resource, so the executor's lookup of the worker's ids takes none instead of failing
  (`KeyError: 'vllm_cpu'`); a CPU worker has no device to pick.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ONEDNN_FROM_ENVIRONMENT = """\
    # llmgrpc: the prebuilt oneDNN of the Python environment, not a source checkout.
    find_package(dnnl CONFIG REQUIRED PATHS "$ENV{ONEDNN_PREFIX}/lib/cmake/dnnl" NO_DEFAULT_PATH)
    add_library(dnnl ALIAS DNNL::dnnl)
    set(oneDNN_SOURCE_DIR "$ENV{ONEDNN_PREFIX}")
    set(oneDNN_BINARY_DIR "$ENV{ONEDNN_PREFIX}")
"""

# The helper that replaces the private-API pointer swaps, declared in the handler base class.
BIND_DECLARATIONS = """\
  // Points the cached memory for `arg` at `ptr` (public oneDNN API only).
  void bind_handle(int arg, const void* ptr);

  // As bind_handle, for a 2-D row-major operand whose row count and row stride may change
  // between calls: the memory object is rebuilt when its descriptor no longer matches.
  void bind_rows(int arg, dnnl_dim_t rows, dnnl_dim_t row_stride, const void* ptr);
"""

BIND_DEFINITIONS = """\
void DNNLMatMulPrimitiveHandler::bind_handle(int arg, const void* ptr) {
  memory_cache_[arg].set_data_handle(const_cast<void*>(ptr));
}

void DNNLMatMulPrimitiveHandler::bind_rows(int arg, dnnl_dim_t rows,
                                           dnnl_dim_t row_stride,
                                           const void* ptr) {
  dnnl::memory& memory = memory_cache_[arg];
  const dnnl::memory::desc current = memory.get_desc();
  dnnl::memory::dims dims = current.get_dims();
  dnnl::memory::dims strides = current.get_strides();
  if (dims[0] == rows && strides[0] == row_stride) {
    memory.set_data_handle(const_cast<void*>(ptr));
    return;
  }
  dims[0] = rows;
  strides[0] = row_stride;
  memory = dnnl::memory({dims, current.get_data_type(), strides},
                        default_engine(), const_cast<void*>(ptr));
}
"""


class Patcher:
    def __init__(self, root: Path) -> None:
        self.root = root

    def sub(self, relative: str, pattern: str, replacement: str, count: int = 1, flags: int = 0) -> None:
        """Replace `pattern` (a regex) exactly `count` times in one file."""
        path = self.root / relative
        text = path.read_text()
        new_text, found = re.subn(pattern, replacement, text, flags=flags)
        if found != count:
            raise SystemExit(f"{relative}: expected {count} match(es) of {pattern!r}, found {found}")
        path.write_text(new_text)

    def literal(self, relative: str, old: str, new: str, count: int = 1) -> None:
        self.sub(relative, re.escape(old), new.replace("\\", "\\\\"), count)


def patch(root: Path) -> None:
    p = Patcher(root)

    # Build system.
    cmake = "cmake/cpu_extension.cmake"
    p.literal(
        cmake,
        "CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12.3",
        "CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12.2",
    )
    p.sub(
        cmake,
        r"    set\(FETCHCONTENT_SOURCE_DIR_ONEDNN .*?(?=    add_library\(dnnl_ext OBJECT)",
        ONEDNN_FROM_ENVIRONMENT.replace("\\", "\\\\"),
        flags=re.DOTALL,
    )
    p.literal(
        cmake,
        '    target_compile_definitions(_C PRIVATE "-DCPU_CAPABILITY_AMXBF16")\n',
        '    target_compile_definitions(_C PRIVATE "-DCPU_CAPABILITY_AMXBF16")\n'
        "    # llmgrpc: find libdnnl in <venv>/lib from <venv>/lib/python3.X/site-packages/vllm.\n"
        '    set_target_properties(_C PROPERTIES INSTALL_RPATH "$ORIGIN/../../..")\n',
    )
    p.sub("setup.py", r'\n +ext_modules\.append\(CMakeExtension\(name="vllm\._C_AVX(512|2)"\)\)', "", count=2)
    p.literal("setup.py", "    rust_extensions=rust_extensions,\n", "    rust_extensions=[],\n")

    # GCC 12.2 internal compiler error on constexpr-sized stack arrays.
    p.sub(
        "csrc/cpu/sgl-kernels/flash_mla.cpp", r"(alignas\(64\) \w+ \w+\[)kBLOCK_H_MAX\b", r"\g<1>16", count=4
    )

    # oneDNN's public API in place of its private headers.
    header = "csrc/cpu/dnnl_helper.h"
    p.sub(
        header,
        r"namespace dnnl \{\nnamespace impl \{.*?\}  // namespace dnnl\nstruct dnnl_memory_desc;\n",
        "",
        flags=re.DOTALL,
    )
    p.sub(
        header,
        r"  void set_runtime_memory_ptr\(.*?get_runtime_memory_ptr\(size_t index\);\n",
        BIND_DECLARATIONS,
        flags=re.DOTALL,
    )
    p.sub(
        header,
        r"  std::vector<std::pair<dnnl::impl::memory_storage_t\*, dnnl_memory_desc\*>>\n"
        r"\s+runtime_memory_ptrs_;\n",
        "",
    )

    source = "csrc/cpu/dnnl_helper.cpp"
    p.sub(source, r'#include "common/memory(_desc)?\.hpp"\n', "", count=2)
    p.sub(source, r"      runtime_memory_ptrs_\(8\),\n", "")
    p.sub(
        source,
        r"void DNNLMatMulPrimitiveHandler::set_runtime_memory_ptr\("
        r".*?return runtime_memory_ptrs_\[index\];\n\}\n",
        BIND_DEFINITIONS,
        flags=re.DOTALL,
    )
    # The pointer/descriptor pairs are no longer fetched: each operand is bound by argument id.
    p.sub(source, r"(?m)^ *auto&& \[\w+, \w+\] =\s+get_runtime_memory_ptr\(\d\);\n", "", count=10)
    p.sub(
        source,
        r"  a_storage->set_data_handle\(\(void\*\)args\.a_ptr\);\n  a_mem_desc->dims\[0\] = args\.a_m_size;\n"
        r"(?!  a_mem_desc)",
        "  bind_rows(DNNL_ARG_SRC, args.a_m_size, b_k_size_, args.a_ptr);\n",
    )
    p.sub(
        source,
        r"  a_storage->set_data_handle\(\(void\*\)args\.a_ptr\);\n  a_mem_desc->dims\[0\] = args\.a_m_size;\n"
        r"  a_mem_desc->format_desc\.blocking\.strides\[0\] = args\.a_m_stride;\n",
        "  bind_rows(DNNL_ARG_SRC, args.a_m_size, args.a_m_stride, args.a_ptr);\n",
    )
    p.sub(
        source,
        r"  c_storage->set_data_handle\(\(void\*\)args\.c_ptr\);\n"
        r"  c_mem_desc->dims\[0\] = args\.a_m_size;\n",
        "  bind_rows(DNNL_ARG_DST, args.a_m_size, b_n_size_, args.c_ptr);\n",
        count=2,
    )
    p.sub(
        source,
        r"a_scale_storage->set_data_handle\(\(void\*\)args\.a_scales_ptr\);",
        "bind_handle(DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, args.a_scales_ptr);",
    )
    p.sub(
        source,
        r"a_zero_point_storage->set_data_handle\(\(void\*\)args\.a_zero_points_ptr\);",
        "bind_handle(DNNL_ARG_ATTR_ZERO_POINTS | DNNL_ARG_SRC, args.a_zero_points_ptr);",
    )
    p.sub(
        source,
        r"bias_storage->set_data_handle\(\(void\*\)args\.bias_ptr\);",
        "bind_handle(DNNL_ARG_BIAS, args.bias_ptr);",
        count=2,
    )
    p.sub(source, r"scratchpad_storage->set_data_handle\(\n", "bind_handle(DNNL_ARG_SCRATCHPAD,\n", count=2)
    p.sub(source, r"\n *set_runtime_memory_ptr\(\s*\d,\s*memory_cache_\[[^\]]+\]\.get\(\)\);", "", count=10)
    if re.search(r"runtime_memory_ptr|_storage\b|dnnl::impl", (root / source).read_text()):
        raise SystemExit(f"{source}: private-API uses left after patching")

    # Runtime requirements that cannot or must not install here (see the module docstring).
    p.sub("requirements/cpu.txt", r"(?m)^(triton @|torchaudio|torchvision|torchcodec).*\n", "", count=5)

    # The CPU slot-mapping fallback, with the signature its caller uses.
    helper = "vllm/utils/cpu_triton_utils.py"
    p.literal(helper, "    block_size: int,\n    slot_mapping", "    slot_mapping")
    p.sub(
        helper,
        r"    KV_CACHE_BLOCK_SIZE: int \| None = None,\n    BLOCKS_PER_KV_BLOCK: int = 1,\n",
        "    KV_CACHE_BLOCK_SIZE: int,\n",
    )
    p.sub(helper, r"    if BLOCKS_PER_KV_BLOCK != 1:\n        assert .*\n", "")
    p.sub(
        helper,
        r"(        slot_mapping,\n        )block_size,\n(    \)\n)",
        r"\g<1>KV_CACHE_BLOCK_SIZE,\n\g<2>",
    )

    patch_ray(p)


def patch_ray(p: Patcher) -> None:
    """Ray's executor on the CPU platform (see the module docstring)."""
    p.literal(
        "vllm/platforms/cpu.py",
        '    dist_backend: str = "gloo"\n',
        '    dist_backend: str = "gloo"\n'
        "    # llmgrpc: the Ray resource a CPU model worker takes (Ray reserves the name CPU).\n"
        '    ray_device_key: str = "vllm_cpu"\n',
    )
    p.literal(
        "vllm/v1/executor/ray_executor_v2.py",
        "get_accelerator_ids()[device_key]",
        "get_accelerator_ids().get(device_key, [])",
    )
    p.sub(
        "vllm/v1/executor/ray_utils.py",
        r"get_accelerator_ids\(\)\[\n( +)device_key\n( +)\]",
        r"get_accelerator_ids().get(\n\g<1>device_key, []\n\g<2>)",
    )


if __name__ == "__main__":
    patch(Path(sys.argv[1]))
    print(f"patched {sys.argv[1]}")
