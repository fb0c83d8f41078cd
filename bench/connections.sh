#!/usr/bin/env bash
# Memory per idle keep-alive client connection in nonstop's proxy beside nginx and HAProxy, on this machine.
#
# One tiny backend (`nonstop app`, GET / answers 50 bytes of JSON with Content-Length) sits behind each proxy,
# each started fresh with one worker for every measurement: nonstop serve --threads 1, nginx worker_processes 1,
# HAProxy nbthread 1; each configured to hold N connections and to keep an idle client for an hour. A proxy is
# warmed (a few requests, and 100 connections opened and closed), its memory read, then bench/hold_connections.py
# opens N connections through it (32 at a time, from 127.0.0.2, 127.0.0.3, ...), sends one GET on each, reads the
# 200, and holds them all idle; its memory is read again, and
#   bytes per connection = (after - before) / N,
# memory being the anonymous part of the Pss (Pss_Anon in /proc/PID/smaps_rollup: the heap, where connections
# live) of the process that serves the clients: nonstop's process, nginx's worker (not its master), HAProxy's
# process. The whole Pss before is printed beside it. While the N connections are held, a fresh curl request is
# sent through the proxy, and the helper checks that the proxy closed none of them. Over ROUNDS rounds, the order
# of the peers rotates. Prints every round, the median per peer, and the ratios nonstop/nginx and
# nonstop/haproxy of the medians.
#
# Usage: [N=4000] [ROUNDS=3] [PEERS="nonstop nginx haproxy"] [WARM=100] [OPEN_TIMEOUT=120] bench/connections.sh
# N=100000 checks that each proxy still answers while holding that many; each proxy and the helper need about
# N+300 file descriptors, so RLIMIT_NOFILE's hard limit must allow it (the script raises the soft limit to the
# hard one, and the hard one too when it may).
#
# Not counted: the kernel's memory for the sockets (the same for the three: it is the kernel's), and memory a
# proxy sets aside when it starts for the N connections it is configured to hold (nginx allocates its
# connection and event arrays for worker_connections up front; it shows in "before").
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-4000}
ROUNDS=${ROUNDS:-3}
PEERS=${PEERS:-"nonstop nginx haproxy"}
WARM=${WARM:-100}
OPEN_TIMEOUT=${OPEN_TIMEOUT:-120}
case $N in ''|*[!0-9]*) echo "N must be a positive integer, not '$N'" >&2; exit 2 ;; esac
case $ROUNDS in ''|*[!0-9]*) echo "ROUNDS must be a positive integer, not '$ROUNDS'" >&2; exit 2 ;; esac
[ "$N" -ge 1 ] && [ "$ROUNDS" -ge 1 ] || { echo "N and ROUNDS must be at least 1" >&2; exit 2; }
for peer in $PEERS; do
  case $peer in nonstop|nginx|haproxy) ;; *) echo "PEERS may name nonstop, nginx and haproxy, not '$peer'" >&2; exit 2 ;; esac
done

# Every proxy and the helper hold N sockets, plus listeners, backend connections, logs and the like.
NEED=$((N + 300))
HARD=$(ulimit -Hn)
if [ "$HARD" != unlimited ] && [ "$HARD" -lt "$NEED" ]; then
  ulimit -Hn "$NEED" 2>/dev/null || true
  HARD=$(ulimit -Hn)
fi
ulimit -n "$HARD"
NOFILE=$(ulimit -n)
if [ "$NOFILE" != unlimited ] && [ "$NOFILE" -lt "$NEED" ]; then
  echo "N=$N is impossible here: each proxy (one process) and the helper need about $NEED file descriptors," >&2
  echo "but RLIMIT_NOFILE's hard limit is $NOFILE and this shell may not raise it (raising a hard limit needs" >&2
  echo "CAP_SYS_RESOURCE). The largest N that fits is $((NOFILE - 300))." >&2
  exit 2
fi

. bench/packages.sh
need nginx=nginx-light haproxy=haproxy curl=curl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
PYTHON=$(python3 -c "import sys; print(sys.executable)")  # the interpreter itself, not a shim script

. bench/nonstop-bin.sh

BACKEND=18501; P_NONSTOP=18511; P_NGINX=18512; P_HAPROXY=18513
WORK=$(mktemp -d /tmp/nonstop-bench-connections.XXXXXX)
PIDS=()
cleanup() {
  exec 3>&-
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Waits until http://127.0.0.1:PORT/ answers 200, at most 10 s.
wait_ready() { # port pid name
  for _ in $(seq 1 100); do
    if ! kill -0 "$2" 2>/dev/null; then echo "$3 exited at start:" >&2; cat "$WORK/$3.log" >&2 || true; return 1; fi
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$1/" || true)" = 200 ] && return 0
    sleep 0.1
  done
  echo "$3 did not answer on 127.0.0.1:$1 within 10 s" >&2; return 1
}

