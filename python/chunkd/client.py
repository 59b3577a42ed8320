"""The blocking chunkd client."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from chunkd import _common as c
from chunkd.errors import ChunkdError

__all__ = ["Client"]


class Client(c.ClientBase):
    """A blocking client of one chunkd server. Thread-safe: share one per process.

    Every call runs in the C++ client (``chunkd._native``) with the GIL released, so threads
    calling one client at once overlap.

    Args:
        address: ``"host:port"``, ``"unix:/path"``, ``"chunkd://host:port"`` or
            ``"chunkd+unix:///path"`` (see :mod:`chunkd._address`).
        timeout: deadline of each call in seconds, retries included (None: no deadline).
        retries: how many times a call is retried after UNAVAILABLE (server down, restarting,
            overloaded), with exponential backoff (0: never). Conditional puts are not
            retried, since the first attempt may have landed; a retried delete whose first
            attempt did land reports NOT_FOUND.
        delivery: ``"inline"`` (the default): values arrive over the connection, each as a
            writable ``memoryview`` of the buffer the client received it into (no copy);
            ``"shm"``: ask for shared-memory delivery (a client on the server's host that sees
            its ``shm_dir``): values arrive as read-only ``memoryview`` objects of the server's
            memory, each holding a lease until it (and every view of it) is gone. Where the
            server cannot share memory with this process, values arrive inline all the same
            (``read(...).delivery`` says which).
        shm_dir: this process's path of the server's ``--shm_dir`` (default ``/dev/shm``).
        tls_ca: PEM file (or PEM bytes) of the CA that signs the server's certificate: TLS for
            ``host:port`` addresses (``unix:`` sockets stay plaintext). ``tls=True``: TLS with
            the system's CAs.
        tls_cert, tls_key: PEM files of this client's certificate and key, for a server that
            requires one (``chunkd --tls_client_ca``).
        tls_server_name: the name the server's certificate must hold, when not the address's.
        token: bearer token for a server started with ``--auth_tokens``, sent with every call
            (default: the ``CHUNKD_TOKEN`` environment variable).

    Errors: a missing key raises :class:`chunkd.NotFoundError` (a ``KeyError``), a bad key or
    range :class:`chunkd.InvalidArgument` (a ``ValueError``), a failed condition
    :class:`chunkd.PreconditionFailed`, anything else :class:`chunkd.ChunkdError` with ``.code``.
    """

    def close(self) -> None:
        """Closes the client; later calls raise RuntimeError. Idempotent. Values still alive
        keep their memory (and leases) until they are dropped."""
        self.close_blocking()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"chunkd.Client({self.address!r})"

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
        ``out``: a writable buffer (bytearray, numpy array, ...) the value is copied into
        (``data`` is then a memoryview of it); else ``data`` views the client's own buffer.
        """
        return self._native_client().get(
            key, start, end, suffix, out, if_generation_match, if_generation_not_match, True
        )

    def get(
        self,
        key: str,
        start: int | None = None,
        end: int | None = None,
        *,
        suffix: int | None = None,
        out: Any = None,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
    ) -> Any:
        """The bytes of a value or of a byte range of it (see :meth:`read`): a ``memoryview``
        (writable for inline delivery, read-only for shared memory, of ``out`` when given).
        Raises :class:`chunkd.NotFoundError` (KeyError) when the key does not exist."""
        return self._native_client().get(
            key, start, end, suffix, out, if_generation_match, if_generation_not_match, False
        )

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
        its own lease.
        """
        return self._many(items, True)

    def get_many(self, items: Iterable[c.ItemLike]) -> list[Any]:
        """The bytes of many values or byte ranges (see :meth:`read_many` for ``items``): one
        result per item, in order, each a ``memoryview`` as :meth:`get` returns it, or the
        item's exception, returned in its place (e.g. :class:`chunkd.NotFoundError` for a
        missing key)::

            for key, value in zip(keys, client.get_many(keys)):
                if isinstance(value, chunkd.NotFoundError): ...
        """
        return self._many(items, False)

    def _many(self, items: Iterable[c.ItemLike], full: bool) -> list[Any]:
        native = self._native_client()
        groups = c.batches(items)
        if len(groups) == 1:
            return native.get_many(groups[0], full)
        results: list[Any] = []
        for group in groups:
            results.extend(native.get_many(group, full))
        return results

    def put(
        self,
        key: str,
        data: Any,
        *,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
    ) -> c.PutResult:
        """Stores a value (any C-contiguous buffer, sent without a copy).
        ``if_generation_match=0`` stores it only if the key does not exist yet (else
        :class:`chunkd.PreconditionFailed`)."""
        return self._native_client().put(key, data, if_generation_match, if_generation_not_match)

    def put_derived(
        self,
        key: str,
        derivation: bytes,
        data: Any,
        *,
        source_generation: int,
        production_id: int = 0,
    ) -> None:
        """Publishes ``data`` as the server's derived entry of ``key`` for ``derivation``,
        derived from generation ``source_generation`` of the key (a read that returned a
        ``production_id`` names both). The store is not written. Readers waiting for the entry
        get it. :class:`chunkd.PreconditionFailed` when the key is no longer at that generation
        (nothing is stored) or the server keeps no derived entries."""
        self._native_client().put_derived(key, derivation, data, source_generation, production_id,
                                          False)

    def abandon_derived(self, key: str, derivation: bytes, production_id: int) -> None:
        """Gives up production ``production_id`` of the derived entry of ``key``: a reader
        waiting for it is told to produce it instead. Nothing happens when that production is
        over already."""
        self._native_client().put_derived(key, derivation, None, 0, production_id, True)

    def delete(
        self,
        key: str,
        *,
        if_generation_match: int | None = None,
        if_generation_not_match: int | None = None,
    ) -> None:
        """Removes a value. A missing key raises :class:`chunkd.NotFoundError`."""
        self._native_client().delete(key, if_generation_match, if_generation_not_match)

    def stat(self, key: str) -> c.Stat:
        """Size and generation of a value; ``exists=False`` (no error) when it is missing."""
        return self._native_client().stat(key)

    def exists(self, key: str) -> bool:
        return self.stat(key).exists

    def iter_list(self, prefix: str = "", directory: bool = False) -> Iterator[c.Listing]:
        """The listing under ``prefix`` page by page, as the server sent it. Keys are whole
        keys (not relative to the prefix), in lexicographic order."""
        yield from self._native_client().list_pages(prefix, directory)

    def list(self, prefix: str = "", directory: bool = False) -> c.Listing:
        """All keys under ``prefix`` (a plain string prefix). With ``directory=True``, only the
        immediate children of ``prefix`` with '/' as separator: keys without a further '/' in
        ``entries``, deeper ones grouped into ``prefixes`` (ending in '/')."""
        return c.merge(self._native_client().list_pages(prefix, directory))

    def server_info(self) -> c.ServerInfo:
        """Version, backend, cache tiers, features and counters of the server."""
        return c.server_info(self._native_client().server_info())

    # -- shared-memory leases ------------------------------------------------------------------

    def flush_releases(self, timeout: float | None = 5.0) -> bool:
        """Returns the leases of shared-memory values dropped so far to the server now, and
        waits for its answer (they otherwise go in batches within milliseconds); False if the
        release call failed. Values kept alive only by reference cycles go after
        ``gc.collect()``. Nothing to do without ``delivery="shm"``. (``timeout`` is kept for
        compatibility: the release call has its own 10 s deadline.)"""
        return self.flush_releases_blocking()
