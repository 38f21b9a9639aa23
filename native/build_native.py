"""cffi (API mode) build of qkdnode._native from the C sources in this directory.

``ffibuilder`` is what setup.py's ``cffi_modules`` builds, so ``pip install -e .`` compiles it;
``python native/build_native.py`` (from any directory) builds the same extension in place.
``native/sanitize.py`` builds it with sanitizers elsewhere through ``compile_to``.
"""

import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# One file per kernel family; a new one goes here, and its declarations into qkdnative.h and CDEF.
SOURCES = ["xor.c", "cpu.c", "toeplitz.c", "toeplitz_x86.c", "wegman_carter.c"]
# Internal headers: a change to one rebuilds the extension.
HEADERS = ["qkdnative.h", "clmul.h", "gf64.h"]

# What Python sees of qkdnative.h (cffi does not parse the header itself). cffi makes every call
# with the GIL released ("C function calls are done with the GIL released": cffi docs, Reference,
# Conversions, note [2]), so a large XOR or Toeplitz hash does not stall other threads, and no
# function may touch Python objects. "..." lets the C compiler supply a constant's value.
CDEF = """
void qkd_xor(uint8_t *dst, const uint8_t *a, const uint8_t *b, size_t n);

#define QKD_IMPL_AUTO ...
#define QKD_IMPL_PORTABLE ...
#define QKD_IMPL_PCLMUL ...
#define QKD_IMPL_AVX512 ...
int qkd_impl_available(int impl);
int qkd_set_impl(int impl);
int qkd_get_impl(void);

int qkd_toeplitz(uint8_t *out, const uint8_t *seed, const uint8_t *data, uint64_t n_in,
                 uint64_t n_out);
int qkd_toeplitz_force_plan(int blocked, unsigned k);
uint64_t qkd_toeplitz_workspace(uint64_t n_in, uint64_t n_out);
uint64_t qkd_gf64_cantor(unsigned i);

#define QKD_WC_KEY_BYTES ...
#define QKD_WC_HASH_BYTES ...
#define QKD_WC_MIN_TAG_BYTES ...
#define QKD_WC_MAX_MESSAGE_BYTES ...
void qkd_wc_hash(uint8_t *out, const uint8_t *key, const uint8_t *msg, size_t len);
int qkd_wc_tag(uint8_t *tag, const uint8_t *key, const uint8_t *pad, size_t tag_len,
               const uint8_t *msg, size_t len);
int qkd_wc_verify(const uint8_t *tag, const uint8_t *key, const uint8_t *pad, size_t tag_len,
                  const uint8_t *msg, size_t len);
"""

# -O3 and plain C99 for the baseline ISA: the SIMD kernels select their instruction sets per
# function (clmul.h), so the library runs on any CPU of the architecture.
COMPILE_ARGS = ["-O3", "-std=c99"]


def make_ffibuilder(relative_to=None, extra_compile_args=(), extra_link_args=(), **extension_options):
    """Builder of qkdnode._native; C source paths are relative to ``relative_to``, else absolute."""
    sources = [HERE / name for name in SOURCES]
    depends = [HERE / name for name in HEADERS]
    if relative_to is not None:
        sources = [path.relative_to(relative_to) for path in sources]
        depends = [path.relative_to(relative_to) for path in depends]
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "qkdnode._native",
        '#include "qkdnative.h"',
        sources=[path.as_posix() for path in sources],
        depends=[path.as_posix() for path in depends],
        include_dirs=[str(HERE)],
        extra_compile_args=COMPILE_ARGS + list(extra_compile_args),
        extra_link_args=list(extra_link_args),
        **extension_options,
    )
    return builder


def compile_to(tmpdir, extra_compile_args=(), extra_link_args=(), verbose=False) -> Path:
    """Compile the extension inside ``tmpdir`` and return the path of the built module."""
    # cffi compiles from inside tmpdir, hence absolute paths here. py_limited_api names the result
    # _native.abi3.so, like pip's build of ffibuilder.
    builder = make_ffibuilder(
        extra_compile_args=extra_compile_args, extra_link_args=extra_link_args, py_limited_api=True
    )
    return Path(builder.compile(tmpdir=str(tmpdir), verbose=verbose))


# setuptools runs from the project root and refuses absolute source paths ("setup script specifies
# an absolute path"), so these are relative to it.
ffibuilder = make_ffibuilder(relative_to=ROOT)

if __name__ == "__main__":
    # Built aside, then renamed into place: a process importing qkdnode._native meanwhile sees the
    # old module or the new one, never a half-written file. A later `pip install -e .` replaces it.
    built = compile_to(ROOT / "build" / "native", verbose=True)
    package = ROOT / "qkdnode"
    for suffix in EXTENSION_SUFFIXES:  # Python imports the first suffix it finds, not the newest file
        if (package / f"_native{suffix}") != package / built.name:
            (package / f"_native{suffix}").unlink(missing_ok=True)
    os.replace(built, package / built.name)
