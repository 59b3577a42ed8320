"""Shared fixtures: real chunkd servers for the whole session (see chunkd_testing.py)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import pytest

from chunkd_testing import start_server

# Hypothesis (zarr's stateful store test) keeps its files under python/, not in the cwd.
try:
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(str(Path(__file__).resolve().parents[1] / ".hypothesis"))
except ImportError:  # pragma: no cover
    pass

DEFAULT_TEST_TIMEOUT_S = 300


def pytest_configure(config):
    # python/pyproject.toml sets asyncio_mode = "auto" (zarr's StoreTests needs it: its async
    # fixtures are plain pytest fixtures). When pytest runs from the repository root with other
    # paths beside python/tests, that file is not the inifile: apply the same mode here unless
    # the command line or an inifile chose one.
    if config.getoption("asyncio_mode", None) is None and config.getini("asyncio_mode") == "strict":
        config.option.asyncio_mode = "auto"


def pytest_collection_modifyitems(config, items):
    # A bound on every test here (pytest-timeout), whatever the inifile: a hung call fails its
    # test instead of the whole run. (This hook sees the whole session's items.)
    here = Path(__file__).resolve().parent
    for item in items:
        if item.get_closest_marker("timeout") is None and here in Path(item.path).parents:
            item.add_marker(pytest.mark.timeout(DEFAULT_TEST_TIMEOUT_S))


def _session_server(tmp_path_factory, name: str, store: str | None, *extra: str, listen=None):
    workdir = tmp_path_factory.mktemp(name)
    if store is None:
        store_dir = workdir / "store"
        store_dir.mkdir()
        store = str(store_dir)
    if listen is None:
        listen = "127.0.0.1:0"
    elif listen == "unix":
        listen = f"unix:{workdir / 'chunkd.sock'}"
    server = start_server(workdir, store, listen, *extra)
    yield server
    status = server.stop()
    assert status == 0, f"chunkd ({name}) exited with {status} on SIGTERM:\n{server.log()}"


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A file-backed server (a directory in Zarr's layout): ``server.store`` is the directory."""
    yield from _session_server(tmp_path_factory, "file-server", None)


@pytest.fixture(scope="session")
def memory_server(tmp_path_factory):
    """A server with the memory:// store."""
    yield from _session_server(tmp_path_factory, "memory-server", "memory://")


@pytest.fixture(scope="session")
def unix_server(tmp_path_factory):
    """A memory:// server listening on a Unix-domain socket (``server.address`` is unix:...)."""
    yield from _session_server(tmp_path_factory, "unix-server", "memory://", listen="unix")


@pytest.fixture
def prefix() -> str:
    """A key prefix no other test uses, so tests share the session servers without clearing."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(server):
    import chunkd

    with chunkd.Client(server.address) as c:
        yield c


@pytest.fixture
def memory_client(memory_server):
    import chunkd

    with chunkd.Client(memory_server.address) as c:
        yield c


@pytest.fixture(autouse=True)
def _no_event_loop_errors(caplog):
    """Fails a test during which asyncio logged an error (e.g. a gRPC poller callback failing
    on a closed descriptor): such errors never reach the test otherwise."""
    yield
    errors = [
        r for r in caplog.get_records("call") + caplog.get_records("teardown")
        if r.name == "asyncio" and r.levelno >= logging.ERROR
    ]
    assert not errors, "asyncio logged errors:\n" + "\n".join(r.getMessage() for r in errors)
