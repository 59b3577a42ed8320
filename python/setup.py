"""Build hook: generates the gRPC stubs (python/tools/gen_proto.py) before the package is built.

All metadata lives in pyproject.toml; this file only adds the generation step to build_py, so
`pip install ./python` and `pip install -e ./python` both produce chunkd/_proto/.
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _load_gen_proto():
    path = Path(__file__).resolve().parent / "tools" / "gen_proto.py"
    spec = importlib.util.spec_from_file_location("chunkd_gen_proto", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithStubs(build_py):
    def run(self):
        gen = _load_gen_proto()
        if gen.PROTO_DIR.is_dir():
            gen.generate()
        elif not gen.is_current():
            raise SystemExit(
                f"chunkd: {gen.PROTO_DIR} is missing and no generated stubs exist; build the "
                "package from a checkout of the chunkd repository"
            )
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
