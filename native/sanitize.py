"""Build qkdnode._native with AddressSanitizer and UndefinedBehaviorSanitizer and run the native
tests against that build (``make native-sanitize``).

The sanitized module is built into build/native-sanitize/, never over the package's own
qkdnode/_native*.so, and the tests get it by placing it in ``sys.modules`` before they import
qkdnode.native. The Python interpreter is not instrumented, so the ASan runtime has to be loaded
first, with LD_PRELOAD: this script re-runs itself that way. Needs gcc (the Debian gcc package
brings libasan and libubsan); any extra arguments go to pytest.
"""

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = ROOT / "build" / "native-sanitize"
TESTS = sorted(str(path.relative_to(ROOT)) for path in (ROOT / "tests").glob("test_native*.py"))

SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g"]
ENV = {
    # The interpreter keeps its objects until exit; only errors in our code are of interest.
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:strict_string_checks=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    # Python's own allocator packs small objects into arenas without red zones; through malloc
    # every bytes object the tests pass to C gets ASan's guard bytes around it.
    "PYTHONMALLOC": "malloc",
}


def compiler() -> str:
    return (sysconfig.get_config_var("CC") or "cc").split()[0]


def runtime_library() -> str:
    """Path of the ASan runtime of the compiler that builds extensions (gcc: libasan.so)."""
    path = subprocess.run(
        [compiler(), "-print-file-name=libasan.so"], check=True, capture_output=True, text=True
    ).stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        sys.exit(f"sanitize: {compiler()} has no libasan.so (on Debian it comes with gcc); got {path!r}")
    return os.path.realpath(path)


def build() -> Path:
    sys.path.insert(0, str(HERE))
    from build_native import compile_to

    BUILD.mkdir(parents=True, exist_ok=True)
    return compile_to(BUILD, extra_compile_args=SANITIZE, extra_link_args=SANITIZE[:1])


def run_tests(module_path: str, pytest_args: list[str]) -> int:
    """In the re-run process: load the sanitized module as qkdnode._native, then run pytest."""
    spec = importlib.util.spec_from_file_location("qkdnode._native", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["qkdnode._native"] = module
    import pytest

    import qkdnode.native

    assert qkdnode.native.lib is module.lib, "qkdnode.native did not pick up the sanitized build"
    print(f"sanitize: testing {module_path}", flush=True)
    return pytest.main(["-q", "-p", "no:cacheprovider", *TESTS, *pytest_args])


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--run":
        return run_tests(sys.argv[2], sys.argv[3:])
    built = build()
    env = dict(os.environ, **ENV)
    env["LD_PRELOAD"] = " ".join(filter(None, [runtime_library(), os.environ.get("LD_PRELOAD")]))
    return subprocess.call([sys.executable, __file__, "--run", str(built), *sys.argv[1:]], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main())
