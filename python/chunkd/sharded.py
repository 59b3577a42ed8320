"""A blocking client over a pool of chunkd servers, routing each key by rendezvous hashing.

    import chunkd
    with chunkd.ShardedClient(["10.0.0.1:7878", "10.0.0.2:7878", "10.0.0.3:7878"]) as pool:
        pool.put("arr/c/0/0", b"...")        # goes to the key's home server
        pool.get("arr/c/0/0")
    chunkd.ShardedClient("chunkd.data.svc.cluster.local:7878")   # a headless Service

Routing is the same as the C++ ``chunkd::client::ShardedClient`` (client/sharded_client.h), so
both send every key to the same server: the score of (server, key) is
``mix64(hash64(key) ^ hash64(server))``, with ``hash64`` FNV-1a 64 over the UTF-8 bytes followed
by the SplitMix64 finalizer ``mix64``; a key's servers in order of decreasing score (ties by
name) are its rendezvous order, and the first is its home. Adding or removing a server moves
only that server's share of the keys.

A call that fails with UNAVAILABLE goes on to the key's next server (conditional puts excepted:
the first attempt may have landed). A server that fails ``failures_to_mark_down`` times in a row
is skipped for ``down_backoff`` seconds, then tried again. ``list`` asks every server that is up
and merges the answers (sorted, deduplicated). ``get_many`` groups its items by home server and
makes one call per server, in parallel; a group whose server is UNAVAILABLE goes on as a whole
to its first key's next server (every server reads the same store).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from chunkd import _common as c
from chunkd.client import Client
from chunkd.errors import ChunkdError

__all__ = ["ShardedClient", "hash64", "rendezvous_order", "rendezvous_score"]

_MASK = (1 << 64) - 1


def _mix64(h: int) -> int:
    """The SplitMix64 finalizer."""
    h ^= h >> 30
    h = (h * 0xBF58476D1CE4E5B9) & _MASK
    h ^= h >> 27
    h = (h * 0x94D049BB133111EB) & _MASK
    h ^= h >> 31
    return h


def hash64(data: bytes | str) -> int:
    """FNV-1a 64 over the bytes (UTF-8 for a str), then the SplitMix64 finalizer."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & _MASK
    return _mix64(h)


def rendezvous_score(server: str, key: str | bytes) -> int:
    return _mix64(hash64(key) ^ hash64(server))


def rendezvous_order(servers: Iterable[str], key: str | bytes) -> list[str]:
    """``servers`` in the key's rendezvous order: decreasing score, ties by name."""
    k = hash64(key)
    return [s for _, s in sorted((-_mix64(k ^ hash64(s)), s) for s in servers)]


def _is_host_name(address: str) -> tuple[str, str] | None:
    """(host, port) when ``address`` is a host name to resolve, else None."""
    if address.startswith("dns:///"):
        address = address[len("dns:///") :]
    elif address.startswith(("unix:", "[", "chunkd")):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        return None
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return None
        except OSError:
            pass
    return host, port


def _resolve(host: str, port: str) -> list[str]:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            infos = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
        except socket.gaierror:
            continue
        found = set()
        for info in infos:
            ip = info[4][0]
            found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
        if found:
            return sorted(found)
    raise ChunkdError(f"host name {host} does not resolve", code=grpc.StatusCode.NOT_FOUND)


def _unavailable(e: BaseException) -> bool:
    return isinstance(e, ChunkdError) and e.code == grpc.StatusCode.UNAVAILABLE


