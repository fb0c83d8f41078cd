#!/usr/bin/env bash
# Throughput of nonstop's proxy beside nginx and HAProxy, on this machine, in one run.
#
# A static nginx backend (worker_processes 1, two server blocks answering `return 200`) sits behind each proxy:
#   nonstop serve --threads T, nginx (worker_processes T, upstream keepalive 64), HAProxy (nbthread T,
#   http-reuse always), and the backend hit directly. Over ROUNDS rounds, alternating the targets, each gets
#   `wrk -tT -c64 -dDURATION`. Prints requests/s and p99 per run, and the median ratios nonstop/nginx and
#   nonstop/HAProxy, for T=1 and T=2. The machine is shared and noisy: read the ratios, not the absolutes.
#
# Usage: bench/proxy.sh [ROUNDS=3] [DURATION=10s]
# Each run measures three settings: access logs off, then on (nginx: combined, buffer=64k flush=1s; HAProxy: httplog
# to its stdout, a file; nonstop: its default JSON lines to a file, LOG_FORMAT=combined for nginx's), then a rate
# limit per client address on, with logs off, set high enough (10^6 requests/s) that every request is checked and
# counted but none refused: nginx limit_req in a 10 MB zone, HAProxy a stick table tracking http_req_rate, nonstop
# [routes.rate_limit]. wrk's connections all come from one address, so all three count on one key. Then gzip on,
# with logs off: wrk asks for /page.json (a 7.5 KiB JSON file the backend serves as it is) with Accept-Encoding: gzip,
# and each proxy compresses it at level 4 (nginx gzip_comp_level 4, gzip_proxied any; HAProxy `compression algo
# gzip`, its own libslz, which has no levels; nonstop [routes.compress] codings = ["gzip"], level 4). The script
# checks that each answers with Content-Encoding: gzip before measuring. LOGS=off, on, ratelimit or gzip picks
# some ("off gzip").
#
# PLACEMENT=alone|client|backend pins the processes (taskset), one thread each, to see one placement at a time:
# the proxy on CPU 1 alone (wrk and the backend on CPU 0), sharing CPU 1 with wrk, or sharing it with the
# backend. Unpinned, the scheduler moves between these, and that is most of the noise between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${2:-10s}
WORK=$(mktemp -d /tmp/nonstop-bench-proxy.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

. bench/packages.sh
need nginx=nginx-light haproxy=haproxy wrk=wrk
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

. bench/nonstop-bin.sh

B1=18101; B2=18102; P_NGINX=18201; P_HAPROXY=18202; P_NONSTOP=18203

PLACEMENT=${PLACEMENT:-}
THREADS=${THREADS:-"1 2"}; WRK=(wrk)
case $PLACEMENT in
  "") ;;
  alone) THREADS=1; WRK=(taskset -c 0 wrk); PROXY_CPU=1; BACKEND_CPU=0 ;;
  client) THREADS=1; WRK=(taskset -c 1 wrk); PROXY_CPU=1; BACKEND_CPU=0 ;;
  backend) THREADS=1; WRK=(taskset -c 0 wrk); PROXY_CPU=1; BACKEND_CPU=1 ;;
  *) echo "PLACEMENT must be alone, client or backend, not '$PLACEMENT'" >&2; exit 2 ;;
esac
if [ -n "$PLACEMENT" ] && [ "$(nproc)" -lt 2 ]; then
  echo "PLACEMENT needs two CPUs; this machine has $(nproc)" >&2; exit 2
fi

# The backend: static nginx, one worker, two server blocks.
mkdir -p "$WORK/backend"
cat > "$WORK/backend/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/backend/nginx.pid;
error_log $WORK/backend/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:$B1 reuseport; location / { return 200 "ok\n"; } location = /page.json { root $WORK/backend; default_type application/json; } }
  server { listen 127.0.0.1:$B2 reuseport; location / { return 200 "ok\n"; } location = /page.json { root $WORK/backend; default_type application/json; } }
}
CONF
# A JSON page of 7.5 KiB, of varied text (as an API's answer), for the gzip setting; nginx's workers run as
# nobody, so they must be able to read it (mktemp -d makes a private directory).
chmod 755 "$WORK" "$WORK/backend"
awk 'BEGIN { printf "["; for (i = 0; i < 120; i++) printf "%s{\"id\":%d,\"name\":\"item %d\",\"price\":%d.%02d,\"tags\":[\"t%d\",\"c%d\"]}", (i ? "," : ""), i, i * 7919 % 10007, i * 37 % 500, i % 100, i % 13, i % 7; print "]" }' > "$WORK/backend/page.json"
"$NGINX" -c "$WORK/backend/nginx.conf" -g 'daemon off;' & BACKEND_PID=$!; PIDS+=($BACKEND_PID)

