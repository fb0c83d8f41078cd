#!/usr/bin/env bash
# The same rolling deploy of three app instances from v1 to v2, under the same load, done two ways:
#   seed:    the way of ../shared/seed's notes, as a Jenkins job would run it: nginx in front (with
#            proxy_next_upstream error/timeout/502/503/504 and non_idempotent with an Idempotency-Key, the best
#            retry setting it has), and for each server: rewrite nginx's upstream file without it, nginx -s reload,
#            kill the old server, sleep, start the new one, sleep, put it back in the upstream file, reload;
#   nonstop: `nonstop serve` running the instances from an app section, and `nonstop deploy --version v2`.
# Load: `nonstop load` at 300 requests/s for 20 s, half GET /, half POST /orders, accounting for every request.
# The ways alternate for ROUNDS rounds (default 2). Prints failed/total per round and way.
#
# Usage: bench/deploy.sh            (ROUNDS=3 bench/deploy.sh for more rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
WORK=$(mktemp -d /tmp/nonstop-bench-deploy.XXXXXX)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

. bench/packages.sh
need nginx=nginx-light
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
. bench/nonstop-bin.sh
PROXY=19080
ADMIN=19900
APPS=(19101 19102 19103)
SLEEP=${SLEEP:-2}

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

wait_port() { for _ in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }
wait_free() { while (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; do sleep 0.1; done; }

load_bg() { # json
  RUST_LOG=error "$NONSTOP" load "http://127.0.0.1:$PROXY" --scenario "$WORK/mix.toml" --timeout 30s \
    --connections 4000 --rate 300 --duration 20s --track-header X-Nonstop-Version --json "$1" > /dev/null 2>&1 &
  LOAD_PID=$!
}

failed_of() { # json
  python3 - "$1" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
r = d["requests"]
versions = ", ".join(f"{k} {v}" for k, v in sorted(d["headers"].items()))
print(f"{r['failed']}/{r['scheduled']} failed ({versions})")
PY
}

declare -A APP_PID
start_app() { # port version db
  RUST_LOG=warn "$NONSTOP" app --listen "127.0.0.1:$1" --version "$2" --db "sqlite://$3" --work-ms 5 --workers 4 \
    > /dev/null 2>&1 &
  APP_PID[$1]=$!; PIDS+=($!)
}

upstream() { # dir ports...
  local dir=$1; shift
  { echo "upstream app {"; for p in "$@"; do echo "  server 127.0.0.1:$p max_fails=1 fail_timeout=2s;"; done
    echo "  keepalive 64;"; echo "}"; } > "$dir/upstream.conf"
}

seed_way() { # dir
  local dir=$1 db="$1/orders.db"
  mkdir -p "$dir"
  for p in "${APPS[@]}"; do start_app "$p" v1 "$db"; done
  for p in "${APPS[@]}"; do wait_port "$p"; done
  upstream "$dir" "${APPS[@]}"
  cat > "$dir/nginx.conf" <<CONF
worker_processes 2;
pid $dir/nginx.pid;
error_log $dir/error.log crit;
events { worker_connections 8192; }
http {
  access_log off;
  include $dir/upstream.conf;
  server {
    listen 127.0.0.1:$PROXY;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Idempotency-Key \$request_id;
      proxy_connect_timeout 1s;
      proxy_read_timeout 5s;
      proxy_next_upstream error timeout http_502 http_503 http_504 non_idempotent;
      proxy_next_upstream_tries 3;
    }
  }
}
CONF
  "$NGINX" -c "$dir/nginx.conf" -g 'daemon off;' > "$dir/nginx.log" 2>&1 & local nginx=$!; PIDS+=($nginx)
  wait_port $PROXY
  load_bg "$dir/load.json"
  sleep 3
  for i in "${!APPS[@]}"; do
    local others=() p=${APPS[$i]}
    for q in "${APPS[@]}"; do [ "$q" = "$p" ] || others+=("$q"); done
    upstream "$dir" "${others[@]}"; "$NGINX" -c "$dir/nginx.conf" -s reload 2>/dev/null
    kill "${APP_PID[$p]}"; sleep "$SLEEP"
    start_app "$p" v2 "$db"; sleep "$SLEEP"
    upstream "$dir" "${APPS[@]}"; "$NGINX" -c "$dir/nginx.conf" -s reload 2>/dev/null
  done
  wait $LOAD_PID || true
  kill -TERM $nginx; for p in "${APPS[@]}"; do kill "${APP_PID[$p]}" 2>/dev/null || true; done
  wait_free $PROXY
  failed_of "$dir/load.json"
}

nonstop_way() { # dir
  local dir=$1
  mkdir -p "$dir"
  cat > "$dir/nonstop.toml" <<CONF
state_dir = "$dir/state"
[[listeners]]
listen = "127.0.0.1:$PROXY"
[admin]
listen = "127.0.0.1:$ADMIN"
[access_log]
enabled = false
[[routes]]
service = "app"
[services.app.retry]
add_idempotency_key = true
[services.app.app]
command = "$NONSTOP app --listen {addr} --version {version} --db sqlite://$dir/orders.db --work-ms 5 --workers 4"
ports = "19101-19110"
soak_ms = 3000
CONF
  RUST_LOG=error "$NONSTOP" serve --config "$dir/nonstop.toml" --threads 2 > "$dir/serve.log" 2>&1 & local serve=$!
  PIDS+=($serve)
  wait_port $PROXY
  until "$NONSTOP" status --admin 127.0.0.1:$ADMIN 2>/dev/null | grep -c "serving   yes" | grep -q 3; do sleep 0.2; done
  load_bg "$dir/load.json"
  sleep 3
  "$NONSTOP" deploy --version v2 --admin 127.0.0.1:$ADMIN > "$dir/deploy.log" 2>&1 || echo "(deploy failed: $(tail -1 "$dir/deploy.log"))"
  wait $LOAD_PID || true
  kill -TERM $serve; wait $serve 2>/dev/null || true
  wait_free $PROXY
  failed_of "$dir/load.json"
}

printf "%-6s %-52s %s\n" round "seed (nginx reload, kill, sleep, start)" "nonstop deploy"
for r in $(seq "$ROUNDS"); do
  a=$(seed_way "$WORK/seed-$r")
  b=$(nonstop_way "$WORK/nonstop-$r")
  printf "%-6s %-52s %s\n" "$r" "$a" "$b"
done
