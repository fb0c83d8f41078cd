#!/usr/bin/env python3
"""The hostile inputs of crates/nonstop/tests/hostile.rs, sent to nonstop, nginx and HAProxy side by side.

Run by bench/hostile.sh (which installs nginx and HAProxy, finds the nonstop binary, makes the work directory and
cleans up); see that file for the purpose and the usage. Python 3.11 standard library only. Every socket here is on
127.0.0.1; every wait is bounded.

For each case and each proxy (alternated: nonstop, nginx, haproxy, then the next case) it starts a fresh recording
backend and a fresh proxy in front of it, sends the case's bytes followed by a pipelined END request on one new
connection, reads until the proxy closes (at most CLIENT_LIMIT), and reports what the client got and what the backend
saw. The backend frames leniently on purpose, like crates/testkit/src/raw.rs: a Content-Length that is not all
digits counts as 0, so bytes a proxy forwarded under a length it did not check show up as an extra request.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

END = b"GET /__end HTTP/1.1\r\nHost: victim\r\nConnection: close\r\n\r\n"
SMUGGLED = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
IDLE_MS = 1000  # header_read_timeout_ms of hostile.rs's proxy(), and the matching nginx/HAProxy timeouts
HEAD_MAX = 4096  # header_bytes_max of hostile.rs's proxy()
CLIENT_LIMIT = 5.0  # seconds a case's client connection is read, at most
IDLE_CAP = 15.0  # seconds an idle connection is watched, at most
RESPONSE_READ_TIMEOUT = 2  # seconds: the proxies' server read timeout in the malicious-response cases
UPLOAD_LIMIT = 10.0  # seconds an early-413 upload is read, at most
PROXIES = ("nonstop", "nginx", "haproxy")


# ---------------------------------------------------------------------------------------------------------------
# The cases, byte for byte those of hostile.rs.

def post_with(headers, body):
    return f"POST / HTTP/1.1\r\nHost: victim\r\n{headers}\r\n{body}".encode("utf-8")


def request_cases():
    n = len(SMUGGLED)
    S = SMUGGLED
    post = [("POST", "/")]
    get = [("GET", "/")]
    refused = [
        # (name, bytes, what nonstop must answer per hostile.rs, the requests the client sent)
        ("CL with a plus sign", post_with(f"Content-Length: +{n}\r\n", S), "400", post),
        ("CL with a minus sign", post_with(f"Content-Length: -{n}\r\n", S), "400", post),
        ("CL with a no-break space", post_with(f"Content-Length: {n}\u00a0\r\n", S), "400", post),
        ("CL in hex", post_with(f"Content-Length: 0x{n:x}\r\n", S), "400", post),
        ("CL with an exponent", post_with("Content-Length: 3e1\r\n", S), "400", post),
        ("CL of two differing values", post_with(f"Content-Length: {n}\r\nContent-Length: 0\r\n", S), "400", post),
        ("CL list of differing values", post_with(f"Content-Length: {n}, 0\r\n", S), "400", post),
        ("CL with a space before the colon", post_with(f"Content-Length : {n}\r\n", S), "400", post),
        ("TE xchunked", post_with("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"), "400", post),
        ("TE chunked not last", post_with("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"), "400", post),
        ("TE with a space before the colon", post_with("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"), "400", post),
        ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nHost: v\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400", post),
        (
            "HTTP/1.0 CL with a plus sign",
            f"POST / HTTP/1.0\r\nHost: v\r\nContent-Length: +{n}\r\n\r\n{S}".encode(),
            "400",
            post,
        ),
        ("obs-fold", post_with(f"X-A: a\r\n b\r\nContent-Length: {n}\r\n", S), "400", post),
        ("obs-fold of CL", post_with(f"X-A: a\r\nContent-Length:\r\n {n}\r\n", S), "400", post),
        ("NUL in a header value", post_with(f"X-A: a\0b\r\nContent-Length: {n}\r\n", S), "400", post),
        ("bare CR in a header value", post_with(f"X-A: a\rb\r\nContent-Length: {n}\r\n", S), "400", post),
        ("space in a header name", post_with(f"X A: b\r\nContent-Length: {n}\r\n", S), "400", post),
        ("two Host headers", b"GET / HTTP/1.1\r\nHost: victim\r\nHost: attacker\r\n\r\n", "400", get),
        (
            "head over header_bytes_max",
            f"GET / HTTP/1.1\r\nHost: v\r\nX-Big: {'a' * 5000}\r\n\r\n".encode(),
            "431",
            get,
        ),
    ]
    body = '{"item":"x"}'
    m = len(body)
    accepted = [
        ("leading zeros", post_with(f"Content-Length: 000{m}\r\n", body), "200,200", post),
        ("two equal CL headers", post_with(f"Content-Length: {m}\r\nContent-Length: {m}\r\n", body), "200,200", post),
        ("a list of equal values", post_with(f"Content-Length: {m}, {m}\r\n", body), "200,200", post),
        (
            "CL and TE chunked",
            post_with("Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", f"{len(S):x}\r\n{S}\r\n0\r\n\r\n"),
            "200",  # then it may close: hostile.rs checks the first answer only
            post,
        ),
        (
            "absolute form vs Host",
            b"GET http://routed.example/p?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n",
            "200,200",
            [("GET", "/p?q=1")],
        ),
    ]
    # The body each accepted case must reach the server with.
    bodies = {
        "leading zeros": body.encode(),
        "two equal CL headers": body.encode(),
        "a list of equal values": body.encode(),
        "CL and TE chunked": S.encode(),
    }
    return refused, accepted, bodies


RESPONSE_CASES = [
    ("two different lengths", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 40\r\n\r\nok"),
    ("a length list of differing values", b"HTTP/1.1 200 OK\r\ncontent-length: 2, 40\r\n\r\nok"),
    ("a length with a sign", b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok"),
    ("CL with TE", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    ("TE xchunked", b"HTTP/1.1 200 OK\r\ntransfer-encoding: xchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    ("TE chunked not last", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
    (
        "101 to a request that asked for no upgrade",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: evil\r\nconnection: upgrade\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged",
    ),
    ("a NUL in a header", b"HTTP/1.1 200 OK\r\nx-a: a\0b\r\ncontent-length: 2\r\n\r\nok"),
]
RESPONSE_REQUEST = b"GET / HTTP/1.1\r\nHost: victim\r\n\r\n"

EARLY_413 = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!"
UPLOADS = 4
UPLOAD_BYTES = 4 << 20


def frame(kind, flags, stream, payload):
    n = len(payload)
    return bytes([(n >> 16) & 0xFF, (n >> 8) & 0xFF, n & 0xFF, kind, flags]) + stream.to_bytes(4, "big") + payload


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HPACK_GET = bytes([0x82, 0x86, 0x84, 0x41, 0x01, ord("v")])


def idle_cases():
    settings = frame(0x4, 0, 0, b"")
    preface_settings = PREFACE + settings
    # (name, bytes, HTTP/2 with prior knowledge?)
    return [
        ("a TCP connection that sends nothing", b"", False),
        ("a partial HTTP/1.1 head", b"GET / HTTP/1.1\r\nHost: v\r\n", False),
        ("an HTTP/1.1 keep-alive connection left idle", b"GET / HTTP/1.1\r\nHost: v\r\n\r\n", False),
        ("a partial HTTP/2 preface", b"PRI * HTTP/2.0\r\n", True),
        ("the preface alone", PREFACE, True),
        ("the preface and an empty SETTINGS frame", preface_settings, True),
        ("HEADERS without END_HEADERS", preface_settings + frame(0x1, 0x1, 1, HPACK_GET), True),
        ("an HTTP/2 connection idle after its request", preface_settings + frame(0x1, 0x5, 1, HPACK_GET), True),
        ("HTTP/1.0 keep-alive left idle", b"GET / HTTP/1.0\r\nHost: v\r\nConnection: keep-alive\r\n\r\n", False),
    ]


# ---------------------------------------------------------------------------------------------------------------
# The recording backend, a Python port of crates/testkit/src/raw.rs.

class Seen:
    def __init__(self, conn, head):
        self.conn = conn
        self.head = head.decode("utf-8", errors="replace")  # like raw.rs's String::from_utf8_lossy
        self.body = b""

    def line(self):
        return self.head.split("\r\n", 1)[0]

    def headers(self, name, raw=False):
        """Every value of header `name`, trimmed like raw.rs's (Unicode whitespace), or only of SP/HTAB if raw."""
        out = []
        for l in self.head.split("\r\n")[1:]:
            if ":" in l:
                n, v = l.split(":", 1)
                if n.strip().lower() == name:
                    out.append(v.strip(" \t") if raw else v.strip())
        return out


