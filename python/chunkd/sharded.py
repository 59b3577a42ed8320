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

A call that fails with UNAVAILABLE (or DEADLINE_EXCEEDED, once per call) goes on to the key's
next server (conditional puts excepted: the first attempt may have landed); a server cut off
silently is found by keepalive pings within about 10 seconds. A server that fails
``failures_to_mark_down`` times in a row is skipped for ``down_backoff`` seconds, then used again
once a probe in the background got an answer from it. ``list`` asks every server that is up and
merges the answers (sorted, deduplicated). ``get_many`` groups its items by home server and
makes one call per server, in parallel; the items of a server that fails go on, each to its own
next server (every server reads the same store). After every write the pool drops the key's
cached copies where a later read could find an old one (docs/remote-stores.md: "Consistency of the copies").
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from chunkd import _common as c
from chunkd._common import _native
from chunkd.client import Client
from chunkd._security import Security

__all__ = ["ShardedClient", "hash64", "rendezvous_order", "rendezvous_score"]


def _bytes(data: bytes | str) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else bytes(data)


def hash64(data: bytes | str) -> int:
    """FNV-1a 64 over the bytes (UTF-8 for a str), then the SplitMix64 finalizer."""
    return _native.shard_hash64(_bytes(data))


def rendezvous_score(server: str, key: str | bytes) -> int:
    return _native.rendezvous_score(_bytes(server), _bytes(key))


def rendezvous_order(servers: Iterable[str], key: str | bytes) -> list[str]:
    """``servers`` in the key's rendezvous order: decreasing score, ties by name."""
    return _native.rendezvous_order(list(servers), _bytes(key))


class ShardedClient(Client):
    """A blocking client of a pool of chunkd servers (the C++ ``ShardedClient``). Thread-safe.

    Args:
        servers: addresses (``"host:port"``, ``"unix:/path"``), a comma-separated string of
            them, or one host name (``"name:port"``, ``"dns:///name:port"``) that resolves to
            the pool (re-resolved every ``resolve_interval`` seconds).
        failures_to_mark_down: consecutive UNAVAILABLE failures after which a server is skipped.
        down_backoff: seconds a down server is skipped before it is tried again.
        retries: retries of each server's client (keep it small: a down server costs them
            before the call moves on).
        **client_kwargs: as :class:`chunkd.Client` takes them (timeout, delivery, TLS...), for
            the client of each server.

    The calls are :class:`chunkd.Client`'s, each routed to its key's server; ``list`` merges
    every server's answer (one page), ``server_info`` is the first answering server's.
    """

    def __init__(
        self,
        servers: str | Sequence[str],
        *,
        failures_to_mark_down: int = 3,
        down_backoff: float = 5.0,
        resolve_interval: float = 30.0,
        retries: int = 1,
        timeout: float | None = c.DEFAULT_TIMEOUT,
        delivery: str = "inline",
        shm_dir: str = c.DEFAULT_SHM_DIR,
        **security: Any,
    ) -> None:
        if isinstance(servers, str):
            servers = _native.split_server_list(servers)
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self._given = list(servers)
        self.address = ",".join(self._given)
        self.failures_to_mark_down = failures_to_mark_down
        self.down_backoff = down_backoff
        self.resolve_interval = resolve_interval
        self.timeout = timeout
        self.retries = int(retries)
        self.delivery = c.check_delivery(delivery)
        self.shm_dir = shm_dir
        self._security = Security.create(**security)
        self._closed = False
        self._pid = os.getpid()
        self._n = c.make_native(
            "sharded",
            self._given,
            failures_to_mark_down=failures_to_mark_down,
            down_backoff=float(down_backoff),
            resolve_interval=float(resolve_interval),
            timeout=None if timeout is None else float(timeout),
            retries=self.retries,
            delivery=self.delivery,
            shm_dir=shm_dir,
            **self._security.native(),
        )

    # -- the pool --------------------------------------------------------------------------------

    @property
    def servers(self) -> list[str]:
        """The servers of the pool now, sorted."""
        return self._native_client().servers()

    def ranked_servers(self, key: str) -> list[str]:
        """The key's servers in rendezvous order; the first is its home."""
        return self._native_client().ranked_servers(key)

    def server_for(self, key: str) -> str:
        return self.ranked_servers(key)[0]

    def is_down(self, server: str) -> bool:
        return self._native_client().is_down(server)

    def __repr__(self) -> str:
        return f"chunkd.ShardedClient({self._given!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {
            "servers": self._given,
            "failures_to_mark_down": self.failures_to_mark_down,
            "down_backoff": self.down_backoff,
            "resolve_interval": self.resolve_interval,
            "retries": self.retries,
            "timeout": self.timeout,
            "delivery": self.delivery,
            "shm_dir": self.shm_dir,
            "security": self._security.arguments(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        servers = state.pop("servers")
        security = state.pop("security", {})
        self.__init__(servers, **state, **security)
