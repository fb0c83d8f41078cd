#!/usr/bin/env python3
"""Hold N idle HTTP/1.1 keep-alive connections open to HOST:PORT (for bench/connections.sh).

Opens N TCP connections, COUNT of them at a time (--concurrency), each from a source address of its own
among 127.0.0.2, 127.0.0.3, ... (round robin over ceil(N / --per-source) addresses, so that more connections fit
than one address's ephemeral ports), sends one `GET / HTTP/1.1` with keep-alive on each and reads the whole
response, which must be 200 and must not close the connection. Then prints `ready N` on stdout and holds them
all, idle, until standard input closes or --hold-seconds pass. Before closing them it checks that the server
closed none of them and prints `held N of N`; they are closed with a reset (SO_LINGER 0), so that no
TIME_WAIT is left behind for the next run.

Exit status: 0 when all N were opened, answered and still open at the end; 1 on any connection error, bad
response, timeout, or connection the server closed while held (the first errors are printed on stderr); 2 for
bad arguments or a file descriptor limit too low for N.
"""

import argparse
import asyncio
import ipaddress
import os
import resource
import socket
import struct
import sys
import threading
import time

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
HEAD_MAX = 64 * 1024
BODY_MAX = 1024 * 1024


class Failure(Exception):
    pass


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="HOST:PORT on loopback, such as 127.0.0.1:18511")
    p.add_argument("n", type=int, help="connections to open and hold")
    p.add_argument("--path", default="/", help="request path [/]")
    p.add_argument("--concurrency", type=int, default=32, help="connections being opened at once [32]")
    p.add_argument("--per-source", type=int, default=16000,
                   help="connections per source address at most [16000]; the ephemeral range holds ~28k")
    p.add_argument("--first-source", default="127.0.0.2", help="first source address [127.0.0.2]")
    p.add_argument("--timeout-seconds", type=float, default=120.0,
                   help="the whole open phase takes at most this long [120]")
    p.add_argument("--hold-seconds", type=float, default=3600.0,
                   help="hold at most this long if standard input stays open [3600]")
    a = p.parse_args()
    host, sep, port = a.target.rpartition(":")
    if not sep or not port.isdigit():
        p.error(f"target must be HOST:PORT, not {a.target!r}")
    a.host, a.port = host, int(port)
    try:
        dst = ipaddress.IPv4Address(a.host)
        first = ipaddress.IPv4Address(a.first_source)
    except ValueError as e:
        p.error(str(e))
    loop = ipaddress.IPv4Network("127.0.0.0/8")
    if dst not in loop:
        p.error(f"target {dst} is not on loopback (127.0.0.0/8)")
    if a.n < 1 or a.concurrency < 1 or a.per_source < 1:
        p.error("n, --concurrency and --per-source must be positive")
    sources = -(-a.n // a.per_source)
    last = first + (sources - 1)
    if first not in loop or last not in loop or int(last) >= int(ipaddress.IPv4Address("127.255.255.255")):
        p.error(f"{sources} source addresses from {first} do not fit in 127.0.0.0/8")
    a.sources = [str(first + i) for i in range(sources)]
    return a


def raise_nofile(n):
    """Soft RLIMIT_NOFILE to the hard limit (higher, if allowed); exit 2 when N cannot fit."""
    need = n + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return
        except (ValueError, OSError):
            print(f"hold_connections: {n} connections need about {need} file descriptors, but RLIMIT_NOFILE's "
                  f"hard limit is {hard} and this process may not raise it (that needs CAP_SYS_RESOURCE)",
                  file=sys.stderr)
            sys.exit(2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def read_response(loop, sock, deadline):
    """Reads one whole response; returns (status, keeps_alive). Handles Content-Length and chunked bodies."""
    buf = b""

    async def more():
        nonlocal buf
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure("timed out reading the response")
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
        if not data:
            raise Failure(f"connection closed by the server after {len(buf)} bytes of response")
        buf += data

    while b"\r\n\r\n" not in buf:
        if len(buf) > HEAD_MAX:
            raise Failure("response head too long")
        await more()
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise Failure(f"bad status line {lines[0]!r}")
    status = int(parts[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    connection = ",".join(headers.get("connection", [])).lower()
    keeps_alive = parts[0] == "HTTP/1.1" and "close" not in connection
    if "chunked" in ",".join(headers.get("transfer-encoding", [])).lower():
        while True:
            while b"\r\n" not in buf:
                await more()
            size = int(buf.split(b"\r\n", 1)[0].split(b";")[0].strip(), 16)
            if size > BODY_MAX:
                raise Failure("chunk too large")
            if size == 0:
                # The last chunk, then trailers (rare) and an empty line.
                while not (buf.split(b"\r\n", 1)[1].startswith(b"\r\n") or b"\r\n\r\n" in buf.split(b"\r\n", 1)[1]):
                    await more()
                break
            while len(buf.split(b"\r\n", 1)[1]) < size + 2:
                await more()
            buf = buf.split(b"\r\n", 1)[1][size + 2:]
    elif "content-length" in headers:
        length = int(headers["content-length"][0])
        if length > BODY_MAX:
            raise Failure("body too large")
        while len(buf) < length:
            await more()
    elif status not in (204, 304) and not (100 <= status < 200):
        raise Failure("response with neither Content-Length nor chunked encoding: it cannot be kept alive")
    return status, keeps_alive


async def open_one(loop, args, index, deadline):
    src = args.sources[index % len(args.sources)]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        # The port is then chosen at connect(), by the whole 4-tuple: one source address holds ~28k connections
        # per destination, and ports in TIME_WAIT on loopback can be reused (tcp_tw_reuse).
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass
        sock.bind((src, 0))
        left = deadline - time.monotonic()
        if left <= 0:
            raise Failure("timed out before connecting")
        await asyncio.wait_for(loop.sock_connect(sock, (args.host, args.port)), left)
        request = (f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n"
                   f"User-Agent: hold_connections\r\nConnection: keep-alive\r\n\r\n").encode()
        await asyncio.wait_for(loop.sock_sendall(sock, request), max(deadline - time.monotonic(), 0.001))
        status, keeps_alive = await read_response(loop, sock, deadline)
        if status != 200:
            raise Failure(f"status {status}, not 200")
        if not keeps_alive:
            raise Failure("the server closes the connection after the response (no keep-alive)")
        return sock
    except Failure as e:
        sock.close()
        raise Failure(f"connection #{index} from {src}: {e}") from None
    except asyncio.TimeoutError:
        sock.close()
        raise Failure(f"connection #{index} from {src}: timed out (--timeout-seconds {args.timeout_seconds})") from None
    except (OSError, ValueError) as e:
        sock.close()
        raise Failure(f"connection #{index} from {src}: {type(e).__name__}: {e}") from None


async def open_all(loop, args):
    deadline = time.monotonic() + args.timeout_seconds
    socks = []
    next_index = 0

    async def worker():
        nonlocal next_index
        while next_index < args.n:
            i = next_index
            next_index += 1
            socks.append(await open_one(loop, args, i, deadline))

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(args.concurrency, args.n))]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return socks


def wait_for_stdin_close(loop, closed):
    """A daemon thread reads standard input to its end (works for pipes, files and terminals alike)."""
    def run():
        try:
            while os.read(0, 65536):
                pass
        except OSError:
            pass
        loop.call_soon_threadsafe(lambda: closed.done() or closed.set_result(None))
    threading.Thread(target=run, daemon=True).start()


def count_closed(socks):
    """Connections that are no longer clean idle keep-alives: closed or reset by the server, or with bytes
    waiting that nobody asked for."""
    bad = 0
    for s in socks:
        try:
            s.recv(1, socket.MSG_PEEK)  # b"" (closed) or unexpected bytes: either way not idle any more
            bad += 1
        except BlockingIOError:
            pass
        except OSError:
            bad += 1
    return bad


def close_all(socks):
    linger = struct.pack("ii", 1, 0)
    for s in socks:
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        s.close()


async def main():
    args = parse_args()
    raise_nofile(args.n)
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    socks = []
    try:
        try:
            socks = await open_all(loop, args)
        except Failure as e:
            print(f"hold_connections: error: {e}", file=sys.stderr)
            return 1
        print(f"ready {len(socks)}", flush=True)
        print(f"hold_connections: {len(socks)} connections to {args.host}:{args.port} from {len(args.sources)} "
              f"source address(es) opened in {time.monotonic() - started:.1f}s", file=sys.stderr)
        closed = loop.create_future()
        wait_for_stdin_close(loop, closed)
        try:
            await asyncio.wait_for(closed, args.hold_seconds)
        except asyncio.TimeoutError:
            print(f"hold_connections: --hold-seconds {args.hold_seconds} passed; closing", file=sys.stderr)
        lost = count_closed(socks)
        print(f"held {len(socks) - lost} of {len(socks)}", flush=True)
        if lost:
            print(f"hold_connections: error: the server closed {lost} of the {len(socks)} idle connections "
                  f"while they were held", file=sys.stderr)
            return 1
        return 0
    finally:
        close_all(socks)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main()))
    except KeyboardInterrupt:
        sys.exit(130)
