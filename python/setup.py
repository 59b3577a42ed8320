"""Build hook: the native module chunkd._native (the C++ client core, python/native/) comes from
the repository's CMake build.

All metadata lives in pyproject.toml. This file adds one extension, built by CMake:

- ``pip install ./python`` (a wheel): configures the repository (python/..) with the server,
  the tests and the benchmarks off, builds the one target ``chunkd_native`` into the wheel. It
  needs what the repository's build needs: Debian 12's gRPC, protobuf and Abseil development
  packages, cmake and a C++20 compiler (``deploy/scripts/install-deps.sh build``), and
  python3-dev; nanobind comes from the build requirements.
- ``pip install -e ./python`` (deploy/scripts/setup-venv.sh): builds nothing. The repository's
  build (deploy/scripts/build.sh, which runs after it) writes the module into python/chunkd/,
  where the editable install finds it.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


class CMakeBuild(build_ext):
    def run(self):
        if getattr(self, "editable_mode", False) or self.inplace:
            # The repository's build writes chunkd/_native*.so next to the sources.
            return
        if not (REPO / "CMakeLists.txt").is_file() or not (REPO / "client").is_dir():
            raise SystemExit(
                "chunkd: the native module is built from the chunkd repository (python/ inside "
                f"a checkout); {REPO} is not one"
            )
        out_dir = Path(self.build_lib).resolve() / "chunkd"
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", "-S", str(REPO), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DCHUNKD_BUILD_SERVER=OFF", "-DCHUNKD_BUILD_TESTS=OFF", "-DCHUNKD_BUILD_BENCH=OFF",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCHUNKD_PYTHON_MODULE_DIR={out_dir}",
        ]  # fmt: skip
        jobs = str(os.cpu_count() or 1)
        subprocess.run(configure, check=True)
        subprocess.run(
            ["cmake", "--build", str(build_dir), "--target", "chunkd_native", "-j", jobs],
            check=True,
        )
        if not list(out_dir.glob("_native*.so")):
            raise SystemExit(
                "chunkd: the CMake build made no chunkd._native module (is python3-dev "
                "installed? see the configure output above)"
            )


setup(
    ext_modules=[Extension("chunkd._native", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
