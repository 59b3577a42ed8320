"""A Zarr v3 store (``zarr.abc.store.Store``, zarr 3.1) that keeps its keys in a chunkd server.

    import zarr, xarray
    from chunkd.zarr import ChunkdStore

    store = ChunkdStore("chunkd://127.0.0.1:7878/era5.zarr")
    zarr.create_array(store, shape=(1000, 1000), chunks=(100, 100), dtype="f4")
    ds = xarray.open_zarr(ChunkdStore("chunkd://127.0.0.1:7878/era5.zarr", read_only=True))

URL forms (see :mod:`chunkd._address`):

* ``chunkd://HOST:PORT`` — the server's whole key space is the store's root;
* ``chunkd://HOST:PORT/some/path`` — the store's keys live under ``some/path/`` on the server
  (a file-backed server stores them in ``<store dir>/some/path/``);
* ``chunkd+unix:///run/chunkd.sock`` — a Unix-domain socket (``path=`` names a sub-path);
* a plain address: ``HOST:PORT`` or ``unix:/run/chunkd.sock``.

``get_partial_values`` reads its whole batch in one GetMany call (per 4096 keys). ``get``
coalesces (``batch_gets=True``, the default): the gets an event loop issues in one iteration —
zarr reads the chunks of a selection from concurrent tasks, each calling ``get`` — go out
together as one GetMany call (at most ``_BATCH_MAX_ITEMS`` items; more start the next call), a
get issued alone as one Get, without waiting for a timer. See :class:`_GetBatcher`.

Values arrive inline (gRPC messages) by default. With ``delivery="shm"``, a store on the
server's host asks for shared-memory delivery: each chunk arrives as a handle and the zarr
``Buffer`` views the server's memory in place (no copy; a GPU prototype copies it to the
device), holding a lease until zarr drops the buffer. The conversion of
a reply to a zarr ``Buffer`` goes through :meth:`ChunkdStore._to_buffer`, keyed by the reply's
delivery.

Memory: the store asks the prototype what memory its buffers hold (an empty buffer of it: does
its array expose ``__cuda_array_interface__``?), never which zarr class it is, so any buffer
class that behaves like ``zarr.buffer.cpu.Buffer`` or ``zarr.buffer.gpu.Buffer`` works. Every
move between host and device is explicit and costs what it says:

* host prototype (``zarr.buffer.cpu.buffer_prototype``, the default): the received bytes are
  wrapped, not copied;
* device prototype (``zarr.buffer.gpu.buffer_prototype``): reads ask for CUDA IPC delivery onto
  CuPy's current device when CuPy and a device are present: a server on this host with a device
  tier (``chunkd --device_cache_bytes``) hands out the chunk in its GPU memory, which becomes
  the buffer without a copy, holding a lease while zarr holds it (see :mod:`chunkd._cuda`);
  other servers send the bytes inline and they are copied to the device once (one
  host-to-device copy per chunk). A device prototype without CuPy raises a RuntimeError that
  says so;
* writes of device buffers copy the value to the host once (one device-to-host copy), then
  send it; host buffers are sent from their own memory.

The store is picklable (it reconnects in the process that unpickles it), so it works with
``multiprocessing`` (spawn) and dask; a store inherited by a forked process (a DataLoader's
worker, a ``fork`` pool) works there too, its clients relaying their calls through a helper
process (:mod:`chunkd._relay`). zarr's ``zarr.open("chunkd://...")`` takes the URL instead,
through :mod:`chunkd.fsspec` and zarr's ``FsspecStore`` (slower: see docs/python.md). It holds two clients of the C++ core (``chunkd._native``):
an :class:`chunkd.AsyncClient` for every event loop that uses it (calls complete through each
loop's own completion queue) and a :class:`chunkd.Client` for the ``*_sync`` methods.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, Self

from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.abc.buffer import Buffer
from zarr.buffer import default_buffer_prototype
from zarr import config as zarr_config
from zarr.registry import register_pipeline

from chunkd import _common as c
from chunkd import _cuda
from chunkd._address import DEFAULT_ADDRESS, parse_url, url_of
from chunkd._security import Security
from chunkd.aio import AsyncClient
from chunkd.client import Client
from chunkd.errors import ChunkdError, NotFoundError, PreconditionFailed

if TYPE_CHECKING:
    from zarr.abc.buffer import BufferPrototype

__all__ = ["ChunkdStore", "NodeCodecPipeline", "enable_node_decoding"]

# Deletes in flight at once in delete_dir / clear.
_DELETE_CONCURRENCY = 64
# The most gets one GetMany call of the batcher carries; a batch this full goes out as is and
# later gets of the same loop iteration start the next one. (The server takes up to 4096: 256
# keeps a call's reply, and the wait for its last item, bounded while amortising the call.)
_BATCH_MAX_ITEMS = 256


def _normalize_path(path: str) -> str:
    path = path.strip("/")
    if not path:
        return ""
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"ChunkdStore path {path!r} has an empty, '.' or '..' segment")
    return path


def _range_kwargs(byte_range: ByteRequest | None) -> dict[str, int]:
    if byte_range is None:
        return {}
    if isinstance(byte_range, RangeByteRequest):
        return {"start": byte_range.start, "end": byte_range.end}
    if isinstance(byte_range, OffsetByteRequest):
        return {"start": byte_range.offset}
    if isinstance(byte_range, SuffixByteRequest):
        return {"suffix": byte_range.suffix}
    raise TypeError(f"Unexpected byte_range, got {byte_range}.")


def _host_to_buffer(result: c.GetResult, prototype: BufferPrototype) -> Buffer:
    # result.data: a memoryview of the buffer the C++ client received the bytes into (inline,
    # writable) or of the server's shared memory (read-only, holding the lease). A CPU buffer
    # wraps it without a copy (numpy.frombuffer), and it and every view zarr makes of it keep
    # that memory (and the lease) alive; a GPU buffer copies it to the device.
    return prototype.buffer.from_bytes(result.data)


def _cuda_to_buffer(result: c.GetResult, prototype: BufferPrototype) -> Buffer:
    # result.data: a cupy.ndarray over the server's GPU memory (CUDA IPC); wrapped, not copied.
    return prototype.buffer.from_array_like(result.data)


def _for_key(error: BaseException, key: str) -> BaseException:
    """The exception a lone get raises when its call failed as a whole: a ChunkdError of the
    same class and code naming the get's key, as the call of its own would have raised."""
    if isinstance(error, ChunkdError):
        return type(error)(error.details, code=error.code, key=key)
    return error


