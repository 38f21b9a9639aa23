# Targets of the native library (native/, qkdnode/native.py). Included from the top-level
# Makefile, after its own definitions (it uses its `install` target and VENV).
#
#   make native           rebuild qkdnode/_native*.so in place after editing native/*.c
#   make native-test      the native tests only
#   make native-sanitize  build with AddressSanitizer + UndefinedBehaviorSanitizer into
#                         build/native-sanitize/ and run the native tests against that build
#   make native-bench     benchmarks of docs/performance.md (JSON on stdout and in build/)

VENV ?= .venv
NATIVE_PYTHON ?= $(VENV)/bin/python

.PHONY: native native-test native-sanitize native-bench

native: install
	$(NATIVE_PYTHON) native/build_native.py

native-test: install
	$(NATIVE_PYTHON) -m pytest -q tests/test_native*.py

native-sanitize: install
	$(NATIVE_PYTHON) native/sanitize.py

native-bench: install
	mkdir -p build
	$(NATIVE_PYTHON) -m bench.native --out build/bench-native.json
