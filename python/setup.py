"""Build hook: the native module chunkd._native (the C++ client core, python/native/) and the
``chunkd`` and ``chunkctl`` binaries come from the repository's CMake build.

All metadata lives in pyproject.toml. This file adds one extension, built by CMake:

- ``pip install ./python`` (a wheel): configures the repository (python/..) into build-pip/
  with the tests and the benchmarks off, and builds three targets: ``chunkd_native`` into the
  wheel's chunkd/, the server ``chunkd`` and the CLI ``chunkctl`` into chunkd/bin/
  (``chunkd.Server``, ``python -m chunkd`` and the console scripts run them), stripped of debug
  info. It needs what the repository's build needs: Debian 12's gRPC, protobuf and Abseil
  development packages, cmake and a C++20 compiler, and python3-dev
  (``deploy/scripts/install-deps.sh python`` installs them); nanobind comes from the build
  requirements. With ccache the compiler runs through it, with CCACHE_BASEDIR at the
  repository root and CCACHE_NOHASHDIR, as deploy/scripts/build.sh does: build-pip/ sits at
  build/'s depth with its build type, so what either compiled is a cache hit for the other,
  except the native module's own files (their include paths name pip's temporary build
  environment). CHUNKD_PIP_BUILD_JOBS caps the jobs (default: the cores; each gRPC file takes
  about 1 GiB of memory).
- ``pip install -e ./python`` (deploy/scripts/setup-venv.sh): builds nothing. The repository's
  build (deploy/scripts/build.sh, which runs after it) writes the module into python/chunkd/,
  where the editable install finds it; chunkd.Server finds build/server/chunkd.
"""

import os
import shutil
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
        # build-pip/ beside build/ (same depth, same build type): with ccache's base_dir the
        # compile commands match deploy/scripts/build.sh's, so its objects are cache hits here;
        # and a second pip install finds this build where the first left it.
        build_dir = REPO / "build-pip"
        build_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        configure = [
            "cmake", "-S", str(REPO), "-B", str(build_dir),
            "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
            "-DCHUNKD_BUILD_SERVER=ON", "-DCHUNKD_BUILD_TESTS=OFF", "-DCHUNKD_BUILD_BENCH=OFF",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCHUNKD_PYTHON_MODULE_DIR={out_dir}",
        ]  # fmt: skip
        if shutil.which("ninja") and not (build_dir / "CMakeCache.txt").is_file():
            configure += ["-G", "Ninja"]
        if shutil.which("ccache"):
            # As deploy/scripts/build.sh: paths under the repository hash relative to it, so
            # this build, the repository's own and other clones share compiled files.
            configure += [
                "-DCMAKE_CXX_COMPILER_LAUNCHER=ccache", "-DCMAKE_C_COMPILER_LAUNCHER=ccache"
            ]  # fmt: skip
            env.setdefault("CCACHE_BASEDIR", str(REPO))
            env.setdefault("CCACHE_NOHASHDIR", "1")
        jobs = os.environ.get("CHUNKD_PIP_BUILD_JOBS") or str(os.cpu_count() or 1)
        subprocess.run(configure, check=True, env=env)
        subprocess.run(
            ["cmake", "--build", str(build_dir), "-j", jobs,
             "--target", "chunkd_native", "chunkd", "chunkctl"],
            check=True, env=env,
        )  # fmt: skip
        if not list(out_dir.glob("_native*.so")):
            raise SystemExit(
                "chunkd: the CMake build made no chunkd._native module (is python3-dev "
                "installed? see the configure output above)"
            )
        bin_dir = out_dir / "bin"
        bin_dir.mkdir(exist_ok=True)
        shipped = list(out_dir.glob("_native*.so"))
        for built in (build_dir / "server" / "chunkd", build_dir / "client" / "chunkctl"):
            shutil.copy2(built, bin_dir / built.name)
            shipped.append(bin_dir / built.name)
        if shutil.which("strip"):
            # The wheel carries no debug info (the build keeps it, for ccache's sake).
            subprocess.run(["strip", "--strip-debug", *map(str, shipped)], check=True)


setup(
    ext_modules=[Extension("chunkd._native", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
