#!/usr/bin/env python3
"""20 stalled 9 MB POSTs to a queue route (issue 17, finding 4): the proxy's resident memory before, while they
stall, after the proxy answered them and after the clients closed, and what each client got.

    python3 bench/queue_stalled_bodies.py [NONSTOP_BINARY]     # default target/release/nonstop

Starts `nonstop serve` on 127.0.0.1 with one queue route (its store in a temporary directory, removed at the end)
and a header read timeout of 5 s; each client sends its head and all but the last KiB of a 9 MB body, then
stalls. Prints one JSON line. Traffic goes to 127.0.0.1 only; everything started is stopped."""
import json, os, re, shutil, socket, subprocess, sys, tempfile, time

binary = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "target/release/nonstop")
clients, body = 20, 9 * 1024 * 1024
tmp = tempfile.mkdtemp(prefix="nonstop-stalled-")
config = f'''[[listeners]]
listen = "127.0.0.1:0"
header_read_timeout_ms = 5000
[[routes]]
path_prefix = "/orders"
service = "app"
queue = "orders"
[services.app]
servers = [{{ addr = "127.0.0.1:9" }}]
[services.app.health]
enabled = false
[access_log]
enabled = false
[queues.orders]
path = "{tmp}/q"
'''
open(f"{tmp}/c.toml", "w").write(config)
proxy = subprocess.Popen([binary, "serve", "--config", f"{tmp}/c.toml", "--threads", "1"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
try:
    host, port = re.search(r"listening on http://([0-9.]+):(\d+)", proxy.stdout.readline()).groups()

    def rss_mb():
        for line in open(f"/proc/{proxy.pid}/status"):
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024

    before = rss_mb()
    socks = []
    for _ in range(clients):
        s = socket.create_connection((host, int(port)))
        s.sendall(f"POST /orders HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  f"Content-Length: {body}\r\n\r\n".encode())
        try:
            s.sendall(b"x" * (body - 1024))
        except OSError:
            pass  # refused at once: the proxy answered and closed
        socks.append(s)
    time.sleep(2)
    stalled = rss_mb()
    answers = []
    for s in socks:
        s.settimeout(10)
        try:
            answers.append(s.recv(200).split(b"\r\n")[0].decode() or "closed without an answer")
        except OSError as e:
            answers.append(f"no answer in 10 s ({e})")
    answered = rss_mb()
    for s in socks:
        s.close()
    time.sleep(1)
    print(json.dumps({"rss_mb_before": before, "rss_mb_while_stalled": stalled, "rss_mb_after_answers": answered,
                      "rss_mb_after_close": rss_mb(), "answers": {a: answers.count(a) for a in sorted(set(answers))}}))
finally:
    proxy.kill()
    proxy.wait()
    shutil.rmtree(tmp, ignore_errors=True)