class _GetBatch:
    """The gets of one GetMany call: (key, range kwargs) items and the futures awaiting them."""

    __slots__ = ("items", "futures", "live", "cancel")

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, int]]] = []
        self.futures: list[asyncio.Future] = []
        self.live: list[asyncio.Future] = []  # the futures still awaited when the call went out
        self.cancel: Any = None  # the call's canceller once it went out

    def waiter_done(self, future: asyncio.Future) -> None:
        # A get cancelled while its call is in flight: when no get of the call is still
        # waiting, the call itself is cancelled (its reply has nobody to go to).
        if future.cancelled() and self.live and all(f.done() for f in self.live):
            if self.cancel is not None:
                self.cancel.cancel()


class _GetBatcher:
    """Coalesces the gets one event loop issues in one iteration into GetMany calls.

    ``get`` appends its item to the open batch and awaits a future. The first item of a batch
    schedules the batch's sending with ``loop.call_soon``, which runs on the loop's next
    iteration, after every task that was ready in this one has run (zarr's reads of a selection
    wake together): it closes the batch and sends it, as one Get when it holds one item (a lone
    get costs one call and no timer) and as one GetMany otherwise. A batch closes early at
    ``_BATCH_MAX_ITEMS``. The GetMany hands each item to its get as soon as that item has
    arrived (items come in order), so zarr decodes the first chunks while the later ones are
    still on their way. Results are those of the per-key path: a ``GetResult``, None for a
    missing key, an item's error raised by its own get only; a failure of the whole call
    (UNAVAILABLE after the retries) raises from every get still waiting, with its key. A
    cancelled get leaves the batch; a call none of whose gets still waits is cancelled.

    One batcher per event loop (futures belong to their loop).
    """

    def __init__(self, store: ChunkdStore) -> None:
        self._store = store
        self._open: _GetBatch | None = None
        self._tasks: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks

    async def get(self, key: str, kwargs: dict[str, int]) -> c.GetResult | None:
        # The checks the per-key path makes before sending (key type, range form): they raise
        # here, from this get alone, and keep the batch's request valid.
        c.check_item(key, kwargs.get("start"), kwargs.get("end"), kwargs.get("suffix"))
        loop = asyncio.get_running_loop()
        batch = self._open
        if batch is None:
            batch = self._open = _GetBatch()
            loop.call_soon(self._send, batch)
        future = loop.create_future()
        future.add_done_callback(batch.waiter_done)
        batch.items.append((key, kwargs))
        batch.futures.append(future)
        if len(batch.items) >= _BATCH_MAX_ITEMS:
            self._open = None
        try:
            result = await future
        except NotFoundError:
            return None
        return result.pop()  # the value came in a one-item list (see chunkd.aio._wait)

    def _send(self, batch: _GetBatch) -> None:
        if self._open is batch:
            self._open = None
        live = [(i, f) for i, f in zip(batch.items, batch.futures, strict=True) if not f.done()]
        batch.items, batch.futures = [], []
        batch.live = [f for _, f in live]
        if not live:
            return
        try:
            client = self._store._aio()
            if len(live) == 1:
                (key, kwargs), future = live[0]
                loop = asyncio.get_running_loop()
                task = loop.create_task(self._send_one(client, key, kwargs, future))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                batch.cancel = task
                return
            items = [c.GetItem(key, **kwargs) for (key, kwargs), _ in live]
            batch.cancel = client.read_many_each(items, [f for _, f in live])
        except Exception as e:  # noqa: BLE001 - the call could not start: every get raises it
            for (key, _), future in live:
                if not future.done():
                    future.set_exception(_for_key(e, key))

    @staticmethod
    async def _send_one(client: AsyncClient, key: str, kwargs: dict[str, int], future) -> None:
        try:
            result = await client.read(key, **kwargs)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the get
            if not future.done():
                future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        if not future.done():
            future.set_result([result])


