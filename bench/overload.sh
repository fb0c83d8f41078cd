#!/usr/bin/env bash
# Overload with zero tuning, side by side in one run: nonstop with no tuning but adaptive_limit = true ("defaults"), nonstop
# hand-tuned (server_in_flight_max = each server's workers, adaptive_limit = false), nonstop static (adaptive_limit
# = false with the default ceiling of 256: what nonstop did before the adaptive limit) and nginx
# (proxy_next_upstream error timeout http_503, as the notes' users run it), alternating, ROUNDS rounds each.
# Behind each: Tomcat-like `nonstop app` servers (--workers N --accept-queue 10 --work-ms 20: N*50 requests/s).
# In front: `nonstop load`, open model, GET /, accounting for every request.
#   4x:     two 2-worker servers (200/s together) under 800/s for 10 s
#   mixed:  a 2-worker and an 8-worker server (500/s together) under 2000/s for 10 s
#   stall:  two 2-worker servers under 80/s (less than one can do) for 10 s, one SIGSTOPped from 3 s to 6 s
# Prints, per case and proxy, the medians of: goodput (200s per second), failures that are not a 503 with
# Retry-After, the p99 of the 503s, and (stall, nonstop defaults) how long the stalled server's limit took to fall.
#
# Usage: bench/overload.sh            ROUNDS=3 by default; CASES="4x mixed stall" to pick cases
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
CASES=${CASES:-"4x mixed stall"}
WORK=$(mktemp -d /tmp/nonstop-bench-overload.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

. bench/packages.sh
need nginx=nginx-light
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
. bench/nonstop-bin.sh

PROXY=19280
ADMIN=19290
APPS=(19201 19202)
wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
port_free() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null || return 0; sleep 0.1; done; return 1; }

declare -A APP_PID
start_app() { # port workers dir
  RUST_LOG=warn "$NONSTOP" app --listen "127.0.0.1:$1" --workers "$2" --accept-queue 10 --work-ms 20 \
    --db "sqlite://$3/app$1.db" > /dev/null 2>&1 &
  APP_PID[$1]=$!; PIDS+=($!)
}

start_proxy() { # kind dir workers...
  local kind=$1 dir=$2; shift 2
  local workers=("$@") servers=""
  case $kind in
    nginx)
      for p in "${APPS[@]}"; do servers+="    server 127.0.0.1:$p;"$'\n'; done
      cat > "$dir/nginx.conf" <<CONF
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/error.log crit;
events { worker_connections 16384; }
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
      proxy_next_upstream error timeout http_503;
    }
  }
}
CONF
      "$NGINX" -c "$dir/nginx.conf" -g 'daemon off;' > "$dir/proxy.log" 2>&1 & PROXY_PID=$! ;;
    defaults|tuned|static)
      for i in "${!APPS[@]}"; do
        if [ "$kind" = tuned ]; then
          servers+="{ addr = \"127.0.0.1:${APPS[$i]}\", in_flight_max = ${workers[$i]} }, "
        else
          servers+="{ addr = \"127.0.0.1:${APPS[$i]}\" }, "
        fi
      done
      {
        printf '[[listeners]]\nlisten = "127.0.0.1:%s"\n[admin]\nlisten = "127.0.0.1:%s"\n' $PROXY $ADMIN
        printf '[access_log]\nenabled = false\n[[routes]]\nservice = "app"\n[services.app]\nservers = [%s]\n' "${servers%, }"
        if [ "$kind" = defaults ]; then printf '[services.app.admission]\nadaptive_limit = true\n'; else printf '[services.app.admission]\nadaptive_limit = false\n'; fi
      } > "$dir/nonstop.toml"
      RUST_LOG=error "$NONSTOP" serve --config "$dir/nonstop.toml" > "$dir/proxy.log" 2>&1 & PROXY_PID=$! ;;
  esac
  PIDS+=($PROXY_PID)
  wait_port $PROXY || { echo "$kind did not start:"; cat "$dir/proxy.log"; exit 1; }
}