# A port some other process holds would answer for the peer that failed to bind it: refuse to start instead.
for port in $BACKEND $P_NONSTOP $P_NGINX $P_HAPROXY; do
  if (exec 9<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "127.0.0.1:$port is already in use; this script needs ports $BACKEND, $P_NONSTOP, $P_NGINX and $P_HAPROXY" >&2
    exit 2
  fi
done

"$NONSTOP" app --listen 127.0.0.1:$BACKEND --db "sqlite://$WORK/app.db" --accept-queue 1024 \
  > "$WORK/backend.log" 2>&1 & BACKEND_PID=$!; PIDS+=($BACKEND_PID)
wait_ready $BACKEND $BACKEND_PID backend

cat > "$WORK/nonstop.toml" <<CONF
state_dir = "$WORK/nonstop-state"
[[listeners]]
listen = "127.0.0.1:$P_NONSTOP"
max_connections = $((N + 100))
header_read_timeout_ms = 3600000
[[routes]]
service = "app"
[services.app]
servers = [{ addr = "127.0.0.1:$BACKEND" }]
[access_log]
enabled = false
CONF

# nginx closes idle keep-alive connections ("worker_connections are not enough, reusing connections") once
# fewer than 1/16 of its worker_connections are free: N/8 more slots keep all N (and the backend's) open.
mkdir -p "$WORK/nginx"
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections $((N + N / 8 + 200)); }
http {
  access_log off;
  keepalive_timeout 3600s;
  keepalive_requests 1000000;
  client_body_temp_path $WORK/nginx/body;
  proxy_temp_path $WORK/nginx/proxy;
  upstream app { server 127.0.0.1:$BACKEND; keepalive 64; }
  server {
    listen 127.0.0.1:$P_NGINX;
    location / { proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF

cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn $((N + 100))
  # HAProxy plans two descriptors per connection (client and server) and, by default, refuses to start when
  # the limit is below 2 x maxconn; idle clients need one each, so let it start with a warning instead.
  no strict-limits
defaults
  mode http
  maxconn $((N + 100))
  timeout connect 1s
  timeout client 3600s
  timeout http-keep-alive 3600s
  timeout server 30s
  http-reuse always
frontend f
  bind 127.0.0.1:$P_HAPROXY
  default_backend b
backend b
  server s1 127.0.0.1:$BACKEND
CONF

# Starts one peer; sets PEER_PID (what to stop), MEM_PIDS (whose memory counts) and PORT.
start_peer() { # name
  case $1 in
    nonstop)
      RUST_LOG=warn "$NONSTOP" serve --config "$WORK/nonstop.toml" --threads 1 > "$WORK/nonstop.log" 2>&1 &
      PEER_PID=$!; PORT=$P_NONSTOP ;;
    nginx)
      "$NGINX" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' > "$WORK/nginx.log" 2>&1 &
      PEER_PID=$!; PORT=$P_NGINX ;;
    haproxy)
      "$HAPROXY" -f "$WORK/haproxy.cfg" -db > "$WORK/haproxy.log" 2>&1 &
      PEER_PID=$!; PORT=$P_HAPROXY ;;
  esac
  PIDS+=($PEER_PID)
  wait_ready "$PORT" "$PEER_PID" "$1" || return 1
  MEM_PIDS=$PEER_PID
  if [ "$1" = nginx ]; then
    MEM_PIDS=$(pgrep -P "$PEER_PID" | tr '\n' ' ')
    [ -n "$MEM_PIDS" ] || { echo "nginx has no worker process" >&2; return 1; }
  fi
}

stop_peer() {
  kill "$PEER_PID" 2>/dev/null || true
  wait "$PEER_PID" 2>/dev/null || true
}

# Sum of one smaps_rollup field in KiB over the given processes: Pss_Anon (anonymous memory, the pages shared
# copy-on-write with nginx's master counted half) or Pss. Pss alone is no measure of a delta: its file-backed
# part (libc and the like) is divided among every process mapping it, so it falls when the helper starts.
mem_kib() { # field pid...
  local field=$1 total=0 v pid; shift
  for pid in "$@"; do
    v=$(awk -v f="$field:" '$1 == f {print $2; exit}' "/proc/$pid/smaps_rollup")
    [ -n "$v" ] || { echo "no $field in /proc/$pid/smaps_rollup (Linux 5.x or later needed)" >&2; return 1; }
    total=$((total + v))
  done
  echo "$total"
}

fresh_request() { # port
  [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$1/" || true)" = 200 ] && echo yes || echo NO
}