OK = ("keep", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


class Backend:
    """Records every request exactly as it arrived; `script(seen)` says what to answer: ("keep", bytes),
    ("close", bytes) or ("early", bytes) (as soon as the head arrived, without reading the body, then close)."""

    def __init__(self, script=lambda s: OK):
        self.script = script
        self.seen = []
        self.lock = threading.Lock()
        self.conns = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        n = 0
        while not self.closed:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(c)
            threading.Thread(target=self._serve, args=(n, c), daemon=True).start()
            n += 1

    def stop(self):
        self.closed = True
        for s in [self.sock] + self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def requests(self):
        with self.lock:
            return list(self.seen)

    def _serve(self, conn, s):
        s.settimeout(10)
        buf = bytearray()
        try:
            while True:
                head = read_head(s, buf)
                if head is None:
                    return
                seen = Seen(conn, head)
                kind, reply = self.script(seen)
                if kind == "early":
                    with self.lock:
                        self.seen.append(seen)
                    s.sendall(reply)
                    return  # closed with the body unread: the kernel resets the connection
                chunked = any("chunked" in v.lower() for v in seen.headers("transfer-encoding"))
                if chunked:
                    body = read_chunked(s, buf)
                else:
                    cl = seen.headers("content-length")
                    # Lenient on purpose: an unreadable length counts as no body.
                    n = int(cl[0]) if cl and cl[0].isascii() and cl[0].isdigit() else 0
                    body = read_exact(s, buf, n)
                if body is None:
                    return
                seen.body = body
                with self.lock:
                    self.seen.append(seen)
                s.sendall(reply)
                if kind == "close":
                    return
        except OSError:
            return
        finally:
            try:
                s.close()
            except OSError:
                pass


def fill(s, buf):
    try:
        chunk = s.recv(16384)
    except OSError:
        return False
    if not chunk:
        return False
    buf.extend(chunk)
    return True


def read_head(s, buf):
    while True:
        i = buf.find(b"\r\n\r\n")
        if i >= 0:
            head = bytes(buf[: i + 4])
            del buf[: i + 4]
            return head
        if len(buf) > 1 << 20 or not fill(s, buf):
            return None


def read_exact(s, buf, n):
    while len(buf) < n:
        if not fill(s, buf):
            return None
    out = bytes(buf[:n])
    del buf[:n]
    return out


def read_line(s, buf):
    while True:
        i = buf.find(b"\r\n")
        if i >= 0:
            line = bytes(buf[:i])
            del buf[: i + 2]
            return line
        if not fill(s, buf):
            return None


def read_chunked(s, buf):
    body = b""
    while True:
        line = read_line(s, buf)
        if line is None:
            return None
        size = line.split(b";")[0].strip()
        if not re.fullmatch(rb"[0-9a-fA-F]+", size):
            return None
        size = int(size, 16)
        if size == 0:
            while True:
                t = read_line(s, buf)
                if t is None:
                    return None
                if t == b"":
                    return body
        part = read_exact(s, buf, size)
        if part is None or read_line(s, buf) is None:
            return None
        body += part


# ---------------------------------------------------------------------------------------------------------------
# The client side.

def exchange(port, data, limit):
    """Sends `data` on a new connection and reads until the peer closes or `limit` passes.
    Returns (bytes, closed: bool, seconds)."""
    start = time.monotonic()
    s = socket.create_connection(("127.0.0.1", port), timeout=limit)
    out = bytearray()
    closed = False
    try:
        try:
            s.sendall(data)
        except OSError:
            pass  # the proxy may answer and close before taking everything; what it sent still counts
        deadline = start + limit
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            s.settimeout(left)
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            out.extend(chunk)
    finally:
        s.close()
    return bytes(out), closed, time.monotonic() - start


class Answer:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body


def answers(data):
    """Every complete response in `data`, framed by Content-Length or chunked; and what follows the last one."""
    out = []
    while data:
        i = data.find(b"\r\n\r\n")
        m = re.match(rb"HTTP/\d\.\d (\d{3})", data)
        if i < 0 or not m:
            return out, data
        lines = data[:i].decode("latin-1").split("\r\n")
        headers = []
        for l in lines[1:]:
            if ":" in l:
                n, v = l.split(":", 1)
                headers.append((n.strip().lower(), v.strip()))
        status = int(m.group(1))
        rest = data[i + 4 :]
        te = [v for n, v in headers if n == "transfer-encoding"]
        cl = [v for n, v in headers if n == "content-length"]
        if te and "chunked" in te[0].lower():
            got = dechunk(rest)
            if got is None:
                return out, data
            body, used = got
        else:
            n = int(cl[0]) if cl and re.fullmatch(r"\d+", cl[0]) else 0
            if len(rest) < n:
                return out, data
            body, used = rest[:n], n
        out.append(Answer(status, headers, body))
        data = rest[used:]
    return out, b""


def dechunk(rest):
    total = len(rest)
    body = b""
    while True:
        i = rest.find(b"\r\n")
        if i < 0:
            return None
        size = rest[:i].split(b";")[0].strip()
        if not re.fullmatch(rb"[0-9a-fA-F]+", size):
            return None
        size = int(size, 16)
        rest = rest[i + 2 :]
        if size == 0:
            j = rest.find(b"\r\n")
            if j < 0:
                return None
            rest = rest[j + 2 :]
            return body, total - len(rest)
        if len(rest) < size + 2:
            return None
        body += rest[:size]
        rest = rest[size + 2 :]


# ---------------------------------------------------------------------------------------------------------------
# The proxies: config files in the work directory, foreground processes in their own process groups.

STARTED = []  # Popen objects still running


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nonstop_config(work, port, backend, extra="", read_timeout=None):
    # hostile.rs's proxy(): one listener, a 1s header read timeout (also the keep-alive idle time), a 4096-byte
    # head, one route to the backend, health checks and the access log off; state_dir kept in the work directory.
    return (
        f'state_dir = "{work}/state"\n'
        f'[[listeners]]\nlisten = "127.0.0.1:{port}"\nheader_read_timeout_ms = {IDLE_MS}\n'
        f"header_bytes_max = {HEAD_MAX}\n"
        f'[[routes]]\nservice = "raw"\n[services.raw]\nservers = [{{ addr = "127.0.0.1:{backend}" }}]\n'
        + (f"response_timeout_ms = {read_timeout * 1000}\n" if read_timeout else "")
        + f"[services.raw.health]\nenabled = false\n{extra}[access_log]\nenabled = false\n"
    )


def nginx_config(work, port, h2port, backend, early=False, read_timeout=None):
    # nginx cannot be set exactly like nonstop:
    # - Its head limits are per line: a request line or one header line must fit one of
    #   large_client_header_buffers (4 x 4k here); the head as a whole may be up to 16k. nonstop's
    #   header_bytes_max = 4096 bounds the whole head. The 5000-byte header case exceeds both.
    # - nonstop's header_read_timeout_ms is the head deadline and the keep-alive idle time: nginx has
    #   client_header_timeout and keepalive_timeout for these, both 1s here. For HTTP/2 nginx 1.22 uses the same
    #   two (http2_recv_timeout and http2_idle_timeout are obsolete since 1.19.7).
    # - h2c with prior knowledge needs a listener of its own (`listen ... http2`, which then takes no HTTP/1.1).
    # - client_max_body_size 10m is nonstop's body_bytes_max default. For the early-413 case the body is streamed
    #   (proxy_request_buffering off), as nonstop streams it past retry.body_bytes_max and HAProxy by default;
    #   nonstop's passive ejection has no nginx equivalent with one server (max_fails is ignored then).
    h2 = f"    listen 127.0.0.1:{h2port} http2;\n" if h2port else ""
    return f"""worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log info;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {work}/client_body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  client_header_timeout {IDLE_MS}ms;
  keepalive_timeout {IDLE_MS}ms;
  client_header_buffer_size 1k;
  large_client_header_buffers 4 4k;
  client_max_body_size 10m;
  upstream raw {{ server 127.0.0.1:{backend}; keepalive 16; }}
  server {{
    listen 127.0.0.1:{port};
{h2}    location / {{
      proxy_pass http://raw;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
{"      proxy_request_buffering off;" if early else ""}
{f"      proxy_read_timeout {read_timeout}s;" if read_timeout else ""}
    }}
  }}
}}
"""


def haproxy_config(work, port, backend, read_timeout=None):
    # HAProxy cannot be set exactly like nonstop either:
    # - Its head limit is the buffer: a request head must fit tune.bufsize less tune.maxrewrite, less the HTX
    #   bookkeeping. 5120 - 1024 gives about nonstop's 4096 (a little less, as HTX adds a few bytes a header).
    # - timeout http-request 1s bounds the head (and the wait for the first byte); timeout http-keep-alive 1s the
    #   idle time between requests, HTTP/2 connections without a stream included. timeout client (30s, like
    #   nonstop's response_timeout_ms default; timeout server too) has no nonstop equivalent: it bounds a client
    #   that stops reading or sending in the middle of a request.
    # - It takes h2c with prior knowledge on the same listener (it detects the preface).
    # - No passive ejection: no `observe` on the server, like health checks off.
    return f"""global
  nbthread 1
  maxconn 256
  pidfile {work}/haproxy.pid
  tune.bufsize 5120
  tune.maxrewrite 1024
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server {read_timeout or 30}s
  timeout http-request {IDLE_MS}ms
  timeout http-keep-alive {IDLE_MS}ms
  http-reuse always
frontend f
  bind 127.0.0.1:{port}
  default_backend b
backend b
  server s1 127.0.0.1:{backend}
"""


class StartError(Exception):
    pass


class Proxy:
    """One proxy process in front of one backend, on fresh ports, with its files in `work`."""

    def __init__(self, kind, args, backend, early=False, h2=False, read_timeout=None):
        self.kind = kind
        n = len(os.listdir(args.work))
        self.work = os.path.join(args.work, f"{n:04d}-{kind}")
        os.makedirs(self.work)
        self.port = free_port()
        self.h2port = self.port
        if kind == "nonstop":
            extra = (
                "[services.raw.retry]\nbody_bytes_max = 1024\n[services.raw.eject]\nconsecutive_failures = 2\n"
                if early
                else ""
            )
            path = os.path.join(self.work, "nonstop.toml")
            with open(path, "w") as f:
                f.write(nonstop_config(self.work, self.port, backend.port, extra, read_timeout))
            cmd = [args.nonstop, "serve", "--config", path, "--threads", "1"]
            env = dict(os.environ, RUST_LOG="warn")
        elif kind == "nginx":
            self.h2port = free_port() if (h2 and args.nginx_h2) else None
            path = os.path.join(self.work, "nginx.conf")
            with open(path, "w") as f:
                f.write(nginx_config(self.work, self.port, self.h2port, backend.port, early, read_timeout))
            cmd = [args.nginx, "-p", self.work + "/", "-e", self.work + "/nginx-error.log", "-c", path,
                   "-g", "daemon off;"]
            env = None
        else:
            path = os.path.join(self.work, "haproxy.cfg")
            with open(path, "w") as f:
                f.write(haproxy_config(self.work, self.port, backend.port, read_timeout))
            cmd = [args.haproxy, "-f", path, "-db"]
            env = None
        self.log = os.path.join(self.work, "output.log")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True, env=env)
        STARTED.append(self.proc)
        with open(os.path.join(args.work, "pgids"), "a") as f:
            f.write(f"{self.proc.pid}\n")
        self._wait_ready()

    def _wait_ready(self):
        deadline = time.monotonic() + 10
        ports = [p for p in {self.port, self.h2port} if p]
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                for p in ports:
                    socket.create_connection(("127.0.0.1", p), timeout=1).close()
                time.sleep(0.05)
                if self.proc.poll() is None:
                    return
                break
            except OSError:
                time.sleep(0.05)
        self.stop()
        with open(self.log, errors="replace") as f:
            out = f.read()[-2000:]
        err = os.path.join(self.work, "nginx-error.log")
        if os.path.exists(err):
            with open(err, errors="replace") as f:
                out += f.read()[-2000:]
        raise StartError(f"{self.kind} did not start listening on 127.0.0.1:{self.port}:\n{out}")

    def stop(self):
        stop_proc(self.proc)


