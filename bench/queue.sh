#!/usr/bin/env bash
# Durable accepts per second, with 64 concurrent clients, on this machine, in one run: nonstop's queue with the
# embedded store (each 202 only after its fsync, many requests per fsync), nonstop's queue with the RabbitMQ
# backend (each 202 after the broker's publisher confirm), and a plain RabbitMQ publish-with-confirms loop
# (persistent messages to a quorum queue, pika from PyPI). Over ROUNDS rounds, alternating them, each runs
# DURATION; prints each run, the medians, and the ratio embedded/RabbitMQ (the target is at least 3).
# Behind nonstop, one `nonstop app` (SQLite) takes the deliveries meanwhile.
#
# Usage: bench/queue.sh [ROUNDS=3] [DURATION=10]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${2:-10}
WORK=$(mktemp -d /tmp/nonstop-bench-queue.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

python3 -c "import pika" 2>/dev/null || { echo "installing pika from PyPI"; pip install -q pika; }
if ! (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "starting RabbitMQ"; rabbitmq-server -detached
  for _ in $(seq 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && break; sleep 1; done
fi
. bench/nonstop-bin.sh
APP=19301; PROXY=19380; PROXY_RABBIT=19381

RUST_LOG=warn "$NONSTOP" app --listen 127.0.0.1:$APP --db "sqlite://$WORK/orders.db" --workers 8 > /dev/null & PIDS+=($!)
cat > "$WORK/nonstop.toml" <<CONF
[[listeners]]
listen = "127.0.0.1:$PROXY"
[[routes]]
path_prefix = "/orders"
methods = ["POST"]
service = "app"
queue = "orders"
[services.app]
servers = [{ addr = "127.0.0.1:$APP" }]
[queues.orders]
path = "$WORK/nonstop-data"
length_max = 10000000
bytes_max = 10000000000
[access_log]
enabled = false
CONF
RUST_LOG=warn "$NONSTOP" serve --config "$WORK/nonstop.toml" > /dev/null & PIDS+=($!)
sed -e "s/127.0.0.1:$PROXY/127.0.0.1:$PROXY_RABBIT/" -e 's/^\[queues.orders\]$/[queues.orders]\nstore = "rabbitmq"/' \
  -e "s|$WORK/nonstop-data|$WORK/nonstop-data-rabbit|" "$WORK/nonstop.toml" > "$WORK/nonstop-rabbit.toml"
RUST_LOG=warn "$NONSTOP" serve --config "$WORK/nonstop-rabbit.toml" > /dev/null & PIDS+=($!)
for p in $PROXY $PROXY_RABBIT; do
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done

BODY='{"item":"book","qty":1}'
cat > "$WORK/publish.py" <<'PY'
# 64 publishers (4 processes x 16 threads), each on its own connection with publisher confirms: every
# basic_publish returns once the broker confirmed the persistent message. Prints messages confirmed per second.
import multiprocessing, sys, threading, time
import pika

DURATION = float(sys.argv[1])
BODY = sys.argv[2].encode()
QUEUE = "nonstop-bench"

def thread_loop(stop_at, counts, i):
    conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    ch = conn.channel()
    ch.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    n = 0
    while time.monotonic() < stop_at:
        ch.basic_publish("", QUEUE, BODY, props, mandatory=True)
        n += 1
    counts[i] = n
    conn.close()

def process_loop(stop_at, out):
    counts = [0] * 16
    threads = [threading.Thread(target=thread_loop, args=(stop_at, counts, i)) for i in range(16)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    out.put(sum(counts))

if __name__ == "__main__":
    setup = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    ch = setup.channel()
    ch.queue_declare(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_purge(QUEUE)
    setup.close()
    stop_at = time.monotonic() + DURATION
    out = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=process_loop, args=(stop_at, out)) for _ in range(4)]
    [p.start() for p in procs]
    total = sum(out.get() for _ in procs)
    [p.join() for p in procs]
    setup = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", 5672))
    setup.channel().queue_delete(QUEUE)
    setup.close()
    print(f"{total / DURATION:.0f}")
PY

nonstop_run() { # port
  local json="$WORK/run.json"
  "$NONSTOP" load "http://127.0.0.1:$1/orders" --connections 64 --duration "${DURATION}s" -X POST \
    -H "content-type: application/json" --body "$BODY" --json "$json" > /dev/null || true
  python3 -c "
import json; d = json.load(open('$json'))
accepted = d['status'].get('202', 0)
assert accepted == d['requests']['scheduled'], d['status']
print(round(accepted / d['duration_s']))"
}
rabbit_run() { python3 "$WORK/publish.py" "$DURATION" "$BODY"; }

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
N=(); Q=(); R=()
for round in $(seq "$ROUNDS"); do
  n=$(nonstop_run $PROXY); q=$(nonstop_run $PROXY_RABBIT); r=$(rabbit_run)
  echo "round $round: nonstop embedded $n 202/s   nonstop on RabbitMQ $q 202/s   RabbitMQ publish+confirm $r msg/s"
  N+=("$n"); Q+=("$q"); R+=("$r")
done
MN=$(printf '%s\n' "${N[@]}" | median); MQ=$(printf '%s\n' "${Q[@]}" | median); MR=$(printf '%s\n' "${R[@]}" | median)
echo "median: nonstop embedded $MN 202/s, nonstop on RabbitMQ $MQ 202/s, RabbitMQ publish+confirm $MR msg/s"
echo "RATIO nonstop_embedded/rabbitmq_confirmed $(awk -v a="$MN" -v b="$MR" 'BEGIN {printf "%.2f", a/b}')"
echo "RATIO nonstop_rabbitmq/rabbitmq_confirmed $(awk -v a="$MQ" -v b="$MR" 'BEGIN {printf "%.2f", a/b}')"
