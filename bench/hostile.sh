#!/usr/bin/env bash
# The hostile inputs of crates/nonstop/tests/hostile.rs (issue 17), sent to nonstop, nginx and HAProxy side by side
# in one run, with the answers printed as tables: what each client got and what the server behind each proxy saw.
# It is a comparison, not a test: it exits 0 whatever the proxies answer.
#
# The inputs are the same bytes as hostile.rs's: requests another parser could frame differently (Content-Length
# and Transfer-Encoding variants, obs-fold, NUL and CR bytes, two Hosts, a head over the limit), lengths a proxy may
# accept and must pass on in its own spelling, malicious server responses (two lengths, CL with TE, a TE not ending
# in chunked, an unasked 101, a NUL in a header), a server's early 413 to a 4 MB body it will not read, and idle or
# stalled HTTP/1.1 and HTTP/2 (h2c) connections.
#
# Behind each proxy, for each case, a fresh recording backend (bench/hostile.py, Python 3 standard library) that
# frames leniently on purpose, like crates/testkit/src/raw.rs: a body forwarded under a length it cannot read shows
# up as an extra request. A cell reads `CLIENT STATUSES | srv:WHAT THE SERVER SAW`; SMUGGLED marks a server that
# saw /smuggled or a request the client did not send, REACHED a malicious response that reached the client.
# Each proxy runs with one thread, a 1 s head/idle timeout and a ~4 KB head limit; bench/hostile.py's
# nginx_config and haproxy_config say where the three cannot be set identically.
#
# Usage: bench/hostile.sh
#   NONSTOP=PATH  the nonstop binary [default: target/release/nonstop, built with cargo if missing]
#   CASES=REGEX   only the cases whose names match (case-insensitive; malicious responses are named
#                 "response ...", the early answer "early 413"), e.g. CASES='plus sign|response 101|preface'
#
# Installs nginx-light (or nginx) and haproxy from Debian's packages when they are missing; never touches their
# system configs or services: each proxy runs in the foreground with config, logs and pid files in a temporary
# directory, removed on exit with everything the script started. All traffic goes to 127.0.0.1 only.
# Exit status: 0 after the comparison; 2 when nginx or HAProxy cannot be installed or started.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
apt_install() { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1; }
install_missing() {
  local need=()
  have nginx || need+=(nginx)
  have haproxy || need+=(haproxy)
  [ ${#need[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "bench/hostile.sh: ${need[*]} missing and no apt-get to install them" >&2; exit 2
  fi
  local pkgs=()
  for n in "${need[@]}"; do [ "$n" = nginx ] && pkgs+=(nginx-light) || pkgs+=("$n"); done
  echo "installing ${pkgs[*]} from Debian's packages" >&2
  # Without package lists an install fails: then, and only then, fetch them (once) and try again.
  local updated=0
  try_install() {
    apt_install "$@" && return 0
    [ $updated -eq 1 ] && return 1
    updated=1; apt-get update -qq >/dev/null 2>&1 || true
    apt_install "$@"
  }
  if ! try_install "${pkgs[@]}"; then
    # nginx-light is not in every release: the full nginx has the same proxy.
    local alt=("${pkgs[@]/#nginx-light/nginx}")
    if [ "${alt[*]}" = "${pkgs[*]}" ] || ! try_install "${alt[@]}"; then
      echo "bench/hostile.sh: could not install ${pkgs[*]} (apt-get install failed)" >&2; exit 2
    fi
  fi
  have nginx && have haproxy || { echo "bench/hostile.sh: nginx or haproxy still missing after install" >&2; exit 2; }
}
install_missing
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
NGINX_H2=0
"$NGINX" -V 2>&1 | grep -q -- --with-http_v2_module && NGINX_H2=1

if [ -z "${NONSTOP:-}" ]; then
  NONSTOP=$ROOT/target/release/nonstop
  if [ ! -x "$NONSTOP" ]; then
    echo "building nonstop (cargo build --release -p nonstop)" >&2
    cargo build --release -p nonstop -q
  fi
fi
[ -x "$NONSTOP" ] || { echo "bench/hostile.sh: NONSTOP=$NONSTOP is not an executable" >&2; exit 2; }

WORK=$(mktemp -d /tmp/nonstop-bench-hostile.XXXXXX)
cleanup() {
  # hostile.py stops what it started; should it have died first, the process groups it recorded go too.
  if [ -f "$WORK/pgids" ]; then
    while read -r g; do kill -TERM -- "-$g" 2>/dev/null || true; done < "$WORK/pgids"
    sleep 0.2
    while read -r g; do kill -KILL -- "-$g" 2>/dev/null || true; done < "$WORK/pgids"
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "bench/hostile.sh: $("$NONSTOP" --version 2>/dev/null || echo nonstop) ($NONSTOP)," \
  "$("$NGINX" -v 2>&1 | sed 's/^nginx version: //')," \
  "$("$HAPROXY" -v 2>/dev/null | head -1 | awk '{print "HAProxy " $3}'); all on 127.0.0.1"
echo
rc=0
python3 bench/hostile.py --work "$WORK" --nonstop "$NONSTOP" --nginx "$NGINX" --haproxy "$HAPROXY" \
  --nginx-h2 "$NGINX_H2" --cases "${CASES:-}" || rc=$?
exit "$rc"
