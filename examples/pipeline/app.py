"""The example app a nonstop pipeline builds, tests and deploys.

    python3 app.py --port PORT --version VERSION

GET /health answers 200 "ok"; GET / answers 200 "hello from VERSION" with the header X-App-Version, after
settings.json's delay_ms (the file next to this one, read once at start); POST /orders answers 201. HTTP/1.1 with keep-alive and a
Content-Length on every answer. SIGTERM: stop accepting, finish the requests in flight, exit 0.
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The artifact directory is shared by every instance and kept by content: write nothing into it.
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import greeting  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load_settings():
    try:
        with open(os.path.join(HERE, "settings.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


class State:
    version = "dev"
    delay = 0.0
    stopping = False
    lock = threading.Lock()
    handlers = set()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "nonstop-example/1"

    def setup(self):
        super().setup()
        self.busy = False
        with State.lock:
            State.handlers.add(self)

    def finish(self):
        with State.lock:
            State.handlers.discard(self)
        super().finish()

    def parse_request(self):
        # A request has been read: from here until its answer is written, shutdown waits for it.
        self.busy = True
        return super().parse_request()

    def handle_one_request(self):
        super().handle_one_request()
        self.busy = False
        if State.stopping:
            self.close_connection = True

    def answer(self, status, body, headers=()):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        if State.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self.answer(200, "ok")
        elif path == "/":
            if State.delay:
                time.sleep(State.delay)
            self.answer(200, greeting.greet(State.version), [("X-App-Version", State.version)])
        else:
            self.answer(404, "not found\n")

    do_HEAD = do_GET

    def do_POST(self):
        # POST /orders: what the example config's queue delivers; the body is read and acknowledged.
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        if self.path.split("?", 1)[0] == "/orders":
            self.answer(201, "accepted\n")
        else:
            self.answer(404, "not found\n")

    def log_message(self, format, *args):
        pass


class Server(ThreadingHTTPServer):
    # server_close() joins the handler threads: the requests in flight are finished before the exit.
    daemon_threads = False
    block_on_close = True


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--version", required=True)
    args = p.parse_args()
    State.version = args.version
    State.delay = greeting.delay_seconds(load_settings())
    server = Server(("127.0.0.1", args.port), Handler)

    def stop(signum, frame):
        State.stopping = True
        # shutdown() waits for serve_forever, which runs on this (the main) thread: call it from another.
        threading.Thread(target=server.shutdown, daemon=True).start()
        # Idle keep-alive connections would wait for a next request forever: end them; a busy one closes after
        # its answer (Connection: close).
        with State.lock:
            idle = [h for h in State.handlers if not h.busy]
        for h in idle:
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print("example app %s listening on http://127.0.0.1:%d" % (args.version, args.port), file=sys.stderr, flush=True)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
