#!/usr/bin/env bash
# nonstop load beside wrk, on this machine, in one run.
#
# Against a static nginx (worker_processes 1, `return 200`), over ROUNDS rounds with the order alternated:
#   closed model: `nonstop load --threads 1 --connections 64 --duration D` and `wrk -t1 -c64 -dD`;
#   open model: `nonstop load --rate 10000 --duration D`, whose achieved rate must be within 1% of the target.
# Prints requests/s per run, the median ratio nonstop/wrk, and the open model's achieved rate.
#
# Usage: bench/load.sh [ROUNDS=3] [DURATION=10s]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
DURATION=${2:-10s}
WORK=$(mktemp -d /tmp/nonstop-bench-load.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

. bench/packages.sh
need nginx=nginx-light wrk=wrk
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
. bench/nonstop-bin.sh
PORT=18401

cat > "$WORK/nginx.conf" <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 1000000;
  server { listen 127.0.0.1:$PORT reuseport; location / { return 200 "ok\n"; } } }
CONF
"$NGINX" -c "$WORK/nginx.conf" -g 'daemon off;' & PIDS+=($!)
sleep 0.5
URL="http://127.0.0.1:$PORT/"

median() { sort -g | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
run_wrk() { wrk -t1 -c64 -d"$DURATION" "$URL" | awk '/^Requests\/sec:/ {print $2}'; }
run_nonstop() {
  "$NONSTOP" load "$URL" --threads 1 --connections 64 --duration "$DURATION" --json "$WORK/closed.json" > /dev/null
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(d['rate']['achieved'])" "$WORK/closed.json"
}

echo "bench/load.sh: $ROUNDS rounds, $DURATION each, against static nginx on 127.0.0.1:$PORT"
printf '%-6s %-14s %12s\n' round tool 'requests/s'
RATIOS=""
for r in $(seq 1 "$ROUNDS"); do
  if (( r % 2 )); then order=(nonstop wrk); else order=(wrk nonstop); fi
  for tool in "${order[@]}"; do
    if [ "$tool" = wrk ]; then v=$(run_wrk); W=$v; else v=$(run_nonstop); N=$v; fi
    printf '%-6s %-14s %12.1f\n' "$r" "$tool" "$v"
  done
  RATIOS+="$(awk -v a="$N" -v b="$W" 'BEGIN {printf "%.3f", a/b}') "
done
echo "RATIO closed model nonstop/wrk median $(tr ' ' '\n' <<<"$RATIOS" | grep . | median)  (per round: $RATIOS)"

echo
echo "open model at 10000 requests/s for $DURATION:"
for r in $(seq 1 "$ROUNDS"); do
  "$NONSTOP" load "$URL" --rate 10000 --duration "$DURATION" --json "$WORK/open.json" > /dev/null || true
  python3 - "$WORK/open.json" "$r" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
a, t = d["rate"]["achieved"], d["rate"]["target"]
print(f"round {sys.argv[2]}: achieved {a:.1f}/s of {t:.0f} ({100 * (a - t) / t:+.2f}%), not sent {d['requests']['not_sent']}, "
      f"p99 {d['latency_ms']['p99']:.2f} ms, within 1%: {abs(a - t) <= 0.01 * t}")
PY
done