start_proxies() { # threads logs(off|on)
  local t=$1 logs=$2
  local nginx_log="access_log off;" haproxy_log="" nonstop_log="enabled = false" haproxy_out=/dev/null
  local nginx_zone="" nginx_limit="" haproxy_limit="" nonstop_limit="" nginx_gzip="" haproxy_gzip=""
  if [ "$logs" = ratelimit ]; then
    nginx_zone="limit_req_zone \$binary_remote_addr zone=perip:10m rate=1000000r/s; limit_req_status 429;"
    nginx_limit="limit_req zone=perip burst=1000000 nodelay;"
    haproxy_limit=$'  stick-table type ip size 100k expire 30s store http_req_rate(1s)\n  http-request track-sc0 src\n  http-request deny deny_status 429 if { sc_http_req_rate(0) gt 1000000 }'
    nonstop_limit=$'[routes.rate_limit]\nrequests_per_s = 1000000\nburst = 1000000'
  fi
  if [ "$logs" = gzip ]; then
    nginx_gzip="gzip on; gzip_types application/json; gzip_comp_level 4; gzip_proxied any; gzip_min_length 1024; gzip_vary on;"
    haproxy_gzip=$'  compression algo gzip\n  compression type application/json'
    nonstop_limit=$'[routes.compress]\ncodings = ["gzip"]'
  fi
  rm -rf "$WORK/logs"; mkdir -p "$WORK/logs"
  if [ "$logs" = on ]; then
    # What people run: nginx's combined format, buffered; HAProxy's httplog to its stdout (a file here);
    # nonstop's default JSON lines (LOG_FORMAT=combined for nginx's format).
    nginx_log="access_log $WORK/logs/nginx.log combined buffer=64k flush=1s;"
    haproxy_log=$'  log stdout format raw local0\n  option httplog'
    haproxy_out=$WORK/logs/haproxy.log
    nonstop_log="path = \"$WORK/logs/nonstop.log\"
format = \"${LOG_FORMAT:-json}\""
  fi
  mkdir -p "$WORK/nginx$t"
  cat > "$WORK/nginx$t/nginx.conf" <<CONF
worker_processes $t;
pid $WORK/nginx$t/nginx.pid;
error_log $WORK/nginx$t/error.log warn;
events { worker_connections 4096; }
http {
  $nginx_log
  $nginx_zone
  $nginx_gzip
  keepalive_requests 1000000;
  upstream app { server 127.0.0.1:$B1; server 127.0.0.1:$B2; keepalive 64; }
  server {
    listen 127.0.0.1:$P_NGINX reuseport;
    location / { $nginx_limit proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
  "$NGINX" -c "$WORK/nginx$t/nginx.conf" -g 'daemon off;' & NGINX_PID=$!; PIDS+=($NGINX_PID)
  cat > "$WORK/haproxy$t.cfg" <<CONF
global
  nbthread $t
  maxconn 4096
defaults
  mode http
$haproxy_log
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:$P_HAPROXY
$haproxy_limit
  default_backend b
backend b
$haproxy_gzip
  balance roundrobin
  server s1 127.0.0.1:$B1
  server s2 127.0.0.1:$B2
CONF
  "$HAPROXY" -f "$WORK/haproxy$t.cfg" -db > "$haproxy_out" 2>&1 & HAPROXY_PID=$!; PIDS+=($HAPROXY_PID)
  cat > "$WORK/nonstop$t.toml" <<CONF
[[listeners]]
listen = "127.0.0.1:$P_NONSTOP"
[[routes]]
service = "app"
$nonstop_limit
[services.app]
servers = [{ addr = "127.0.0.1:$B1" }, { addr = "127.0.0.1:$B2" }]
[access_log]
$nonstop_log
${NONSTOP_EXTRA:-}
CONF
  RUST_LOG=warn "$NONSTOP" serve --config "$WORK/nonstop$t.toml" --threads "$t" > /dev/null & NONSTOP_PID=$!; PIDS+=($NONSTOP_PID)
  sleep 1
  if [ -n "$PLACEMENT" ]; then
    # Every thread of every process; nginx's workers are its master's children.
    for pid in $BACKEND_PID $(pgrep -P "$BACKEND_PID"); do taskset -a -pc "$BACKEND_CPU" "$pid" >/dev/null; done
    for pid in $NGINX_PID $(pgrep -P "$NGINX_PID") $HAPROXY_PID $NONSTOP_PID; do
      taskset -a -pc "$PROXY_CPU" "$pid" >/dev/null
    done
  fi
}

stop_proxies() {
  kill "$NGINX_PID" "$HAPROXY_PID" "$NONSTOP_PID" 2>/dev/null || true
  wait "$NGINX_PID" "$HAPROXY_PID" "$NONSTOP_PID" 2>/dev/null || true
}

# What wrk asks for: / with no extra header, or (the gzip setting) /page.json accepting gzip.
BENCH_PATH=/; WRK_HEADERS=()

# Prints "RPS P99_MS" for one wrk run.
measure() { # threads port
  local out; out=$("${WRK[@]}" -t"$1" -c64 -d"$DURATION" --latency "${WRK_HEADERS[@]}" "http://127.0.0.1:$2$BENCH_PATH" 2>&1)
  local rps p99
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
  p99=$(awk '$1=="99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v=v/1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v=v*1000}; print v}' <<<"$out")
  local errs; errs=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  echo "${rps:-0} ${p99:-0} ${errs}"
}

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }

echo "bench/proxy.sh: $ROUNDS rounds of wrk -c64 -d$DURATION per target, targets alternated within each round${PLACEMENT:+, placement $PLACEMENT}"
for logs in ${LOGS:-off on ratelimit gzip}; do
for t in $THREADS; do
  start_proxies "$t" "$logs"
  BENCH_PATH=/; WRK_HEADERS=()
  if [ "$logs" = gzip ]; then
    BENCH_PATH=/page.json; WRK_HEADERS=(-H "Accept-Encoding: gzip")
    for port in $P_NONSTOP $P_NGINX $P_HAPROXY; do
      enc=$(curl -s -o /dev/null -D - -H 'Accept-Encoding: gzip' "http://127.0.0.1:$port/page.json" | tr -d '\r' | awk -F': ' 'tolower($1)=="content-encoding" {print $2}')
      [ "$enc" = gzip ] || { echo "the proxy on port $port did not gzip /page.json (Content-Encoding: '$enc'):" >&2; curl -s -D - -o /dev/null -H 'Accept-Encoding: gzip' "http://127.0.0.1:$port/page.json" >&2; exit 1; }
    done
    echo "page.json: $(stat -c %s "$WORK/backend/page.json") bytes, gzipped by nonstop to $(curl -s -H 'Accept-Encoding: gzip' "http://127.0.0.1:$P_NONSTOP/page.json" | wc -c), by nginx to $(curl -s -H 'Accept-Encoding: gzip' "http://127.0.0.1:$P_NGINX/page.json" | wc -c), by HAProxy to $(curl -s -H 'Accept-Encoding: gzip' "http://127.0.0.1:$P_HAPROXY/page.json" | wc -c)"
  fi
  declare -A RPS=() ratio_row_rps=()
  RATIO_NGINX=""; RATIO_HAPROXY=""
  echo
  case $logs in
    ratelimit) echo "== a rate limit per client address on (not reached), access logs off; $t thread(s)/worker(s) each; wrk -t$t" ;;
    gzip) echo "== gzip on (level 4; HAProxy: libslz), /page.json, access logs off; $t thread(s)/worker(s) each; wrk -t$t" ;;
    *) echo "== access logs $logs; $t thread(s)/worker(s) each; wrk -t$t" ;;
  esac
  printf '%-6s %-9s %12s %10s  %s\n' round target 'requests/s' 'p99 ms' notes
  for r in $(seq 1 "$ROUNDS"); do
    # Rotate the order every round so that no target always runs first or last.
    targets=(nonstop nginx haproxy direct)
    shift_by=$(( (r - 1) % 4 ))
    order=("${targets[@]:$shift_by}" "${targets[@]:0:$shift_by}")
    for target in "${order[@]}"; do
      case $target in
        nonstop) port=$P_NONSTOP ;; nginx) port=$P_NGINX ;; haproxy) port=$P_HAPROXY ;; direct) port=$B1 ;;
      esac
      read -r rps p99 notes <<<"$(measure "$t" "$port")"
      RPS[$target]+="$rps "
      ratio_row_rps["$target,$r"]=$rps
      printf '%-6s %-9s %12s %10s  %s\n' "$r" "$target" "$rps" "$p99" "$notes"
    done
    n=${ratio_row_rps["nonstop,$r"]}
    RATIO_NGINX+="$(awk -v a="$n" -v b="${ratio_row_rps["nginx,$r"]}" 'BEGIN {printf "%.3f", a/b}') "
    RATIO_HAPROXY+="$(awk -v a="$n" -v b="${ratio_row_rps["haproxy,$r"]}" 'BEGIN {printf "%.3f", a/b}') "
  done
  for target in nonstop nginx haproxy direct; do
    printf 'median %-9s %12s requests/s\n' "$target" "$(tr ' ' '\n' <<<"${RPS[$target]}" | grep . | median)"
  done
  printf 'RATIO logs=%s threads=%s nonstop/nginx   median %s  (per round: %s)\n' "$logs" "$t" "$(tr ' ' '\n' <<<"$RATIO_NGINX" | grep . | median)" "$RATIO_NGINX"
  printf 'RATIO logs=%s threads=%s nonstop/haproxy median %s  (per round: %s)\n' "$logs" "$t" "$(tr ' ' '\n' <<<"$RATIO_HAPROXY" | grep . | median)" "$RATIO_HAPROXY"
  RATIO_NGINX=""; RATIO_HAPROXY=""
  if [ "$logs" = on ]; then
    for f in nginx haproxy nonstop; do printf 'log %-8s %10s lines %8s KiB\n' "$f" "$(wc -l < "$WORK/logs/$f.log")" "$(( $(stat -c %s "$WORK/logs/$f.log") / 1024 ))"; done
  fi
  stop_proxies
done
done