def stop_proc(proc):
    if proc.poll() is None:
        # Its own process group (start_new_session): nginx's master and workers, by their group id.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except OSError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait(timeout=5)
    # Workers left behind by a master that exited first.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    if proc in STARTED:
        STARTED.remove(proc)


def stop_all():
    for p in list(STARTED):
        stop_proc(p)


# ---------------------------------------------------------------------------------------------------------------
# Running the cases.

def printable(v):
    return "".join(c if 0x20 <= ord(c) < 0x7F else f"\\x{ord(c):02x}" for c in v)


def origin(target):
    m = re.match(r"https?://[^/]*(/.*)?$", target)
    return (m.group(1) or "/") if m else target


def backend_view(seen, sent, details=True, want_body=None):
    """'srv:...' of what the backend saw (less /__end), and whether it was smuggled."""
    parts, smuggled, extra = [], False, 0
    left = list(sent)
    for s in seen:
        line = s.line()
        bits = line.split(" ")
        method, target = (bits[0], bits[1]) if len(bits) >= 2 else (line, "")
        if origin(target) == "/__end":
            continue
        key = (method, origin(target))
        if "/smuggled" in target:
            smuggled = True
        elif key in left:
            left.remove(key)
        elif key in sent:
            extra += 1  # the same request again: a retry, not a smuggled one
        else:
            smuggled = True
        p = method if target == "/" else f"{method} {printable(target)}"
        if details:
            for h, short in (("content-length", "cl"), ("transfer-encoding", "te")):
                vals = s.headers(h, raw=True)
                if vals:
                    p += f" {short}=" + "/".join(printable(v) for v in vals)
            if key == ("GET", "/p?q=1"):
                p += " host=" + "/".join(s.headers("host"))
            if want_body is not None and method == "POST" and s.body != want_body:
                p += f" body={len(s.body)}B!"
            if "\0" in s.head:
                p += " NUL passed"
            if re.search(r"\r(?!\n)", s.head):
                p += " CR passed"
        parts.append(p)
    cell = "srv:" + (",".join(parts) if parts else "0")
    if extra:
        cell += " RETRIED"
    if smuggled:
        cell += " SMUGGLED"
    return cell, smuggled


