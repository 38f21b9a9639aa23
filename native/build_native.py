"""cffi (API mode) build of qkdnode._native from the C sources in this directory.

``ffibuilder`` is what setup.py's ``cffi_modules`` builds, so ``pip install -e .`` compiles it;
``python native/build_native.py`` (from any directory) builds the same extension in place.
"""

import os
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import cffi

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# One file per kernel family; a new one goes here, and its declarations into qkdnative.h and CDEF.
SOURCES = ["xor.c"]

# What Python sees of qkdnative.h (cffi does not parse the header itself). cffi makes every call
# with the GIL released ("C function calls are done with the GIL released": cffi docs, Reference,
# Conversions, note [2]), so a large XOR does not stall other threads, and no function may touch
# Python objects.
CDEF = """
void qkd_xor(uint8_t *dst, const uint8_t *a, const uint8_t *b, size_t n);
"""


def make_ffibuilder(relative_to=None, **extension_options):
    """Builder of qkdnode._native; C source paths are relative to ``relative_to``, else absolute."""
    sources = [HERE / name for name in SOURCES]
    if relative_to is not None:
        sources = [path.relative_to(relative_to) for path in sources]
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(
        "qkdnode._native",
        '#include "qkdnative.h"',
        sources=[path.as_posix() for path in sources],
        include_dirs=[str(HERE)],
        extra_compile_args=["-O3", "-std=c99"],
        **extension_options,
    )
    return builder


# setuptools runs from the project root and refuses absolute source paths ("setup script specifies
# an absolute path"), so these are relative to it.
ffibuilder = make_ffibuilder(relative_to=ROOT)

if __name__ == "__main__":
    # cffi compiles from inside tmpdir, hence absolute paths here. py_limited_api names the result
    # _native.abi3.so, like pip's build of ffibuilder, so a later `pip install -e .` replaces it.
    built = Path(
        make_ffibuilder(py_limited_api=True).compile(tmpdir=str(ROOT / "build" / "native"), verbose=True)
    )
    package = ROOT / "qkdnode"
    for suffix in EXTENSION_SUFFIXES:  # Python imports the first suffix it finds, not the newest file
        (package / f"_native{suffix}").unlink(missing_ok=True)
    os.replace(built, package / built.name)