# One measurement; sets PSS (all of Pss before, KiB), BEFORE and AFTER (Pss_Anon, KiB), BPC (bytes per connection), FRESH (yes/NO) and HELD (k/N).
measure() { # name
  BEFORE="-" AFTER="-" BPC="-" FRESH="-" HELD="-" PSS="-"
  start_peer "$1" || { HELD=failed-to-start; stop_peer; return; }
  curl -s --max-time 5 $(for _ in $(seq 1 10); do echo "http://127.0.0.1:$PORT/"; done) > /dev/null || true
  "$PYTHON" bench/hold_connections.py "127.0.0.1:$PORT" "$WARM" < /dev/null > "$WORK/warm.out" 2> "$WORK/warm.err" || {
    echo "$1: warm-up failed: $(cat "$WORK/warm.err")" >&2; stop_peer; HELD=warm-up-failed; return; }
  sleep 1
  BEFORE=$(mem_kib Pss_Anon $MEM_PIDS) && PSS=$(mem_kib Pss $MEM_PIDS) || {
    stop_peer; BEFORE="-" HELD=no-memory-reading; return; }
  rm -f "$WORK/hold.in"; mkfifo "$WORK/hold.in"
  "$PYTHON" bench/hold_connections.py "127.0.0.1:$PORT" "$N" --timeout-seconds "$OPEN_TIMEOUT" --hold-seconds 900 \
    < "$WORK/hold.in" > "$WORK/hold.out" 2> "$WORK/hold.err" & local helper=$!; PIDS+=($helper)
  exec 3> "$WORK/hold.in"
  local ok=""
  for _ in $(seq 1 $(( (OPEN_TIMEOUT + 15) * 10 ))); do
    grep -q '^ready ' "$WORK/hold.out" 2>/dev/null && { ok=1; break; }
    kill -0 "$helper" 2>/dev/null || break
    sleep 0.1
  done
  if [ -n "$ok" ]; then
    sleep 1
    if AFTER=$(mem_kib Pss_Anon $MEM_PIDS); then
      BPC=$(( (AFTER - BEFORE) * 1024 / N ))
    else
      AFTER="-"; echo "$1: its process is gone while the connections were held" >&2
    fi
    FRESH=$(fresh_request "$PORT")
  else
    echo "$1: the helper did not hold $N connections: $(cat "$WORK/hold.err")" >&2
    HELD=not-held
  fi
  exec 3>&-
  local rc=0; wait "$helper" 2>/dev/null || rc=$?
  if [ -n "$ok" ]; then
    HELD=$(awk '/^held / {print $2 "/" $4}' "$WORK/hold.out")
    HELD=${HELD:-?}
    [ "$rc" = 0 ] || echo "$1: helper: $(grep error "$WORK/hold.err" || echo "exit $rc")" >&2
  fi
  stop_peer
  # What the peer itself warned about (limits, errors), shown once per peer below the table.
  local log=$WORK/$1.log; [ "$1" = nginx ] && log=$WORK/nginx/error.log
  if [ -z "${NOTES[$1]:-}" ] && [ -s "$log" ]; then
    NOTES[$1]=$(grep -E -i 'alert|warn|error|emerg|crit' "$log" | sed -E 's/^\[[A-Z]+\] +\([0-9]+\) : //' | sort -u | head -3 || true)
  fi
}
declare -A NOTES=()

median() { sort -g | awk '{a[NR]=$1} END {if (NR == 0) print "-"; else if (NR%2) print a[(NR+1)/2]; else print int((a[NR/2]+a[NR/2+1])/2)}'; }

echo "bench/connections.sh: N=$N idle keep-alive connections, $ROUNDS round(s), peers alternated; RLIMIT_NOFILE $NOFILE"
echo "$("$NONSTOP" --version 2>/dev/null | head -1); $("$NGINX" -v 2>&1 | head -1); $("$HAPROXY" -v 2>&1 | head -1)"
echo
printf '%-5s %-8s %7s %11s %12s %12s %10s %7s %13s\n' round peer N 'Pss KiB' 'anon before' 'anon after' 'bytes/conn' fresh held
declare -A PER_ROUND=()
read -r -a peers <<<"$PEERS"
for r in $(seq 1 "$ROUNDS"); do
  shift_by=$(( (r - 1) % ${#peers[@]} ))
  order=("${peers[@]:$shift_by}" "${peers[@]:0:$shift_by}")
  for peer in "${order[@]}"; do
    measure "$peer"
    printf '%-5s %-8s %7s %11s %12s %12s %10s %7s %13s\n' "$r" "$peer" "$N" "$PSS" "$BEFORE" "$AFTER" "$BPC" "$FRESH" "$HELD"
    [ "$BPC" = - ] || PER_ROUND[$peer]+="$BPC "
  done
done

echo
printf '%-8s %7s  %-30s %10s\n' peer N 'bytes/conn per round' median
declare -A MED=()
for peer in "${peers[@]}"; do
  MED[$peer]=$(tr ' ' '\n' <<<"${PER_ROUND[$peer]:-}" | grep . | median || true)
  printf '%-8s %7s  %-30s %10s\n' "$peer" "$N" "${PER_ROUND[$peer]:--}" "${MED[$peer]}"
done
for peer in "${peers[@]}"; do
  [ -z "${NOTES[$peer]:-}" ] || while IFS= read -r line; do echo "note ($peer): $line"; done <<<"${NOTES[$peer]}"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b <= 0) print "-"; else printf "%.2f", a / b }'; }
for other in nginx haproxy; do
  if [ -n "${MED[nonstop]:-}" ] && [ -n "${MED[$other]:-}" ]; then
    printf 'RATIO N=%s nonstop/%-7s median bytes/conn %s\n' "$N" "$other" "$(ratio "${MED[nonstop]}" "${MED[$other]}")"
  fi
done
