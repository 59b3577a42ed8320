#!/usr/bin/env python3
"""A TCP proxy that puts a wide-area link between a client and a server on one machine.

    latency_proxy.py --listen 127.0.0.1:0 --upstream 127.0.0.1:9000 [--rtt_ms 20]
                     [--mbit 0] [--ready_file F] [--control_port_file F]

The kernel here has no `netem`, so the round-trip time comes from user space: every piece of data
read from one side is written to the other side `rtt/2` after it arrived, in order, in both
directions, and a new connection's first bytes wait one more round trip (the TCP handshake a real
link would cost). `--mbit` caps each direction's bandwidth (a token bucket shared by all
connections, as one link is). What one connection has in flight is bounded by the
bandwidth-delay product (at least 4 MiB), so a fast sender is slowed by TCP's own flow control,
never buffered without bound.

It counts what crosses the link: connections, bytes each way, and HTTP requests by method
(request heads parsed in the client-to-server direction; bodies skipped by Content-Length).
A connection to the control port gets the counters as one JSON line and closes; one that sends
`reset\\n` first zeroes them too. Benchmarks start it as a process of its own, so that its work
does not share a Python interpreter with the reader being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path


class Link:
    """What the link carries and how fast: the shared bandwidth budget and the counters."""

    def __init__(self, rtt_s: float, mbit: float) -> None:
        self.one_way_s = rtt_s / 2
        self.rtt_s = rtt_s
        self.bytes_per_s = mbit * 1e6 / 8 if mbit > 0 else 0.0
        # Next time each direction's link is free (a token bucket with no burst beyond 64 KiB).
        self._free_at = {"up": 0.0, "down": 0.0}
        self.max_in_flight = max(4 << 20, int(self.bytes_per_s * rtt_s * 2))
        self.reset()

    def reset(self) -> None:
        self.connections = 0
        self.bytes = Counter()
        self.requests = Counter()

    def snapshot(self) -> dict:
        return {"connections": self.connections, "bytes_up": self.bytes["up"],
                "bytes_down": self.bytes["down"], "requests": dict(self.requests),
                "requests_total": sum(self.requests.values())}

    def send_time(self, direction: str, arrived: float, size: int) -> float:
        """When bytes that arrived at `arrived` leave the far end of the link."""
        leave = arrived + self.one_way_s
        if self.bytes_per_s:
            start = max(arrived, self._free_at[direction] - 65536 / self.bytes_per_s)
            self._free_at[direction] = max(start, self._free_at[direction]) + size / self.bytes_per_s
            leave = max(leave, self._free_at[direction] + self.one_way_s)
        return leave


class RequestCounter:
    """Counts HTTP/1.x requests in a client's byte stream (heads parsed, bodies skipped)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.buffer = b""
        self.body_left = 0
        self.lost = False  # a framing it cannot follow (chunked bodies): stop counting

    def feed(self, data: bytes) -> None:
        if self.lost:
            return
        while data:
            if self.body_left:
                take = min(self.body_left, len(data))
                self.body_left -= take
                data = data[take:]
                continue
            self.buffer += data
            data = b""
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 1 << 20:
                    self.lost = True
                return
            head, data = self.buffer[:end], self.buffer[end + 4:]
            self.buffer = b""
            lines = head.split(b"\r\n")
            method = lines[0].split(b" ", 1)[0].decode("latin-1", "replace")
            self.link.requests[method] += 1
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    self.body_left = int(value.strip() or 0)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    self.lost = True
                    return


async def _pump(link: Link, direction: str, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter, first_delay: float,
                counter: RequestCounter | None) -> None:
    """Forwards `reader` to `writer`, each piece `one_way_s` (plus the bandwidth's share) after
    it arrived, in order; at most `link.max_in_flight` bytes between the two."""
    queue: asyncio.Queue = asyncio.Queue()
    in_flight = 0
    space = asyncio.Event()
    space.set()

    async def deliver() -> None:
        nonlocal in_flight
        while True:
            item = await queue.get()
            if item is None:
                break
            leave, data = item
            delay = leave - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(data)
            await writer.drain()
            in_flight -= len(data)
            if in_flight < link.max_in_flight:
                space.set()
        if writer.can_write_eof():
            try:
                writer.write_eof()
            except OSError:
                pass

    sender = asyncio.create_task(deliver())
    extra = first_delay
    try:
        while True:
            data = await reader.read(256 << 10)
            if not data:
                break
            now = time.monotonic()
            link.bytes[direction] += len(data)
            if counter is not None:
                counter.feed(data)
            queue.put_nowait((link.send_time(direction, now, len(data)) + extra, data))
            extra = 0.0
            in_flight += len(data)
            if in_flight >= link.max_in_flight:
                space.clear()
                await space.wait()
    except (ConnectionError, OSError):
        pass
    finally:
        queue.put_nowait(None)
        try:
            await sender
        except (ConnectionError, OSError):
            pass


async def _serve_connection(link: Link, upstream: tuple[str, int],
                            client_reader: asyncio.StreamReader,
                            client_writer: asyncio.StreamWriter) -> None:
    link.connections += 1
    try:
        server_reader, server_writer = await asyncio.open_connection(*upstream)
    except OSError:
        client_writer.close()
        return
    # The handshake a real link costs: the client's first bytes arrive one round trip late.
    up = _pump(link, "up", client_reader, server_writer, link.rtt_s, RequestCounter(link))
    down = _pump(link, "down", server_reader, client_writer, 0.0, None)
    try:
        await asyncio.gather(up, down)
    finally:
        for w in (server_writer, client_writer):
            w.close()


async def _control(link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = await asyncio.wait_for(reader.readline(), 0.2)
    except asyncio.TimeoutError:
        line = b""
    snapshot = link.snapshot()
    if line.strip() == b"reset":
        link.reset()
    writer.write(json.dumps(snapshot).encode() + b"\n")
    await writer.drain()
    writer.close()


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _main(args: argparse.Namespace) -> None:
    link = Link(args.rtt_ms / 1000, args.mbit)
    upstream = _split(args.upstream)
    host, port = _split(args.listen)
    server = await asyncio.start_server(
        lambda r, w: _serve_connection(link, upstream, r, w), host, port, backlog=1024)
    control = await asyncio.start_server(lambda r, w: _control(link, r, w), "127.0.0.1", 0)
    bound = server.sockets[0].getsockname()
    control_port = control.sockets[0].getsockname()[1]
    if args.control_port_file:
        Path(args.control_port_file).write_text(f"{control_port}\n")
    if args.ready_file:
        tmp = Path(args.ready_file + ".tmp")
        tmp.write_text(f"{bound[0]}:{bound[1]}\n")
        os.replace(tmp, args.ready_file)
    print(f"latency_proxy: {bound[0]}:{bound[1]} -> {args.upstream}, rtt {args.rtt_ms} ms, "
          f"{'%g Mbit/s' % args.mbit if args.mbit else 'no bandwidth cap'}, control port "
          f"{control_port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server, control:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to accept on")
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the server")
    parser.add_argument("--rtt_ms", type=float, default=20.0, help="round-trip time to add")
    parser.add_argument("--mbit", type=float, default=0.0,
                        help="bandwidth cap per direction in Mbit/s (0: none)")
    parser.add_argument("--ready_file", help="write the bound HOST:PORT here once listening")
    parser.add_argument("--control_port_file", help="write the control port here")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