def statuses(data, closed):
    got, rest = answers(data)
    parts = [str(a.status) for a in got]
    cut = re.match(rb"HTTP/\d\.\d (\d{3})", rest)
    if cut:
        parts.append(cut.group(1).decode() + " cut short")  # a head, then less body than it announced
    elif rest:
        parts.append(f"+{len(rest)}B")
    s = ",".join(parts) or "-"
    if not closed:
        s += " open"
    return s, got, rest


def run_request_case(kind, args, data, sent, want_body):
    backend = Backend()
    try:
        p = Proxy(kind, args, backend)
        try:
            got, closed, _ = exchange(p.port, data + END, CLIENT_LIMIT)
            time.sleep(0.1)  # a moment for a smuggled request to reach the backend
        finally:
            p.stop()
        st, _, _ = statuses(got, closed)
        view, smuggled = backend_view(backend.requests(), sent, want_body=want_body)
        return f"{st} | {view}", smuggled
    finally:
        backend.stop()


def run_response_case(kind, args, reply):
    backend = Backend(lambda s: OK if "/__end" in s.line() else ("keep", reply))
    try:
        # A proxy that waits for more of a malformed response (nginx buffers it until the server closes) gives up
        # after RESPONSE_READ_TIMEOUT, within the client's CLIENT_LIMIT, so that what it then sends is seen.
        p = Proxy(kind, args, backend, read_timeout=RESPONSE_READ_TIMEOUT)
        try:
            got, closed, _ = exchange(p.port, RESPONSE_REQUEST + END, CLIENT_LIMIT)
        finally:
            p.stop()
        st, resp, rest = statuses(got, closed)
        n = sum(1 for s in backend.requests() if "/__end" not in s.line())
        first = resp[0].status if resp else None
        cut = re.match(rb"HTTP/\d\.\d (\d{3})", rest)
        if first is None and cut:
            first = int(cut.group(1))
        reached = (first is not None and first < 500) or any(x in got for x in (b"forged", b"evil", b"\0"))
        cell = f"{st} | srv:{n}" + (" REACHED" if reached else "")
        return cell, reached
    finally:
        backend.stop()


