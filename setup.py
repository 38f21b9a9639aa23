# The C library in native/ is compiled by cffi (API mode) when the package is installed.
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