# Whether each buffer class (a prototype's ``buffer``) holds device memory, asked once.
_DEVICE_MEMORY: dict[type, bool] = {}


def _holds_device_memory(buffer_class: type) -> bool:
    """Asks the buffer class what memory it holds: an empty buffer of it, and whether its
    array exposes ``__cuda_array_interface__`` (device) or not (host)."""
    device = _DEVICE_MEMORY.get(buffer_class)
    if device is None:
        try:
            probe = buffer_class.create_zero_length().as_array_like()
        except Exception as e:
            name = f"{buffer_class.__module__}.{buffer_class.__qualname__}"
            raise RuntimeError(
                f"chunkd: cannot make a buffer of the prototype's {name} to read into ({e}); "
                "a GPU prototype (zarr.buffer.gpu.buffer_prototype) needs CuPy and a CUDA "
                "device in this process"
            ) from e
        device = hasattr(probe, "__cuda_array_interface__")
        _DEVICE_MEMORY[buffer_class] = device
    return device


def _gpu_device(prototype: BufferPrototype) -> int | None:
    """CuPy's current device when `prototype` makes device buffers and CUDA IPC delivery is
    possible; None for host prototypes and where the bytes must come inline (then copied)."""
    if not _holds_device_memory(prototype.buffer):
        return None
    return _cuda.current_device()


