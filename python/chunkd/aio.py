"""The asyncio chunkd client: the same calls, semantics and errors as :class:`chunkd.Client`.

No thread per call: each call starts in the C++ client (``chunkd._native``), which completes
it on gRPC's own threads without taking the GIL. A completion is queued on the calling event
loop's :class:`_native.Completions`, whose eventfd the loop watches (``loop.add_reader``); the
eventfd is written only when that queue goes from empty to non-empty, and the loop's reader
drains every completion queued by then and sets the calls' futures. A cancelled call (a
cancelled task, ``asyncio.wait_for``) cancels the C++ call.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import AsyncIterator, Iterable
from typing import Any

from chunkd import _common as c
from chunkd import _cuda
from chunkd._common import _native
from chunkd.errors import ChunkdError

__all__ = ["AsyncClient"]

_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = weakref.WeakKeyDictionary()
_queues_lock = threading.Lock()


def _after_fork_in_child() -> None:
    # A lock held by another thread at the fork stays held in the child: take a fresh one.
    global _queues_lock
    _queues_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def completions(loop: asyncio.AbstractEventLoop) -> Any:
    """The completion queue of ``loop`` (made, and its eventfd watched, on first use)."""
    queue = _queues.get(loop)
    if queue is None:
        with _queues_lock:
            queue = _queues.get(loop)
            if queue is None:
                queue = _native.Completions()
                loop.add_reader(queue.fd, queue.drain)
                _queues[loop] = queue
    return queue


async def _wait(future: asyncio.Future, cancel: Any) -> Any:
    """A get's value: it arrives in a one-item list that is emptied here, so that nothing but
    the caller holds it (see chunkd_native.cc, Pending)."""
    try:
        box = await future
    except asyncio.CancelledError:
        cancel.cancel()
        raise
    return box.pop()


class AsyncClient(c.ClientBase):
    """An asyncio client of one chunkd server.

    One client serves any number of event loops and threads; calls may run concurrently on it
    (``asyncio.gather(*gets)``), over its connection.

    Arguments and errors: as :class:`chunkd.Client`. With ``delivery="shm"``, leases are
    released and renewed from a thread of the C++ client, never from the event loop.
    """

    async def close(self) -> None:
        """Closes the client; later calls raise RuntimeError. Idempotent."""
        self.close_blocking()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"chunkd.AsyncClient({self.address!r})"

    # -- calls ---------------------------------------------------------------------------------

    async def read(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        *,
        suffix: int | None = None,
        out: Any = None,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
        device: int | None = None,
    ) -> c.GetResult:
        """See :meth:`chunkd.Client.read`. ``device``: a CuPy device ordinal to ask for CUDA IPC
        delivery onto (a colocated server with a device tier); ``data`` is then a
        ``cupy.ndarray`` of uint8 in the server's GPU memory (no copy), else inline bytes."""
        result = await self._get(
            key, start, end, suffix, out, if_generation_match, if_generation_not_match, device,
            True,
        )
        if result.delivery == c.Delivery.CUDA_IPC:
            return c.GetResult(
                _cuda.as_cupy(result.data), result.total_size, result.generation,
                result.range_start, result.delivery,
            )
        return result

    async def get(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        *,
        suffix: int | None = None,
        out: Any = None,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
        device: int | None = None,
    ) -> Any:
        """See :meth:`chunkd.Client.get`."""
        if device is not None:
            return (
                await self.read(
                    key, start, end, suffix=suffix, out=out,
                    if_generation_match=if_generation_match,
                    if_generation_not_match=if_generation_not_match, device=device,
                )
            ).data
        return await self._get(
            key, start, end, suffix, out, if_generation_match, if_generation_not_match, None,
            False,
        )

    def _get(self, key, start, end, suffix, out, match, not_match, device, full):
        native = self._native_client()
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if device is not None and not _cuda.possible(device):
            device = None  # no CuPy or no such device here: inline
        cancel = native.get_async(
            completions(loop), future, key, start, end, suffix, out, match, not_match, device,
            full,
        )
        return _wait(future, cancel)

    async def read_many(self, items: Iterable[c.ItemLike]) -> list[c.GetResult | ChunkdError]:
        """See :meth:`chunkd.Client.read_many`: one result per item, an item's failure returned
        in its place. Inline or shared-memory delivery (CUDA IPC is for :meth:`read`)."""
        return await self._many(items, True)

    async def get_many(self, items: Iterable[c.ItemLike]) -> list[Any]:
        """See :meth:`chunkd.Client.get_many`."""
        return await self._many(items, False)

    async def _many(self, items: Iterable[c.ItemLike], full: bool) -> list[Any]:
        native = self._native_client()
        loop = asyncio.get_running_loop()
        results: list[Any] = []
        for group in c.batches(items):
            future = loop.create_future()
            cancel = native.get_many_async(completions(loop), future, group, full)
            results.extend(await _wait(future, cancel))
        return results

    def read_many_each(self, items: list[c.ItemLike], futures: list[asyncio.Future]) -> Any:
        """One GetMany call (at most 4096 items) whose items each complete their own future
        (made on the running loop) as soon as they have arrived, with a one-item list holding
        the item's GetResult (the waiter empties it), or with the exception a read of the item
        would raise (a failure of the whole call: each with its own key). Returns the call's
        canceller (``.cancel()``). Not a coroutine: call it on the loop's thread. For batchers
        such as chunkd.zarr.ChunkdStore's: each get resumes as its chunk arrives, while the
        later ones are on their way."""
        loop = asyncio.get_running_loop()
        return self._native_client().get_many_each_async(completions(loop), futures, items)

    def _call(self, start, *args) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        start(completions(loop), future, *args)
        return future

    async def put(
        self,
        key: str,
        data: Any,
        *,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
    ) -> c.PutResult:
        """See :meth:`chunkd.Client.put`."""
        native = self._native_client()
        return await self._call(
            native.put_async, key, data, if_generation_match, if_generation_not_match
        )

    async def put_derived(
        self,
        key: str,
        derivation: bytes,
        data: Any,
        *,
        source_generation: int,
        production_id: int = 0,
    ) -> None:
        """See :meth:`chunkd.Client.put_derived`."""
        native = self._native_client()
        await self._call(
            native.put_derived_async, key, derivation, data, source_generation, production_id,
            False
        )

    async def abandon_derived(self, key: str, derivation: bytes, production_id: int) -> None:
        """See :meth:`chunkd.Client.abandon_derived`."""
        native = self._native_client()
        await self._call(native.put_derived_async, key, derivation, None, 0, production_id, True)

    async def delete(
        self,
        key: str,
        *,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
    ) -> None:
        """See :meth:`chunkd.Client.delete`."""
        native = self._native_client()
        await self._call(native.delete_async, key, if_generation_match, if_generation_not_match)

    async def stat(self, key: str) -> c.Stat:
        """See :meth:`chunkd.Client.stat`."""
        return await self._call(self._native_client().stat_async, key)

    async def exists(self, key: str) -> bool:
        return (await self.stat(key)).exists

    async def iter_list(self, prefix: str = "", directory: bool = False) -> AsyncIterator[c.Listing]:
        """See :meth:`chunkd.Client.iter_list`."""
        for page in await self._call(self._native_client().list_pages_async, prefix, directory):
            yield page

    async def list(self, prefix: str = "", directory: bool = False) -> c.Listing:
        """See :meth:`chunkd.Client.list`."""
        return c.merge(
            await self._call(self._native_client().list_pages_async, prefix, directory)
        )

    async def server_info(self) -> c.ServerInfo:
        """See :meth:`chunkd.Client.server_info`."""
        return c.server_info(await self._call(self._native_client().server_info_async))

    # -- shared-memory leases ------------------------------------------------------------------

    async def flush_releases(self, timeout: float | None = 5.0) -> bool:
        """See :meth:`chunkd.Client.flush_releases`."""
        return await asyncio.to_thread(self.flush_releases_blocking)