class ShardedClient:
    """A blocking client of a pool of chunkd servers. Thread-safe.

    Args:
        servers: addresses (``"host:port"``, ``"unix:/path"``), a comma-separated string of
            them, or one host name (``"name:port"``, ``"dns:///name:port"``) that resolves to
            the pool (re-resolved every ``resolve_interval`` seconds).
        failures_to_mark_down: consecutive UNAVAILABLE failures after which a server is skipped.
        down_backoff: seconds a down server is skipped before it is tried again.
        retries: retries of each server's client (keep it small: a down server costs them
            before the call moves on).
        **client_kwargs: passed to each server's :class:`chunkd.Client` (timeout, delivery...).
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        failures_to_mark_down: int = 3,
        down_backoff: float = 5.0,
        resolve_interval: float = 30.0,
        retries: int = 1,
        **client_kwargs: Any,
    ) -> None:
        if isinstance(servers, str):
            servers = [s.strip() for s in servers.split(",") if s.strip()]
        if not servers:
            raise ValueError("no chunkd servers given")
        if failures_to_mark_down < 1:
            raise ValueError("failures_to_mark_down must be at least 1")
        self._given = list(servers)
        self.failures_to_mark_down = failures_to_mark_down
        self.down_backoff = down_backoff
        self.resolve_interval = resolve_interval
        self._client_kwargs = dict(client_kwargs, retries=retries)
        self._lock = threading.Lock()
        self._clients: dict[str, Client] = {}
        self._failures: dict[str, int] = {}
        self._down_until: dict[str, float] = {}
        self._current: list[str] = []
        self._next_resolve = 0.0
        self._host = _is_host_name(servers[0]) if len(servers) == 1 else None
        if self._host is None:
            self._set_servers(sorted(set(servers)))
        else:
            self._refresh(force=True)

    # -- pool ------------------------------------------------------------------------------------

    def _set_servers(self, servers: list[str]) -> None:
        with self._lock:
            for s in servers:
                if s not in self._clients:
                    self._clients[s] = Client(s, **self._client_kwargs)
            self._current = list(servers)

    def _refresh(self, force: bool = False) -> None:
        if self._host is None:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now < self._next_resolve:
                return
            self._next_resolve = now + self.resolve_interval
        try:
            resolved = _resolve(*self._host)
        except ChunkdError:
            if force or not self._current:
                raise
            return
        self._set_servers(resolved)

    @property
    def servers(self) -> list[str]:
        """The servers of the pool now, sorted."""
        self._refresh()
        with self._lock:
            return list(self._current)

    def ranked_servers(self, key: str) -> list[str]:
        """The key's servers in rendezvous order; the first is its home."""
        return rendezvous_order(self.servers, key)

    def server_for(self, key: str) -> str:
        return self.ranked_servers(key)[0]

    def is_down(self, server: str) -> bool:
        with self._lock:
            return self._down_until.get(server, 0.0) > time.monotonic()

    def _candidates(self, key: str) -> list[tuple[str, Client]]:
        order = self.ranked_servers(key)
        now = time.monotonic()
        with self._lock:
            up = [(s, self._clients[s]) for s in order if self._down_until.get(s, 0.0) <= now]
            down = [(s, self._clients[s]) for s in order if self._down_until.get(s, 0.0) > now]
        return up + down

    def _up(self) -> list[tuple[str, Client]]:
        self._refresh()
        now = time.monotonic()
        with self._lock:
            every = [(s, self._clients[s]) for s in self._current]
        up = [(s, cl) for s, cl in every if self._down_until.get(s, 0.0) <= now]
        return up or every

    def _record(self, server: str, error: BaseException | None) -> None:
        with self._lock:
            if error is None or not _unavailable(error):
                self._failures[server] = 0
                self._down_until.pop(server, None)
                return
            n = self._failures.get(server, 0) + 1
            self._failures[server] = n
            if n >= self.failures_to_mark_down:
                self._down_until[server] = time.monotonic() + self.down_backoff

    def _route(self, key: str, fn, *, fail_over: bool = True):
        last: BaseException | None = None
        for server, client in self._candidates(key):
            try:
                result = fn(client)
            except ChunkdError as e:
                self._record(server, e)
                if fail_over and _unavailable(e):
                    last = e
                    continue
                raise
            self._record(server, None)
            return result
        assert last is not None
        raise last

    # -- calls ---------------------------------------------------------------------------------

    def read(self, key: str, *args: Any, **kwargs: Any) -> c.GetResult:
        """As :meth:`chunkd.Client.read`, on the key's server."""
        return self._route(key, lambda cl: cl.read(key, *args, **kwargs))

    def get(self, key: str, *args: Any, **kwargs: Any):
        return self._route(key, lambda cl: cl.get(key, *args, **kwargs))

    def read_many(self, items: Iterable[c.ItemLike]) -> list[c.GetResult | ChunkdError]:
        """As :meth:`chunkd.Client.read_many` (one result per item, an item's failure returned
        in its place), with one call per home server of the items, in parallel. A group that
        fails as a whole (every candidate server UNAVAILABLE) raises."""
        items = [c.get_item(item) for item in items]
        if not items:
            return []
        hashed = [(server, hash64(server)) for server in self.servers]
        groups: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            k = hash64(c.encode_key(item.key))  # its home: rendezvous_order(...)[0]
            home = min(hashed, key=lambda sh: (-_mix64(k ^ sh[1]), sh[0]))[0]
            groups.setdefault(home, []).append(i)
        results: list[Any] = [None] * len(items)

        def fetch(indexes: list[int]) -> None:
            group = [items[i] for i in indexes]
            got = self._route(group[0].key, lambda cl: cl.read_many(group))
            for i, result in zip(indexes, got, strict=True):
                results[i] = result

        if len(groups) == 1:
            fetch(next(iter(groups.values())))
        else:
            with ThreadPoolExecutor(len(groups), thread_name_prefix="chunkd-get-many") as pool:
                futures = [pool.submit(fetch, indexes) for indexes in groups.values()]
            for future in futures:  # every group has finished: the first failure raises
                future.result()
        return results

    def get_many(self, items: Iterable[c.ItemLike]) -> list[Any]:
        """As :meth:`chunkd.Client.get_many`, routed as :meth:`read_many`."""
        return [r if isinstance(r, Exception) else r.data for r in self.read_many(items)]

    def put(self, key: str, data: Any, **kwargs: Any) -> c.PutResult:
        conditional = any(
            kwargs.get(k) is not None for k in ("if_generation_match", "if_generation_not_match")
        )
        return self._route(key, lambda cl: cl.put(key, data, **kwargs), fail_over=not conditional)

    def delete(self, key: str, **kwargs: Any) -> None:
        self._route(key, lambda cl: cl.delete(key, **kwargs))

    def stat(self, key: str) -> c.Stat:
        return self._route(key, lambda cl: cl.stat(key))

    def exists(self, key: str) -> bool:
        return self.stat(key).exists

    def list(self, prefix: str = "", directory: bool = False) -> c.Listing:
        """Every server's listing under ``prefix``, merged: sorted and deduplicated. Servers that
        are UNAVAILABLE are left out while at least one answers."""
        entries: dict[str, int] = {}
        prefixes: set[str] = set()
        answered = 0
        unavailable: BaseException | None = None
        for server, client in self._up():
            try:
                listing = client.list(prefix, directory)
            except ChunkdError as e:
                self._record(server, e)
                if _unavailable(e):
                    unavailable = e
                    continue
                raise
            self._record(server, None)
            answered += 1
            for e in listing.entries:
                entries.setdefault(e.key, e.size)
            prefixes.update(listing.prefixes)
        if answered == 0:
            assert unavailable is not None
            raise unavailable
        return c.Listing(
            [c.ListEntry(k, entries[k]) for k in sorted(entries)], sorted(prefixes)
        )

    def iter_list(self, prefix: str = "", directory: bool = False) -> Iterator[c.Listing]:
        yield self.list(prefix, directory)

    def server_info(self) -> c.ServerInfo:
        """The first answering server's info."""
        last: BaseException | None = None
        for server, client in self._up():
            try:
                info = client.server_info()
            except ChunkdError as e:
                self._record(server, e)
                if _unavailable(e):
                    last = e
                    continue
                raise
            self._record(server, None)
            return info
        assert last is not None
        raise last

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for cl in clients:
            cl.close()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"chunkd.ShardedClient({self._given!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {
            "servers": self._given,
            "failures_to_mark_down": self.failures_to_mark_down,
            "down_backoff": self.down_backoff,
            "resolve_interval": self.resolve_interval,
            "client_kwargs": self._client_kwargs,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        kwargs = dict(state["client_kwargs"])
        retries = kwargs.pop("retries", 1)
        self.__init__(
            state["servers"],
            failures_to_mark_down=state["failures_to_mark_down"],
            down_backoff=state["down_backoff"],
            resolve_interval=state["resolve_interval"],
            retries=retries,
            **kwargs,
        )