def upload(port):
    """One early-413 upload: the head, then 4 MB while the answer is read. Returns the first answer or None."""
    s = socket.create_connection(("127.0.0.1", port), timeout=UPLOAD_LIMIT)
    head = f"POST /upload HTTP/1.1\r\nHost: v\r\nContent-Length: {UPLOAD_BYTES}\r\n\r\n".encode()
    out = bytearray()

    def writer():
        try:
            s.sendall(head)
            s.sendall(b"x" * UPLOAD_BYTES)
        except OSError:
            pass  # a reset of the upload is fine: the answer counts

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    deadline = time.monotonic() + UPLOAD_LIMIT
    try:
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            except OSError:
                break
            if not chunk:
                break
            out.extend(chunk)
            got, _ = answers(bytes(out))
            if got:
                break
    finally:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()
        t.join(timeout=5)
    got, _ = answers(bytes(out))
    return got[0] if got else None


def run_early_case(kind, args):
    backend = Backend(lambda s: ("early", EARLY_413) if s.line().startswith("POST") else OK)
    try:
        p = Proxy(kind, args, backend, early=True)
        try:
            results = []
            delivered = 0
            for _ in range(UPLOADS):
                a = upload(p.port)
                if a is None:
                    results.append("-")
                else:
                    ok = a.status == 413 and a.body == b"too big!"
                    delivered += ok
                    results.append(str(a.status) + ("" if ok or a.status != 413 else "*"))
            got, closed, _ = exchange(p.port, b"GET / HTTP/1.1\r\nHost: v\r\nConnection: close\r\n\r\n", CLIENT_LIMIT)
            st, _, _ = statuses(got, closed)
        finally:
            p.stop()
        return f"{','.join(results)} | then GET {st}", delivered
    finally:
        backend.stop()