# Milliseconds from now until the admin API shows the server on port $1 with a limit of 1 (at most 3 s).
limit_fall_ms() {
  python3 - "$ADMIN" "$1" <<'PY'
import json, sys, time, urllib.request
admin, port = sys.argv[1], sys.argv[2]
t0 = time.monotonic()
while time.monotonic() - t0 < 3.0:
    try:
        v = json.load(urllib.request.urlopen(f"http://127.0.0.1:{admin}/services/app", timeout=1))
        s = [s for s in v["servers"] if s["addr"].endswith(":" + port)][0]
        if s["limit"]["current"] <= 1:
            print(int((time.monotonic() - t0) * 1000)); sys.exit()
    except Exception:
        pass
    time.sleep(0.05)
print("never")
PY
}

run_case() { # case kind round
  local c=$1 kind=$2 dir="$WORK/$1-$2-$3" workers rate
  mkdir -p "$dir"
  case $c in
    4x) workers=(2 2); rate=800 ;;
    mixed) workers=(2 8); rate=2000 ;;
    stall) workers=(2 2); rate=80 ;;
  esac
  port_free $PROXY; for p in "${APPS[@]}"; do port_free "$p"; done
  for i in "${!APPS[@]}"; do start_app "${APPS[$i]}" "${workers[$i]}" "$dir"; done
  for p in "${APPS[@]}"; do wait_port "$p"; done
  start_proxy "$kind" "$dir" "${workers[@]}"
  sleep 1
  RUST_LOG=error "$NONSTOP" load "http://127.0.0.1:$PROXY/" --rate "$rate" --duration 10s --timeout 30s \
    --track-header Retry-After --json "$dir/load.json" > /dev/null 2>&1 &
  local load=$! fell="-"
  if [ "$c" = stall ]; then
    sleep 3; kill -STOP "${APP_PID[${APPS[1]}]}"
    local t0; t0=$(date +%s%N)
    [ "$kind" = defaults ] && fell=$(limit_fall_ms "${APPS[1]}")
    local left=$(( 3000 - ($(date +%s%N) - t0) / 1000000 ))
    [ $left -gt 0 ] && sleep "$(printf '%d.%03d' $((left / 1000)) $((left % 1000)))"
    kill -CONT "${APP_PID[${APPS[1]}]}"
  fi
  wait $load || true
  python3 - "$dir/load.json" "$fell" >> "$WORK/$c-$kind.rows" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
st = d["status"]
ok = st.get("200", 0)
n503 = st.get("503", 0)
bad = d["requests"]["failed"] - min(n503, d["headers"].get("1", 0))
print(f"{ok / d['duration_s']:.1f} {bad} {d['latency_5xx_ms']['p99']:.1f} {d['requests']['scheduled']} {sys.argv[2]}")
PY
  kill -TERM $PROXY_PID "${APP_PID[@]}" 2>/dev/null || true
  wait $PROXY_PID "${APP_PID[@]}" 2>/dev/null || true
}

for c in $CASES; do
  for r in $(seq "$ROUNDS"); do
    for kind in defaults tuned static nginx; do
      run_case "$c" "$kind" "$r"
      echo "$c round $r $kind: $(tail -1 "$WORK/$c-$kind.rows")" >&2
    done
  done
done

python3 - "$WORK" "$CASES" <<'PY'
import statistics, sys
work, cases = sys.argv[1], sys.argv[2].split()
capacity = {"4x": 200, "mixed": 500, "stall": 100}
print(f"{'case':<6} {'proxy':<9} {'goodput/s':>10} {'of capacity':>12} {'vs tuned':>9} {'failed, not 503+RA':>19} {'503 p99 ms':>11} {'limit fell ms':>14}")
for c in cases:
    rows = {}
    for kind in ["defaults", "tuned", "static", "nginx"]:
        lines = [l.split() for l in open(f"{work}/{c}-{kind}.rows")]
        rows[kind] = {
            "goodput": statistics.median(float(l[0]) for l in lines),
            "bad": statistics.median(int(l[1]) for l in lines),
            "p99": statistics.median(float(l[2]) for l in lines),
            "fell": [l[4] for l in lines],
        }
    for kind, r in rows.items():
        cap = capacity[c] if c != "stall" else None
        of_cap = f"{r['goodput'] / cap:.2f}" if cap else "-"
        vs = r["goodput"] / rows["tuned"]["goodput"] if rows["tuned"]["goodput"] else 0
        fell = ",".join(r["fell"]) if kind == "defaults" and c == "stall" else "-"
        print(f"{c:<6} {kind:<9} {r['goodput']:>10.1f} {of_cap:>12} {vs:>9.2f} {r['bad']:>19} {r['p99']:>11.1f} {fell:>14}")
PY
