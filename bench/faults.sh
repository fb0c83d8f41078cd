#!/usr/bin/env bash
# The five fault scenarios of crates/nonstop/tests/faults.rs, run against nginx, HAProxy and nonstop on this
# machine, each configured as well as it can be:
#   nginx:   proxy_next_upstream (error, timeout, 502/503/504, non_idempotent with an Idempotency-Key from
#            $request_id), max_fails/fail_timeout, backup, 1 s per-try timeouts;
#   HAProxy: retries 3, option redispatch, retry-on all-retryable-errors, maxconn per server with timeout queue 10s,
#            http checks with observe layer7, backup, an Idempotency-Key from uuid(), 1 s per-try timeouts;
#   nonstop: its defaults, plus the health path, add_idempotency_key, server_in_flight_max and a 1 s per-try timeout.
# Behind each: three `nonstop app --work-ms 5 --workers 2` on one SQLite file (and a fourth as backup). In front:
# `nonstop load` at 300 requests/s, half GET /, half POST /orders, accounting for every request.
#   kill9:    kill -9 one server at 3 s of 8 s
#   sigstop:  SIGSTOP one server from 2 s to 12 s of 16 s
#   alldown:  all three servers killed at 2 s, restarted at 7 s, of 14 s
#   backup:   the same with a backup server configured, 16 s
#   overload: four times the capacity (measured through nonstop) for 10 s; a 503 with Retry-After is not a failure
# Prints one table of failed requests out of the total (and, for overload, the 2xx throughput).
#
# Usage: bench/faults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /tmp/nonstop-bench-faults.XXXXXX)
PIDS=()
# nginx's master must get TERM: killed outright, it would leave its workers holding the port.
cleanup() { for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

. bench/packages.sh
need nginx=nginx-light haproxy=haproxy
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
. bench/nonstop-bin.sh

PROXY=19080
APPS=(19101 19102 19103)
BACKUP=19104

cat > "$WORK/mix.toml" <<'TOML'
[[flow]]
name = "read"
[[flow.step]]
url = "/"

[[flow]]
name = "order"
[[flow.step]]
method = "POST"
url = "/orders"
json = { item = "book-{{seq}}", qty = 1 }
TOML

declare -A APP_PID
start_app() { # port instance db
  RUST_LOG=warn "$NONSTOP" app --listen "127.0.0.1:$1" --instance "$2" --db "sqlite://$3" --work-ms 5 --workers 2 \
    > /dev/null 2>&1 &
  APP_PID[$1]=$!; PIDS+=($!)
}
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
kill_app() { [ -n "${APP_PID[$1]:-}" ] && kill -"${2:-9}" "${APP_PID[$1]}" 2>/dev/null || true; }

start_proxy() { # kind backup(0|1) dir
  local kind=$1 with_backup=$2 dir=$3 servers="" b=""
  case $kind in
    nginx)
      for p in "${APPS[@]}"; do servers+="    server 127.0.0.1:$p max_fails=1 fail_timeout=2s;"$'\n'; done
      [ "$with_backup" = 1 ] && servers+="    server 127.0.0.1:$BACKUP backup;"$'\n'
      cat > "$dir/nginx.conf" <<CONF
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/error.log crit;
events { worker_connections 8192; }
http {
  access_log off;
  upstream app {
$servers    keepalive 64;
  }
  server {
    listen 127.0.0.1:$PROXY;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Idempotency-Key \$request_id;
      proxy_connect_timeout 1s;
      proxy_read_timeout 1s;
      proxy_send_timeout 1s;
      proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
      proxy_next_upstream_tries 3;
    }
  }
}
CONF
      "$NGINX" -c "$dir/nginx.conf" -g 'daemon off;' > "$dir/proxy.log" 2>&1 & PROXY_PID=$! ;;
    haproxy)
      for i in "${!APPS[@]}"; do
        servers+="  server s$i 127.0.0.1:${APPS[$i]} maxconn 2 check inter 1s fall 2 rise 2 observe layer7 error-limit 5 on-error mark-down"$'\n'
      done
      [ "$with_backup" = 1 ] && servers+="  server b 127.0.0.1:$BACKUP maxconn 2 check inter 1s fall 2 rise 2 backup"$'\n'
      cat > "$dir/haproxy.cfg" <<CONF
global
  nbthread 2
  maxconn 9000
defaults
  mode http
  timeout connect 1s
  timeout client 60s
  timeout server 1s
  timeout queue 10s
  retries 3
  option redispatch 1
  retry-on all-retryable-errors
  http-reuse safe
frontend f
  bind 127.0.0.1:$PROXY
  option http-buffer-request
  default_backend b
backend b
  balance roundrobin
  option httpchk GET /health
  http-request set-header Idempotency-Key %[uuid]
$servers
CONF
      "$HAPROXY" -f "$dir/haproxy.cfg" -db > "$dir/proxy.log" 2>&1 & PROXY_PID=$! ;;
    nonstop)
      for p in "${APPS[@]}"; do servers+="{ addr = \"127.0.0.1:$p\" }, "; done
      [ "$with_backup" = 1 ] && servers+="{ addr = \"127.0.0.1:$BACKUP\", backup = true }, "
      cat > "$dir/nonstop.toml" <<CONF