def h2_frames(data):
    kinds = []
    while len(data) >= 9 and len(kinds) < 50:
        n = int.from_bytes(data[:3], "big")
        kinds.append(data[3])
        data = data[9 + n :]
    return kinds


def watch_idle(port, data, result, key):
    """Connects, sends `data`, and waits for the proxy to close, at most IDLE_CAP."""
    try:
        got, closed, secs = exchange(port, data, IDLE_CAP)
    except OSError as e:
        result[key] = (f"error {e}", False)
        return
    if not closed:
        result[key] = (f">{IDLE_CAP:.0f}s", False)
        return
    what = ""
    if got.startswith(b"HTTP/"):
        st, _, _ = statuses(got, True)
        what = " " + st
    elif got:
        kinds = h2_frames(got)
        what = " GOAWAY" if 0x7 in kinds else f" {len(got)}B"
    result[key] = (f"closed {secs:.1f}s{what}", True)


NOTE_REQUESTS = (
    "  cell: the statuses the client got, in order | srv: the requests the server saw besides /__end (cl=, te=: the\n"
    "  length headers it got; NUL/CR passed: the byte reached it). SMUGGLED: the server saw /smuggled or a request\n"
    "  the client did not send. 'open': the proxy had not closed after 5s."
)
NOTE_RESPONSES = (
    "  cell: the statuses the client got | srv: requests the server got besides /__end. REACHED: an answer made of\n"
    "  the server's malformed response (complete, or 'cut short': a head and less body than it announced) or its\n"
    "  bytes (forged, evil, a NUL) reached the client. RFC 9112 6.3 lets a proxy forward CL with TE once it dropped\n"
    "  the CL. The server read timeout is 2s in all three here, so that what a proxy holds on to shows up."
)
NOTE_EARLY = (
    "  cell: the first answer to each of the 4 uploads ('-': none; '*': a 413 without the server's body), then a GET.\n"
    "  The server's reset races its answer: nginx's and HAProxy's cells vary from run to run."
)
NOTE_IDLE = "  cell: when the proxy closed, and what it sent first: a status, or an HTTP/2 GOAWAY."


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--nonstop", required=True)
    ap.add_argument("--nginx", required=True)
    ap.add_argument("--haproxy", required=True)
    ap.add_argument("--nginx-h2", type=int, default=1)
    ap.add_argument("--cases", default="")
    args = ap.parse_args()
    pick = re.compile(args.cases, re.I) if args.cases else None

    def wanted(name):
        return pick is None or pick.search(name) is not None

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    refused, accepted, bodies = request_cases()
    summary = {k: {"smuggled": 0, "reached": 0, "idle": 0, "idle_n": 0, "early": 0} for k in PROXIES}
    counts = {"requests": 0, "responses": 0, "idle": 0, "early": 0}
    not_compared = []

    def show(title, header, rows, note=""):
        if not rows:
            return
        cols = ["case"] + list(PROXIES)
        if header:
            cols.insert(1, header)
        table = [cols] + rows
        widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
        lines = [f"== {title}"]
        for i, r in enumerate(table):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        if note:
            lines.append(note)
        text = "\n".join(lines)
        print(text + "\n", flush=True)

    for title, cases in (
        ("requests nonstop refuses (hostile.rs: that status, and nothing reaches the server)", refused),
        ("requests accepted and canonicalised (hostile.rs: 200,200 and the proxy's own length)", accepted),
    ):
        rows = []
        for name, data, expect, sent in cases:
            if not wanted(name):
                continue
            counts["requests"] += 1
            row = [name, expect]
            for kind in PROXIES:
                cell, smuggled = run_request_case(kind, args, data, sent, bodies.get(name))
                summary[kind]["smuggled"] += smuggled
                row.append(cell)
            rows.append(row)
        show(title, "nonstop must", rows, NOTE_REQUESTS)

    rows = []
    for name, reply in RESPONSE_CASES:
        if not wanted("response " + name):
            continue
        counts["responses"] += 1
        row = [name]
        for kind in PROXIES:
            cell, reached = run_response_case(kind, args, reply)
            summary[kind]["reached"] += reached
            row.append(cell)
        rows.append(row)
    show("malicious server responses to GET / (hostile.rs: 502,200, none of the server's bytes reach the client)",
         None, rows, NOTE_RESPONSES)

    if wanted("early 413"):
        counts["early"] = UPLOADS
        row = ["4 MB uploads, server answers 413 after the head and closes"]
        for kind in PROXIES:
            cell, delivered = run_early_case(kind, args)
            summary[kind]["early"] = delivered
            row.append(cell)
        show("early 413 (hostile.rs: 413 'too big!' each time, and the server is not counted as failing)", None, [row],
             NOTE_EARLY)

    idle = [c for c in idle_cases() if wanted(c[0])]
    if idle:
        counts["idle"] = len(idle)
        backends, proxies = {}, {}
        try:
            for kind in PROXIES:
                backends[kind] = Backend()
                proxies[kind] = Proxy(kind, args, backends[kind], h2=True)
            result, threads = {}, []
            for name, data, h2 in idle:
                for kind in PROXIES:
                    port = proxies[kind].h2port if h2 else proxies[kind].port
                    if port is None:
                        result[(name, kind)] = ("n/a (no h2c)", None)
                        continue
                    t = threading.Thread(target=watch_idle, args=(port, data, result, (name, kind)), daemon=True)
                    t.start()
                    threads.append(t)
            for t in threads:
                t.join(timeout=IDLE_CAP + 10)
        finally:
            for p in proxies.values():
                p.stop()
            for b in backends.values():
                b.stop()
        rows = []
        for name, _, _ in idle:
            row = [name]
            for kind in PROXIES:
                cell, closed = result.get((name, kind), ("no result", False))
                if closed is None:
                    not_compared.append(f"{kind}: {name} (nginx has no http2 module)")
                else:
                    summary[kind]["idle_n"] += 1
                    summary[kind]["idle"] += closed is False
                row.append(cell)
            rows.append(row)
        show(f"idle and stalled connections, all at once (hostile.rs: closed within {IDLE_MS * 4 // 1000}s; "
             f"watched for {IDLE_CAP:.0f}s)", None, rows, NOTE_IDLE)

    print("== summary")
    for kind in PROXIES:
        s = summary[kind]
        line = (f"{kind:8} smuggled requests reached the server in {s['smuggled']} of {counts['requests']} request "
                f"cases; malicious responses reached the client in {s['reached']} of {counts['responses']}; "
                f"idle connections not closed within {IDLE_CAP:.0f}s: {s['idle']} of {s['idle_n']}")
        if counts["early"]:
            line += f"; early 413 delivered {s['early']} of {counts['early']}"
        print(line)
    if not_compared:
        print("not compared: " + "; ".join(not_compared))
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except StartError as e:
        print(f"hostile.py: {e}", file=sys.stderr)
        code = 2
    finally:
        stop_all()
    sys.exit(code)
