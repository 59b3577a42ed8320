"""The blocking chunkd client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

import grpc

from chunkd import _common as c
from chunkd import _shm
from chunkd._stubs import pb, pb_grpc
from chunkd.errors import ChunkdError, error_from_rpc

__all__ = ["Client"]


class Client(c.ClientBase):
    """A blocking client of one chunkd server. Thread-safe: share one per process.

    Args:
        address: ``"host:port"``, ``"unix:/path"``, ``"chunkd://host:port"`` or
            ``"chunkd+unix:///path"`` (see :mod:`chunkd._address`).
        timeout: deadline of each call in seconds, retries included (None: no deadline).
        retries: how many times a call is retried after UNAVAILABLE (server down, restarting,
            overloaded), with exponential backoff (0: never). Conditional puts are not
            retried, since the first attempt may have landed; a retried delete whose first
            attempt did land reports NOT_FOUND.
        channel_options: extra gRPC channel arguments.
        delivery: ``"inline"`` (the default): values arrive in gRPC messages, as ``bytearray``;
            ``"shm"``: ask for shared-memory delivery (a client on the server's host that sees
            its ``shm_dir``): values arrive as read-only ``memoryview`` objects of the server's
            memory, each holding a lease until it (and every view of it) is gone. Where the
            server cannot share memory with this process, values arrive inline all the same
            (``read(...).delivery`` says which). Needs numpy.
        shm_dir: this process's path of the server's ``--shm_dir`` (default ``/dev/shm``).
        tls_ca: PEM file of the CA that signs the server's certificate: TLS for ``host:port``
            addresses (``unix:`` sockets stay plaintext). ``tls=True``: TLS with the system's CAs.
        tls_cert, tls_key: PEM files of this client's certificate and key, for a server that
            requires one (``chunkd --tls_client_ca``).
        tls_server_name: the name the server's certificate must hold, when not the address's.
        token: bearer token for a server started with ``--auth_tokens``, sent with every call
            (default: the ``CHUNKD_TOKEN`` environment variable).

    Errors: a missing key raises :class:`chunkd.NotFoundError` (a ``KeyError``), a bad key or
    range :class:`chunkd.InvalidArgument` (a ``ValueError``), a failed condition
    :class:`chunkd.PreconditionFailed`, anything else :class:`chunkd.ChunkdError` with ``.code``.
    """

    _channel: grpc.Channel | None

    def _setup(self) -> None:
        self._lock = threading.Lock()

    # -- plumbing ------------------------------------------------------------------------------

    def _get_stub(self) -> Any:
        stub = self._stub
        if stub is not None:
            return stub
        with self._lock:
            if self._closed:
                raise RuntimeError("chunkd.Client is closed")
            if self._stub is None:
                self._channel = self._security.channel(self.target, self._options)
                self._stub = pb_grpc.ChunkdStub(self._channel)
            return self._stub

    def _call(
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
                return fn(self._get_stub(), deadline.remaining())
            except grpc.RpcError as e:
                if idempotent and self._retry.should_retry(e, attempt, deadline):
                    time.sleep(self._retry.delay(attempt, deadline))
                    attempt += 1
                    continue
                raise error_from_rpc(e, key) from None

    def close(self) -> None:
        """Closes the channel; calls in flight are cancelled. Idempotent."""
        with self._lock:
            self._closed = True
            channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            channel.close()
        if self._shm is not None:
            self._shm.close()  # leases of values still alive are released as they go

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"chunkd.Client({self.address!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "timeout": self.timeout,
            "retries": self.retries,
            "options": self._options,
            "delivery": self.delivery,
            "shm_dir": self.shm_dir,
            "security": self._security.arguments(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["address"],
            timeout=state["timeout"],
            retries=state["retries"],
            delivery=state.get("delivery", "inline"),
            shm_dir=state.get("shm_dir", _shm.DEFAULT_SHM_DIR),
            **state.get("security", {}),
        )
        self._options = state["options"]

    # -- calls ---------------------------------------------------------------------------------

    def read(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        *,
        suffix: int | None = None,
        out: Any = None,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
    ) -> c.GetResult:
        """Reads a value or a byte range of it, with its size and generation.

        Ranges: ``(start, end)`` bytes [start, end) (past the end returns what exists);
        ``start`` alone: from start to the end; ``suffix=n``: the last n bytes.
        ``out``: a writable buffer (bytearray, numpy array, ...) to read into; else a new
        ``bytearray`` is allocated once, at the reply's exact length.
        """
        request = c.get_request(
            key,
            c.byte_range(start, end, suffix),
            c.conditions(if_generation_match, if_generation_not_match),
        )

        shm = self._shm

        def attempt(stub, timeout):
            call = stub.Get(shm.request(request) if shm else request, timeout=timeout)
            assembler = c.GetAssembler(key, out, shm.receivers() if shm else None)
            c.feed_all(call, assembler)
            return assembler.result()

        return self._call(attempt, key)

    def get(self, key: str, start: int | None = None, end: int | None = None, **kwargs: Any):
        """The bytes of a value or of a byte range of it (see :meth:`read`): a ``bytearray``, or
        a ``memoryview`` of ``out`` when given. Raises :class:`chunkd.NotFoundError` (KeyError)
        when the key does not exist."""
        return self.read(key, start, end, **kwargs).data

    def read_many(self, items: Iterable[c.ItemLike]) -> list[c.GetResult | ChunkdError]:
        """Reads many values (or byte ranges of them) in one GetMany call per 4096 items.

        ``items``: keys, ``(key, start)`` / ``(key, start, end)`` tuples (ranges as
        :meth:`read` takes them), or :class:`chunkd.GetItem` (for ``suffix`` and conditions).

        Returns one result per item, in order: its :class:`chunkd.GetResult`, or, when that
        item failed, the exception a :meth:`read` of it would have raised, returned in its place
        (not raised): :class:`chunkd.NotFoundError` for a missing key,
        :class:`chunkd.InvalidArgument` for a bad key or range, :class:`chunkd.PreconditionFailed`
        for a failed condition. Test with ``isinstance(result, Exception)``. What fails the
        whole call (the server unreachable, the deadline, an item that is not a key or tuple)
        raises. With ``delivery="shm"``, values arrive as they do from :meth:`read`, each with
        its own lease. One deadline (``timeout``) covers every call of the batch.
        """
        batches = c.get_many_requests(items)
        shm = self._shm
        deadline = c.Deadline(self.timeout)
        results: list[c.GetResult | ChunkdError] = []
        for keys, request in batches:

            def attempt(stub, timeout, keys=keys, request=request):
                call = stub.GetMany(shm.request(request) if shm else request, timeout=timeout)
                assembler = c.GetManyAssembler(keys, shm.receivers() if shm else None)
                c.feed_all(call, assembler)
                return assembler.results()

            results.extend(self._call(attempt, None, deadline=deadline))
        return results

    def get_many(self, items: Iterable[c.ItemLike]) -> list[Any]:
        """The bytes of many values or byte ranges (see :meth:`read_many` for ``items``): one
        result per item, in order, each a ``bytearray`` (a ``memoryview`` with shared-memory
        delivery), or the item's exception, returned in its place (e.g.
        :class:`chunkd.NotFoundError` for a missing key)::

            for key, value in zip(keys, client.get_many(keys)):
                if isinstance(value, chunkd.NotFoundError): ...
        """
        return [r if isinstance(r, Exception) else r.data for r in self.read_many(items)]

    def put(
        self,
        key: str,
        data: Any,
        *,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
    ) -> c.PutResult:
        """Stores a value (any C-contiguous buffer). ``if_generation_match=0`` stores it only if
        the key does not exist yet (else :class:`chunkd.PreconditionFailed`)."""
        c.encode_key(key)  # type check before anything is sent
        view = c.as_bytes_view(data)
        conds = c.conditions(if_generation_match, if_generation_not_match)

        def attempt(stub, timeout):
            r = stub.Put(c.put_requests(key, view, conds), timeout=timeout)
            return c.PutResult(int(r.generation), int(r.size))

        return self._call(attempt, key, idempotent=conds is None)

    def delete(
        self,
        key: str,
        *,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
    ) -> None:
        """Removes a value. A missing key raises :class:`chunkd.NotFoundError`."""
        request = pb.DeleteRequest(key=c.encode_key(key))
        conds = c.conditions(if_generation_match, if_generation_not_match)
        if conds is not None:
            request.conditions.CopyFrom(conds)
        self._call(lambda stub, timeout: stub.Delete(request, timeout=timeout), key)

    def stat(self, key: str) -> c.Stat:
        """Size and generation of a value; ``exists=False`` (no error) when it is missing."""
        request = pb.StatRequest(key=c.encode_key(key))
        return c.stat_from_proto(
            self._call(lambda stub, timeout: stub.Stat(request, timeout=timeout), key)
        )

    def exists(self, key: str) -> bool:
        return self.stat(key).exists

    def iter_list(self, prefix: str = "", directory: bool = False) -> Iterator[c.Listing]:
        """The listing under ``prefix`` page by page, as the server streams it. Keys are whole
        keys (not relative to the prefix), in lexicographic order.

        Retried on UNAVAILABLE only until the first page has arrived."""
        request = pb.ListRequest(prefix=c.encode_key(prefix, "prefix"), directory=directory)
        deadline = c.Deadline(self.timeout)
        attempt = 0
        delivered = False
        while True:
            try:
                call = self._get_stub().List(request, timeout=deadline.remaining())
                try:
                    for response in call:
                        delivered = True
                        yield c.listing_from_proto(response)
                finally:
                    call.cancel()
                return
            except grpc.RpcError as e:
                if not delivered and self._retry.should_retry(e, attempt, deadline):
                    time.sleep(self._retry.delay(attempt, deadline))
                    attempt += 1
                    continue
                raise error_from_rpc(e, prefix) from None

    def list(self, prefix: str = "", directory: bool = False) -> c.Listing:
        """All keys under ``prefix`` (a plain string prefix). With ``directory=True``, only the
        immediate children of ``prefix`` with '/' as separator: keys without a further '/' in
        ``entries``, deeper ones grouped into ``prefixes`` (ending in '/')."""
        entries: list[c.ListEntry] = []
        prefixes: list[str] = []
        for page in self.iter_list(prefix, directory):
            entries.extend(page.entries)
            prefixes.extend(page.prefixes)
        return c.Listing(entries, prefixes)

    def server_info(self) -> c.ServerInfo:
        """Version, backend, cache tiers, features and counters of the server."""
        return c.server_info_from_proto(
            self._call(
                lambda stub, timeout: stub.ServerInfo(pb.ServerInfoRequest(), timeout=timeout), None
            )
        )

    # -- shared-memory leases ------------------------------------------------------------------

    def flush_releases(self, timeout: float | None = 5.0) -> bool:
        """Returns the leases of shared-memory values dropped so far to the server now, and
        waits for its answer (they otherwise go in batches within milliseconds). False if
        ``timeout`` passed first. Values kept alive only by reference cycles go after
        ``gc.collect()``. Nothing to do without ``delivery="shm"``."""
        return True if self._shm is None else self._shm.keeper.flush(timeout)

    @property
    def leases_held(self) -> int:
        """Shared-memory values (leases) of this client still alive, as far as it has seen."""
        return 0 if self._shm is None else self._shm.keeper.held
