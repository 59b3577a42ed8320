"""chunkd uses zarr's public API only: the buffer modules zarr 3.1 made public
(``zarr.buffer.cpu``, ``zarr.buffer.gpu``, ``zarr.abc.buffer``), never ``zarr.core``, which zarr
calls internal, in the package, its benchmarks and the READMEs' code."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PYTHON = Path(__file__).resolve().parents[1]
REPO = PYTHON.parent


def _internal_zarr_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found += [f"line {node.lineno}: {n}" for n in names if n.startswith("zarr.core")]
    return found


# The one exception: a codec pipeline (zarr's ``codec_pipeline.path`` setting) is zarr's
# internal interface by nature: chunkd.zarr.NodeCodecPipeline extends zarr's own pipeline class
# and indexes shards with zarr's indexer, the modules zarr has no public name for. Only these.
ALLOWED_INTERNAL = {
    "chunkd/node_pipeline.py": {
        "zarr.core.codec_pipeline",
        "zarr.core.chunk_grids",
        "zarr.core.indexing",
        "zarr.core.array_spec",  # annotations only
    },
}


@pytest.mark.parametrize(
    "path",
    sorted((PYTHON / "chunkd").glob("*.py")) + sorted((PYTHON / "benchmarks").glob("*.py")),
    ids=lambda p: str(p.relative_to(PYTHON)),
)
def test_no_zarr_core_imports(path):
    source = path.read_text()
    allowed = ALLOWED_INTERNAL.get(str(path.relative_to(PYTHON)))
    if allowed is not None:
        found = [f for f in _internal_zarr_imports(source) if f.split(": ")[1] not in allowed]
        assert found == []
        return
    assert _internal_zarr_imports(source) == []
    assert "zarr.core" not in source, "zarr.core named (a docstring or an attribute path)"


def test_detector_catches_internal_imports():
    assert _internal_zarr_imports("from zarr.core.buffer import cpu\nimport zarr.core.sync\n") == [
        "line 1: zarr.core.buffer",
        "line 2: zarr.core.sync",
    ]
    assert _internal_zarr_imports("from zarr.buffer import cpu, gpu\n") == []


@pytest.mark.parametrize(
    "readme",
    ["README.md", "python/README.md"]
    + sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")),
)
def test_readme_code_uses_the_public_modules(readme):
    text = (REPO / readme).read_text()
    assert not re.search(r"zarr\.core\.buffer", text), f"{readme} names zarr.core.buffer"


def test_store_asks_the_prototype_for_its_memory():
    """The memory kind comes from the buffers a prototype makes, not from zarr's classes: a
    host buffer class of zarr's is host memory, and a buffer class of anyone's whose arrays
    expose __cuda_array_interface__ counts as device memory."""
    import numpy as np
    from zarr.buffer import cpu

    from chunkd import zarr as chunkd_zarr

    assert not chunkd_zarr._holds_device_memory(cpu.Buffer)

    class FakeDeviceArray(np.ndarray):
        @property
        def __cuda_array_interface__(self):  # what a device array exposes
            return {}

    class DeviceLike(cpu.Buffer):
        def as_array_like(self):
            return self._data.view(FakeDeviceArray)

    assert chunkd_zarr._holds_device_memory(DeviceLike)

    class Broken(cpu.Buffer):
        @classmethod
        def create_zero_length(cls):
            raise ImportError("Cannot use zarr.buffer.gpu.Buffer without cupy")

    with pytest.raises(RuntimeError, match="needs CuPy"):
        chunkd_zarr._holds_device_memory(Broken)