class ChunkdStore(Store):
    """A Zarr store whose keys and values live in a chunkd server.

    Args:
        url: ``chunkd://HOST:PORT[/path]``, ``chunkd+unix:///socket``, ``HOST:PORT`` or
            ``unix:/socket``. Default ``127.0.0.1:7878``.
        read_only: refuse set and delete (zarr's ``ValueError``), without asking the server.
        path: a key prefix inside the server (joined after the URL's own path).
        timeout: seconds each attempt of a call may take (None: no deadline).
        retries: retries of idempotent calls after UNAVAILABLE.
        delivery: ``"inline"`` (default) or ``"shm"``: ask for shared-memory delivery, so that
            a store on the server's host reads chunks in place (read-only buffers, each with a
            lease on the server while zarr holds it); inline where the server cannot share
            memory with this process. Needs numpy.
        shm_dir: this process's path of the server's ``--shm_dir`` (default ``/dev/shm``).
        tls_ca, tls, tls_cert, tls_key, tls_server_name, token: TLS and the bearer token, as
            :class:`chunkd.Client` takes them (token defaults to ``$CHUNKD_TOKEN``). A pickled
            store carries the certificates and the token it was made with.
        batch_gets: coalesce concurrent ``get`` calls (default True): the gets issued in one
            iteration of an event loop (zarr's concurrent chunk reads) go out as one GetMany
            call of up to 256 items instead of one Get each; a get issued alone is still one
            Get and waits for nothing. Results and errors are those of one Get per key (a
            missing key is None; an item's error raises from its own get only). GPU
            prototypes (CUDA IPC) always read per key. False: one Get per ``get``.
        max_staleness: seconds: a cached chunk is served only if the server's store confirmed
            it at most this long ago (0: validate every read). None (default): the server's
            policy (a file store checks every read; s3/http after ``--revalidate_after``, Zarr
            metadata every read).
        decoded_cache: decoded chunks shared by every process of the node (the server's
            derived entries, read by :class:`NodeCodecPipeline`). True: turns the node
            pipeline on (:func:`enable_node_decoding`: zarr's ``codec_pipeline.path``) in this
            process when the store is made, and in every process that unpickles it (dask
            workers, spawned pools). None (default): read decoded through the server whenever
            the node pipeline is on. False: this store is read by zarr's own pipeline even
            then. See docs/python.md, "Decoded once per node".
    """

    supports_writes: bool = True
    supports_deletes: bool = True
    supports_listing: bool = True

    # How a reply's delivery becomes a zarr Buffer of the requested prototype.
    _BUFFER_FROM_DELIVERY = {
        c.Delivery.UNSPECIFIED: _host_to_buffer,
        c.Delivery.INLINE: _host_to_buffer,
        c.Delivery.SHM: _host_to_buffer,
        c.Delivery.CUDA_IPC: _cuda_to_buffer,
    }

    def __init__(
        self,
        url: str = DEFAULT_ADDRESS,
        *,
        read_only: bool = False,
        path: str = "",
        timeout: float | None = c.DEFAULT_TIMEOUT,
        retries: int = c.DEFAULT_RETRIES,
        delivery: str = "inline",
        shm_dir: str = c.DEFAULT_SHM_DIR,
        tls_ca: str | bytes | None = None,
        tls: bool = False,
        tls_cert: str | bytes | None = None,
        tls_key: str | bytes | None = None,
        tls_server_name: str | None = None,
        token: str | None = None,
        batch_gets: bool = True,
        max_staleness: float | None = None,
        decoded_cache: bool | None = None,
    ) -> None:
        super().__init__(read_only=read_only)
        self.decoded_cache = None if decoded_cache is None else bool(decoded_cache)
        if self.decoded_cache:
            enable_node_decoding()
        # Whether the server keeps derived entries (asked once, by NodeCodecPipeline).
        self._derived: bool | None = None
        # The clients' TLS and token arguments, files read once (chunkd._security).
        self._security_args = Security.create(
            tls_ca=tls_ca,
            tls=tls,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
            token=token,
        ).arguments()
        target, url_path = parse_url(url)
        self.target = target
        self.path = _normalize_path("/".join(p for p in (url_path, path) if p))
        self.timeout = timeout
        self.retries = int(retries)
        self.delivery = c.check_delivery(delivery)
        self.shm_dir = shm_dir
        self.max_staleness = max_staleness
        self._root = f"{self.path}/" if self.path else ""
        self._lock = threading.Lock()
        # Made on first use: one AsyncClient serves every event loop (each loop has its own
        # completion queue, chunkd.aio), a Client the *_sync methods.
        self._aio_client: AsyncClient | None = None
        self._sync_client: Client | None = None
        self.batch_gets = bool(batch_gets)
        self._batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _GetBatcher] = (
            weakref.WeakKeyDictionary()
        )

    # -- identity --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The store's URL (the path is included for TCP addresses)."""
        base = url_of(self.target)
        if self.path and base.startswith("chunkd://"):
            return f"{base}/{self.path}"
        return base

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        if self.path and not self.url.endswith(self.path):
            return f"ChunkdStore({self.url!r}, path={self.path!r})"
        return f"ChunkdStore({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ChunkdStore)
            and self.target == other.target
            and self.path == other.path
            and self.read_only == other.read_only
        )

    def __hash__(self) -> int:
        return hash((ChunkdStore, self.target, self.path, self.read_only))

    def _options(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "timeout": self.timeout,
            "retries": self.retries,
            "delivery": self.delivery,
            "shm_dir": self.shm_dir,
            "batch_gets": self.batch_gets,
            "max_staleness": self.max_staleness,
            "decoded_cache": self.decoded_cache,
            **self._security_args,
        }

    def with_read_only(self, read_only: bool = False) -> Self:
        # docstring inherited
        return type(self)(url_of(self.target), read_only=read_only, **self._options())

    def __getstate__(self) -> dict[str, Any]:
        return {"target": self.target, "read_only": self.read_only, **self._options()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A fresh, unopened store with its own channels: gRPC channels do not cross processes.
        target = state.pop("target")
        self.__init__(url_of(target), **state)

    # -- connections -----------------------------------------------------------------------------

    def _client_kwargs(self) -> dict[str, Any]:
        return {
            "timeout": self.timeout,
            "retries": self.retries,
            "delivery": self.delivery,
            "shm_dir": self.shm_dir,
            "max_staleness": self.max_staleness,
            **self._security_args,
        }

    def _aio(self) -> AsyncClient:
        """The store's asyncio client (made on first use; it serves every event loop)."""
        client = self._aio_client
        if client is None:
            with self._lock:
                if self._aio_client is None:
                    self._aio_client = AsyncClient(self.target, **self._client_kwargs())
                client = self._aio_client
        return client

    def _batcher(self) -> _GetBatcher:
        """The get batcher of the running event loop (created on first use in that loop)."""
        loop = asyncio.get_running_loop()
        batcher = self._batchers.get(loop)
        if batcher is None:
            with self._lock:
                batcher = self._batchers.get(loop)
                if batcher is None:
                    for old in [old for old in self._batchers if old.is_closed()]:
                        del self._batchers[old]
                    batcher = self._batchers[loop] = _GetBatcher(self)
        return batcher

    def _sync(self) -> Client:
        client = self._sync_client
        if client is None:
            with self._lock:
                if self._sync_client is None:
                    self._sync_client = Client(self.target, **self._client_kwargs())
                client = self._sync_client
        return client

    def close(self) -> None:
        """Closes the store's clients (new ones are made if the store is used again)."""
        super().close()
        with self._lock:
            clients = [self._aio_client, self._sync_client]
            self._aio_client = self._sync_client = None
        for client in clients:
            if client is not None:
                client.close_blocking()

    def flush_releases(self, timeout: float | None = 5.0) -> bool:
        """Returns the leases of shared-memory buffers zarr has dropped so far to the server
        now and waits for its answer (they otherwise go in batches within milliseconds); False
        if a release call failed. Blocking; nothing to do with ``delivery="inline"``."""
        with self._lock:
            clients = [self._aio_client, self._sync_client]
        return all([client.flush_releases_blocking() for client in clients if client is not None])

    async def _derived_supported(self) -> bool:
        """Whether the server keeps derived entries (its ServerInfo features name them); asked
        once per store. A server that cannot be asked is read by zarr's pipeline this time."""
        if self._derived is None:
            await self._ensure_open()
            try:
                info = await self._aio().server_info()
            except ChunkdError:
                return False
            self._derived = any(f.startswith("derived") for f in info.features)
        return self._derived

    def _key(self, key: str) -> str:
        if not isinstance(key, str):
            raise TypeError(f"key must be a str, got {type(key).__name__}")
        return self._root + key

    # -- reads -----------------------------------------------------------------------------------

    def _to_buffer(self, result: c.GetResult, prototype: BufferPrototype) -> Buffer:
        return self._BUFFER_FROM_DELIVERY[result.delivery](result, prototype)

    async def get(
        self,
        key: str,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        # docstring inherited
        if prototype is None:
            prototype = default_buffer_prototype()
        await self._ensure_open()
        kwargs = _range_kwargs(byte_range)
        try:
            device = _gpu_device(prototype)
            if device is not None:
                kwargs["device"] = device
            elif self.batch_gets:
                # Coalesced with the gets of the same loop iteration (see _GetBatcher).
                batched = await self._batcher().get(self._key(key), kwargs)
                if batched is None:
                    return None
                return self._to_buffer(batched, prototype)
            result = await self._aio().read(self._key(key), **kwargs)
        except NotFoundError:
            return None
        return self._to_buffer(result, prototype)

    async def get_partial_values(
        self,
        prototype: BufferPrototype,
        key_ranges: Iterable[tuple[str, ByteRequest | None]],
    ) -> list[Buffer | None]:
        # docstring inherited: one GetMany call for the batch (per 4096 keys); a missing key is
        # None, any other item's error raises, as get() would.
        key_ranges = list(key_ranges)
        if not key_ranges:
            return []
        if _gpu_device(prototype) is not None:
            # CUDA IPC is Get's alone: each read asks for it, all in flight over one channel.
            return list(
                await asyncio.gather(*(self.get(key, prototype, rng) for key, rng in key_ranges))
            )
        await self._ensure_open()
        items = [c.GetItem(self._key(key), **_range_kwargs(rng)) for key, rng in key_ranges]
        buffers: list[Buffer | None] = []
        for result in await self._aio().read_many(items):
            if isinstance(result, NotFoundError):
                buffers.append(None)
            elif isinstance(result, Exception):
                raise result
            else:
                buffers.append(self._to_buffer(result, prototype))
        return buffers

    async def _get_many(self, requests):  # type: ignore[override]
        requests = list(requests)
        results = await asyncio.gather(*(self.get(*request) for request in requests))
        for request, result in zip(requests, results, strict=True):
            yield request[0], result

    async def exists(self, key: str) -> bool:
        # docstring inherited
        await self._ensure_open()
        return (await self._aio().stat(self._key(key))).exists

    async def getsize(self, key: str) -> int:
        # docstring inherited: from Stat, without reading the value.
        await self._ensure_open()
        stat = await self._aio().stat(self._key(key))
        if not stat.exists:
            raise NotFoundError(f"key {key!r} not found", key=key)
        return stat.size

    async def getsize_prefix(self, prefix: str) -> int:
        # docstring inherited: one listing carries every size.
        await self._ensure_open()
        total = 0
        async for page in self._aio().iter_list(self._root + prefix):
            total += sum(entry.size for entry in page.entries)
        return total

    # -- writes ----------------------------------------------------------------------------------

    @staticmethod
    def _value_view(key: str, value: Buffer) -> Any:
        if not isinstance(value, Buffer):
            raise TypeError(
                f"ChunkdStore.set(): `value` must be a Buffer instance. Got an instance of "
                f"{type(value)} instead."
            )
        array = value.as_array_like()
        if hasattr(array, "__cuda_array_interface__"):
            # A device buffer: one explicit device-to-host copy (the wire carries host bytes).
            return value.as_numpy_array()
        # A host buffer: sent from its own memory, without a copy.
        return array

    async def set(self, key: str, value: Buffer) -> None:
        # docstring inherited
        self._check_writable()
        await self._ensure_open()
        await self._aio().put(self._key(key), self._value_view(key, value))

    async def set_if_not_exists(self, key: str, value: Buffer) -> None:
        # docstring inherited: atomic on the server (if_generation_match=0: "only if absent").
        self._check_writable()
        await self._ensure_open()
        try:
            await self._aio().put(
                self._key(key), self._value_view(key, value), if_generation_match=0
            )
        except PreconditionFailed:
            pass

    async def delete(self, key: str) -> None:
        # docstring inherited: a missing key is not an error.
        self._check_writable()
        await self._ensure_open()
        try:
            await self._aio().delete(self._key(key))
        except NotFoundError:
            pass

    async def delete_dir(self, prefix: str) -> None:
        # docstring inherited
        self._check_writable()
        await self._ensure_open()
        prefix = prefix.strip("/")
        keys = [key async for key in self.list_prefix(f"{prefix}/" if prefix else "")]
        semaphore = asyncio.Semaphore(_DELETE_CONCURRENCY)

        async def delete_one(key: str) -> None:
            async with semaphore:
                await self.delete(key)

        await asyncio.gather(*(delete_one(key) for key in keys))

    # -- listings --------------------------------------------------------------------------------

    async def list(self) -> AsyncIterator[str]:
        # docstring inherited
        async for key in self.list_prefix(""):
            yield key

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited
        await self._ensure_open()
        strip = len(self._root)
        async for page in self._aio().iter_list(self._root + prefix):
            for entry in page.entries:
                yield entry.key[strip:]

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        # docstring inherited: names relative to prefix; sub-folders without their '/'.
        await self._ensure_open()
        prefix = prefix.strip("/")
        full = self._root + (f"{prefix}/" if prefix else "")
        strip = len(full)
        # A memory:// server can hold a key and a "folder" of the same name ("a" and "a/b"):
        # zarr wants each name once.
        seen: set[str] = set()
        async for page in self._aio().iter_list(full, directory=True):
            names = [e.key[strip:] for e in page.entries]
            names += [p[strip:].rstrip("/") for p in page.prefixes]
            for name in names:
                if name not in seen:
                    seen.add(name)
                    yield name

    # -- synchronous methods (zarr's SupportsSyncStore protocol) ----------------------------------

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        if prototype is None:
            prototype = default_buffer_prototype()
        self._is_open = True
        kwargs = _range_kwargs(byte_range)
        try:
            result = self._sync().read(self._key(key), **kwargs)
        except NotFoundError:
            return None
        return self._to_buffer(result, prototype)

    def set_sync(self, key: str, value: Buffer) -> None:
        self._check_writable()
        self._is_open = True
        self._sync().put(self._key(key), self._value_view(key, value))

    def delete_sync(self, key: str) -> None:
        self._check_writable()
        self._is_open = True
        try:
            self._sync().delete(self._key(key))
        except NotFoundError:
            pass


# -- decoded once per node (chunkd.node_pipeline) -------------------------------------------------

from chunkd.node_pipeline import PIPELINE_PATH, NodeCodecPipeline  # noqa: E402

# Its public name (zarr's ``codec_pipeline.path`` and pickles name it so): chunkd.zarr's.
NodeCodecPipeline.__module__ = __name__
register_pipeline(NodeCodecPipeline)
assert f"{__name__}.NodeCodecPipeline" == PIPELINE_PATH


def enable_node_decoding() -> None:
    """Turns :class:`NodeCodecPipeline` on in this process: zarr's ``codec_pipeline.path``
    setting, the one line ``zarr.config.set({"codec_pipeline.path":
    "chunkd.zarr.NodeCodecPipeline"})``. Arrays opened afterwards read their ChunkdStore
    chunks decoded through the server; other stores, and writes, are zarr's pipeline's."""
    zarr_config.set({"codec_pipeline.path": PIPELINE_PATH})