[[listeners]]
listen = "127.0.0.1:$PROXY"
[[routes]]
service = "app"
[services.app]
response_timeout_ms = 1000
servers = [${servers%, }]
[services.app.health]
path = "/health"
[services.app.retry]
add_idempotency_key = true
[services.app.admission]
server_in_flight_max = 2
[access_log]
enabled = false
CONF
      RUST_LOG=error "$NONSTOP" serve --config "$dir/nonstop.toml" --threads 2 > "$dir/proxy.log" 2>&1 & PROXY_PID=$! ;;
  esac
  PIDS+=($PROXY_PID)
  wait_port $PROXY || { echo "$kind did not start:"; cat "$dir/proxy.log" "$dir"/*.cfg "$dir"/*.conf 2>/dev/null; exit 1; }
}

# Runs `nonstop load` in the background; its JSON goes to $1.
load_bg() { # json args...
  local json=$1; shift
  RUST_LOG=error "$NONSTOP" load "http://127.0.0.1:$PROXY" --scenario "$WORK/mix.toml" --timeout 30s \
    --connections 4000 --json "$json" "$@" > /dev/null 2>&1 &
  LOAD_PID=$!
}

# "failed/total" from a load JSON; in overload mode a 503 is not a failure.
failed_of() { # json mode
  python3 - "$1" "$2" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
total = d["requests"]["scheduled"]
if sys.argv[2] == "overload":
    good = sum(v for k, v in d["status"].items() if k.startswith("2") or k == "503")
    ok2 = sum(v for k, v in d["status"].items() if k.startswith("2"))
    print(f"{total - good}/{total} ({ok2 / d['duration_s'] if d.get('duration_s') else ok2 / 10:.0f} 2xx/s)")
else:
    print(f"{d['requests']['failed']}/{total}")
PY
}

run_scenario() { # scenario kind
  local sc=$1 kind=$2 dir="$WORK/$1-$2"
  mkdir -p "$dir"
  local db="$dir/orders.db"
  while (exec 3<>/dev/tcp/127.0.0.1/$PROXY) 2>/dev/null; do sleep 0.1; done # the previous proxy is gone
  for i in "${!APPS[@]}"; do start_app "${APPS[$i]}" "app$i" "$db"; done
  [ "$sc" = backup ] && start_app $BACKUP backup "$db"
  for p in "${APPS[@]}"; do wait_port "$p"; done
  start_proxy "$kind" "$([ "$sc" = backup ] && echo 1 || echo 0)" "$dir"
  sleep 2 # first health checks
  local json="$dir/load.json" mode=steady
  case $sc in
    kill9)
      load_bg "$json" --rate 300 --duration 8s
      sleep 3; kill_app "${APPS[1]}" ;;
    sigstop)
      load_bg "$json" --rate 300 --duration 16s
      sleep 2; kill_app "${APPS[0]}" STOP; sleep 10; kill_app "${APPS[0]}" CONT ;;
    alldown|backup)
      load_bg "$json" --rate 300 --duration "$([ "$sc" = backup ] && echo 16s || echo 14s)"
      sleep 2; for p in "${APPS[@]}"; do kill_app "$p"; done
      sleep 5; for i in "${!APPS[@]}"; do start_app "${APPS[$i]}" "app$i" "$db"; done ;;
    overload)
      mode=overload
      load_bg "$json" --rate "$OVERLOAD_RATE" --duration 10s ;;
  esac
  wait "$LOAD_PID" || true
  RESULT=$(failed_of "$json" "$mode")
  kill -TERM "$PROXY_PID" 2>/dev/null || true
  for p in "${APPS[@]}" $BACKUP; do kill_app "$p" 9; kill_app "$p" CONT; done
  wait 2>/dev/null || true
}

# Capacity, measured through nonstop (it queues instead of overflowing the servers).
mkdir -p "$WORK/capacity"
for i in "${!APPS[@]}"; do start_app "${APPS[$i]}" "app$i" "$WORK/capacity/orders.db"; done
for p in "${APPS[@]}"; do wait_port "$p"; done
start_proxy nonstop 0 "$WORK/capacity"
sleep 1
RUST_LOG=error "$NONSTOP" load "http://127.0.0.1:$PROXY" --scenario "$WORK/mix.toml" --connections 32 --duration 5s \
  --json "$WORK/capacity/load.json" > /dev/null
CAPACITY=$(python3 -c "import json; print(round(json.load(open('$WORK/capacity/load.json'))['rate']['achieved']))")
OVERLOAD_RATE=$((CAPACITY * 4))
kill -TERM "$PROXY_PID"; for p in "${APPS[@]}"; do kill_app "$p"; done; wait 2>/dev/null || true
echo "capacity through nonstop: $CAPACITY requests/s; overload offers $OVERLOAD_RATE requests/s"

declare -A TABLE
for sc in kill9 sigstop alldown backup overload; do
  for kind in nginx haproxy nonstop; do
    run_scenario "$sc" "$kind"
    TABLE[$sc,$kind]=$RESULT
    echo "$sc $kind: $RESULT"
  done
done

echo
echo "failed requests / total (overload: anything but 2xx or 503; 2xx throughput in brackets)"
printf '%-10s %-24s %-24s %-24s\n' scenario nginx HAProxy nonstop
for sc in kill9 sigstop alldown backup overload; do
  printf '%-10s %-24s %-24s %-24s\n' "$sc" "${TABLE[$sc,nginx]}" "${TABLE[$sc,haproxy]}" "${TABLE[$sc,nonstop]}"
done
