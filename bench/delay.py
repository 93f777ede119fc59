#!/usr/bin/env python3
"""A delay front: a TCP proxy on loopback that makes a link look long (issue 16; `tc netem` is not
available here, so it is userspace).

Every chunk read from one side is written to the other at (arrival + one-way delay), in order, without
waiting for earlier chunks to be acknowledged: a pipe with latency, not stop-and-wait, so throughput is
kept. A new connection's first client bytes wait one more round trip, standing for the TCP handshake
(SYN, SYN-ACK) the client would pay before it could send. With --mbit, each direction is also a link of
that rate: a chunk leaves when the link is free and takes len/rate to serialise.

It logs one line per connection to --log when the connection ends (JSON: id, open/close times, bytes
each way) so the benchmark counts connections and bytes per copy. Runs until SIGTERM.

usage: delay.py --listen PORT --to HOST:PORT --rtt-ms 50 [--mbit N] [--log FILE]
"""
import argparse
import asyncio
import collections
import json
import signal
import sys
import time

CHUNK = 256 * 1024
BUFFER = 32 * 1024 * 1024  # bytes in flight per direction before the reader pauses (> rate × delay)


class Pipe:
    """One direction of one connection: chunks with the time they may be delivered."""

    def __init__(self, delay, rate, first_extra):
        self.delay, self.rate, self.first_extra = delay, rate, first_extra
        self.q = collections.deque()
        self.queued = 0
        self.link_free = 0.0
        self.bytes = 0
        self.more = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.eof = False

    def push(self, data, now):
        start = max(now, self.link_free)
        if self.rate:
            start += len(data) / self.rate
        self.link_free = start
        due = start + self.delay + self.first_extra
        self.first_extra = 0.0
        self.q.append((due, data))
        self.queued += len(data)
        self.bytes += len(data)
        if self.queued >= BUFFER:
            self.room.clear()
        self.more.set()


async def pump_in(reader, pipe):
    loop = asyncio.get_running_loop()
    try:
        while True:
            await pipe.room.wait()
            data = await reader.read(CHUNK)
            if not data:
                break
            pipe.push(data, loop.time())
    except (ConnectionError, OSError):
        pass
    pipe.eof = True
    pipe.more.set()


async def pump_out(writer, pipe):
    loop = asyncio.get_running_loop()
    try:
        while True:
            while not pipe.q:
                if pipe.eof:
                    writer.write_eof()
                    return
                pipe.more.clear()
                await pipe.more.wait()
            due, data = pipe.q[0]
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            pipe.q.popleft()
            pipe.queued -= len(data)
            if pipe.queued < BUFFER:
                pipe.room.set()
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass


class Front:
    def __init__(self, args):
        self.args = args
        self.host, port = args.to.rsplit(":", 1)
        self.port = int(port)
        self.n = 0
        self.log = open(args.log, "a", buffering=1) if args.log else None

    async def handle(self, c_reader, c_writer):
        self.n += 1
        cid, opened = self.n, time.time()
        one_way = self.args.rtt_ms / 2000.0
        rate = self.args.mbit * 1e6 / 8 if self.args.mbit else 0
        try:
            u_reader, u_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            c_writer.close()
            return
        for w in (c_writer, u_writer):
            s = w.get_extra_info("socket")
            if s is not None:
                import socket
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up = Pipe(one_way, rate, first_extra=2 * one_way)  # the handshake's round trip
        down = Pipe(one_way, rate, first_extra=0.0)
        await asyncio.gather(pump_in(c_reader, up), pump_out(u_writer, up),
                             pump_in(u_reader, down), pump_out(c_writer, down))
        for w in (c_writer, u_writer):
            try:
                w.close()
            except OSError:
                pass
        if self.log:
            self.log.write(json.dumps({"id": cid, "open": opened, "close": time.time(),
                                       "up_bytes": up.bytes, "down_bytes": down.bytes}) + "\n")


async def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--to", required=True, help="HOST:PORT of the registry behind the front")
    p.add_argument("--rtt-ms", type=float, required=True)
    p.add_argument("--mbit", type=float, default=0, help="link rate per direction (0: no cap)")
    p.add_argument("--log", default=None)
    args = p.parse_args()
    front = Front(args)
    server = await asyncio.start_server(front.handle, "127.0.0.1", args.listen, backlog=512)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    print("ready", flush=True)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
