"""The asyncio chunkd client: the same calls, semantics and errors as :class:`chunkd.Client`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc
import grpc.aio

from chunkd import _common as c
from chunkd import _cuda, _shm
from chunkd._stubs import pb, pb_grpc
from chunkd.errors import ChunkdError, error_from_rpc

__all__ = ["AsyncClient"]

_aio_runtime_pinned = False


def _pin_aio_runtime() -> None:
    """Keeps gRPC's asyncio runtime initialised for the life of the process.

    gRPC reference-counts its asyncio runtime by live channels and tears it down (closing the
    socket its poller wakes every bound event loop through) when the count drops to zero. With
    channels in several loops on several threads (zarr runs its own loop in a thread; the
    caller has another), a teardown triggered from one thread races a callback already queued
    in another loop: "OSError: [Errno 9] Bad file descriptor" in
    PollerCompletionQueue._handle_events. Holding one reference of our own avoids the teardown.
    """
    global _aio_runtime_pinned
    if _aio_runtime_pinned:
        return
    _aio_runtime_pinned = True
    try:
        from grpc._cython import cygrpc

        cygrpc.init_grpc_aio()
    except Exception:  # pragma: no cover - a gRPC without this hook: nothing to pin
        pass


class AsyncClient(c.ClientBase):
    """An asyncio client of one chunkd server.

    A gRPC asyncio channel belongs to the event loop it is first used in: use one AsyncClient per
    loop (``chunkd.zarr.ChunkdStore`` does this for you). Calls may run concurrently on one
    client; they share its channel (HTTP/2 streams), e.g. ``asyncio.gather(*gets)``.

    Arguments and errors: as :class:`chunkd.Client`. With ``delivery="shm"``, leases are
    released and renewed from a thread of the client's own, not from the event loop.
    """

    _channel: grpc.aio.Channel | None

    def _setup(self) -> None:
        # CUDA IPC delivery (chunkd._cuda), made by the first read with a ``device``.
        self._cuda: Any = None

    def _get_stub(self) -> Any:
        if self._stub is None:
            if self._closed:
                raise RuntimeError("chunkd.AsyncClient is closed")
            _pin_aio_runtime()
            self._channel = self._security.aio_channel(self.target, self._options)
            self._stub = pb_grpc.ChunkdStub(self._channel)
        return self._stub

    async def _call(
        self, fn, key: str | None, *, idempotent: bool = True, deadline: c.Deadline | None = None
    ):
        """Runs fn(stub, timeout) until it succeeds, fails for good, or the deadline (``timeout``
        from now, retries included, unless given) passes; UNAVAILABLE is retried when
        ``idempotent``."""
        if deadline is None:
            deadline = c.Deadline(self.timeout)
        attempt = 0
        while True:
            try:
                return await fn(self._get_stub(), deadline.remaining())
            except grpc.RpcError as e:
                if idempotent and self._retry.should_retry(e, attempt, deadline):
                    await asyncio.sleep(self._retry.delay(attempt, deadline))
                    attempt += 1
                    continue
                raise error_from_rpc(e, key) from None

    async def close(self) -> None:
        """Closes the channel; calls in flight are cancelled. Idempotent."""
        self._closed = True
        channel, self._channel, self._stub = self._channel, None, None
        if self._shm is not None:
            self._shm.close()  # leases of values still alive are released as they go
        if self._cuda is not None:
            self._cuda.close()
        if channel is not None:
            await channel.close()

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
        request = c.get_request(
            key,
            c.byte_range(start, end, suffix),
            c.conditions(if_generation_match, if_generation_not_match),
        )

        shm = self._shm
        cuda = None
        if device is not None and out is None:
            if self._cuda is None:
                self._cuda = _cuda.CudaDelivery.create(
                    self.target,
                    self._options,
                    channel_factory=self._security.channel_factory(self.target, self._options),
                )
            cuda = self._cuda

        async def attempt(stub, timeout):
            if cuda is not None:
                call = stub.Get(cuda.request(request, device), timeout=timeout)
                assembler = c.GetAssembler(key, out, cuda.receivers())
            else:
                call = stub.Get(shm.request(request) if shm else request, timeout=timeout)
                assembler = c.GetAssembler(key, out, shm.receivers() if shm else None)
            await c.feed_all_async(call, assembler)
            return assembler.result()

        return await self._call(attempt, key)

    async def get(self, key: str, start: int | None = None, end: int | None = None, **kwargs: Any):
        """See :meth:`chunkd.Client.get`."""
        return (await self.read(key, start, end, **kwargs)).data

    async def read_many(self, items: Iterable[c.ItemLike]) -> list[c.GetResult | ChunkdError]:
        """See :meth:`chunkd.Client.read_many`: one result per item, an item's failure returned
        in its place. Inline or shared-memory delivery (CUDA IPC is for :meth:`read`)."""
        batches = c.get_many_requests(items)
        shm = self._shm
        deadline = c.Deadline(self.timeout)
        results: list[c.GetResult | ChunkdError] = []
        for keys, request in batches:

            async def attempt(stub, timeout, keys=keys, request=request):
                call = stub.GetMany(shm.request(request) if shm else request, timeout=timeout)
                assembler = c.GetManyAssembler(keys, shm.receivers() if shm else None)
                await c.feed_all_async(call, assembler)
                return assembler.results()

            results.extend(await self._call(attempt, None, deadline=deadline))
        return results

    async def get_many(self, items: Iterable[c.ItemLike]) -> list[Any]:
        """See :meth:`chunkd.Client.get_many`."""
        return [r if isinstance(r, Exception) else r.data for r in await self.read_many(items)]

    async def put(
        self,
        key: str,
        data: Any,
        *,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
    ) -> c.PutResult:
        """See :meth:`chunkd.Client.put`."""
        c.encode_key(key)  # type check before anything is sent
        view = c.as_bytes_view(data)
        conds = c.conditions(if_generation_match, if_generation_not_match)

        async def attempt(stub, timeout):
            r = await stub.Put(c.put_requests(key, view, conds), timeout=timeout)
            return c.PutResult(int(r.generation), int(r.size))

        return await self._call(attempt, key, idempotent=conds is None)

    async def delete(
        self,
        key: str,
        *,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
    ) -> None:
        """See :meth:`chunkd.Client.delete`."""
        request = pb.DeleteRequest(key=c.encode_key(key))
        conds = c.conditions(if_generation_match, if_generation_not_match)
        if conds is not None:
            request.conditions.CopyFrom(conds)
        await self._call(
            lambda stub, timeout: stub.Delete(request, timeout=timeout), key
        )

    async def stat(self, key: str) -> c.Stat:
        """See :meth:`chunkd.Client.stat`."""
        request = pb.StatRequest(key=c.encode_key(key))
        return c.stat_from_proto(
            await self._call(lambda stub, timeout: stub.Stat(request, timeout=timeout), key)
        )

    async def exists(self, key: str) -> bool:
        return (await self.stat(key)).exists

    async def iter_list(self, prefix: str = "", directory: bool = False) -> AsyncIterator[c.Listing]:
        """See :meth:`chunkd.Client.iter_list`."""
        request = pb.ListRequest(prefix=c.encode_key(prefix, "prefix"), directory=directory)
        deadline = c.Deadline(self.timeout)
        attempt = 0
        delivered = False
        while True:
            try:
                call = self._get_stub().List(request, timeout=deadline.remaining())
                try:
                    async for response in call:
                        delivered = True
                        yield c.listing_from_proto(response)
                finally:
                    call.cancel()
                return
            except grpc.RpcError as e:
                if not delivered and self._retry.should_retry(e, attempt, deadline):
                    await asyncio.sleep(self._retry.delay(attempt, deadline))
                    attempt += 1
                    continue
                raise error_from_rpc(e, prefix) from None

    async def list(self, prefix: str = "", directory: bool = False) -> c.Listing:
        """See :meth:`chunkd.Client.list`."""
        entries: list[c.ListEntry] = []
        prefixes: list[str] = []
        async for page in self.iter_list(prefix, directory):
            entries.extend(page.entries)
            prefixes.extend(page.prefixes)
        return c.Listing(entries, prefixes)

    async def server_info(self) -> c.ServerInfo:
        """See :meth:`chunkd.Client.server_info`."""
        return c.server_info_from_proto(
            await self._call(
                lambda stub, timeout: stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout), None
            )
        )

    # -- shared-memory leases ------------------------------------------------------------------

    async def flush_releases(self, timeout: float | None = 5.0) -> bool:
        """See :meth:`chunkd.Client.flush_releases`."""
        if self._shm is None:
            return True
        return await asyncio.to_thread(self._shm.keeper.flush, timeout)

    @property
    def leases_held(self) -> int:
        """See :attr:`chunkd.Client.leases_held`."""
        return 0 if self._shm is None else self._shm.keeper.held
