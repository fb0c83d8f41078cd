#!/usr/bin/env bash
# How long a rolling deploy of 3 instances takes on SSH hosts, and where the time goes, beside the same deploy on
# local processes:
#   ssh:   an app service with driver = "ssh" on 3 hosts (count = 1 on each), each host a network namespace this
#          script makes, with Debian's sshd in it on a veth pair 10.251.N.0/30 (as crates/testkit/src/sshd.rs does);
#          the release is a directory holding a copy of the nonstop binary, shipped to every host once per version;
#   local: the same app service with driver = "process", count = 3, the same command (the same binary, by its
#          absolute path) and the same readiness, soak and stop settings.
# Each round starts a fresh `nonstop serve` (fresh state and host directories) per peer and deploys v1->v2, then
# v2->v3 (each version is shipped once, so both deploys ship), no load meanwhile. The peers alternate, ssh first in
# odd rounds, local first in even ones. From the JSON lines of `nonstop deploy --json` (at_ms, step) it derives:
#   total   start -> done (the deploy's own clock; wall: the `nonstop deploy` command, from outside)
#   ship    start -> the last `shipped` (the release to every host, in parallel; 0 for local processes)
#   rollout the first new instance started -> the last one in service
#   drain   per wave, the new instance in service -> the old one drained, summed over the 3 waves
#   soak    soak -> soak_passed (soak_ms = 1000)
#   stop    soak_passed -> done (the old instances stopped)
#   start->ready of each new instance, in the order they started
# and prints a table per round, the medians per peer and deploy, the ratios ssh/local of total and rollout, and the
# size of the release shipped.
#
# Usage: bench/ssh_deploy.sh [ROUNDS]     (default 3; as root: it makes network namespaces)
#        KEEP=1 bench/ssh_deploy.sh       keeps the work directory (configs, logs, deploy JSON) after the run
#        NONSTOP=/path/to/nonstop ...     measures another binary than target/release/nonstop
#        PLAIN_BASHRC=1 bench/ssh_deploy.sh
#                                         sshd sees an empty ~root/.bashrc (a bind mount in sshd's own mount
#                                         namespace): bash, root's shell, sources ~/.bashrc for every command sshd
#                                         runs, and a slow one (pyenv init: ~300 ms) is paid by every SSH command
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
case $ROUNDS in '' | *[!0-9]*) echo "usage: bench/ssh_deploy.sh [ROUNDS] (a number, 1 to 50)" >&2; exit 2 ;; esac
[ "$ROUNDS" -ge 1 ] && [ "$ROUNDS" -le 50 ] || { echo "ROUNDS must be 1 to 50" >&2; exit 2; }
HELPER=$PWD/bench/ssh_deploy.py

die() { echo "ssh_deploy.sh: $*" >&2; exit 1; }

# ---- What it needs ----
[ "$(id -u)" = 0 ] || die "run it as root: it makes network namespaces and veth pairs"
[ -x /usr/sbin/sshd ] || die "/usr/sbin/sshd is missing: apt-get install openssh-server iproute2"
command -v ssh-keygen > /dev/null || die "ssh-keygen is missing: apt-get install openssh-server iproute2"
ip -V > /dev/null 2>&1 || die "ip (iproute2) is missing: apt-get install openssh-server iproute2"
command -v python3 > /dev/null || die "python3 is missing"
command -v timeout > /dev/null || die "timeout (coreutils) is missing"

SRC=${NONSTOP:-$PWD/target/release/nonstop}
if [ ! -x "$SRC" ]; then
  [ -z "${NONSTOP:-}" ] || die "$SRC is not an executable"
  echo "building target/release/nonstop" >&2
  flock /tmp/nonstop-cargo.lock cargo build --release --offline -p nonstop
fi

# The hosts integration tests share the 2 cores and would distort the timings: wait (up to 30 min) until none runs.
for _ in $(seq 180); do
  pgrep -f 'target/release/deps/hosts-' > /dev/null || break
  echo "waiting for the running hosts tests to end (pgrep -f target/release/deps/hosts-)" >&2
  sleep 10
done
! pgrep -f 'target/release/deps/hosts-' > /dev/null || die "the hosts tests still run after 30 minutes"

# ---- Everything this script makes, undone on exit (also on failure and Ctrl-C) ----
WORK=$(mktemp -d /tmp/nonstop-bench-ssh.XXXXXX)
SERVE_PID=""
NSS=() VETHS=() SSHD_PIDS=()

stop_serve() { # SIGTERM (serve stops its instances, on the hosts too), SIGKILL after 60 s
  [ -n "$SERVE_PID" ] || return 0
  kill -TERM "$SERVE_PID" 2> /dev/null || true
  for _ in $(seq 600); do kill -0 "$SERVE_PID" 2> /dev/null || break; sleep 0.1; done
  kill -KILL "$SERVE_PID" 2> /dev/null || true
  wait "$SERVE_PID" 2> /dev/null || true
  SERVE_PID=""
}

cleanup() {
  local rc=$? p ns
  set +e
  trap '' INT TERM
  stop_serve
  # Local instances a killed serve left behind: their command lines name this run's work directory.
  for p in $(pgrep -f -- "$WORK/"); do
    [ "$p" != $$ ] && kill -KILL "$p" 2> /dev/null
  done
  for p in "${SSHD_PIDS[@]}"; do kill -KILL "$p" 2> /dev/null; done
  for p in "${SSHD_PIDS[@]}"; do wait "$p" 2> /dev/null; done
  for ns in "${NSS[@]}"; do
    # sshd's sessions and the instances it started are in the namespace too.
    for p in $(ip netns pids "$ns" 2> /dev/null); do kill -KILL "$p" 2> /dev/null; done
  done
  for p in "${VETHS[@]}"; do ip link del "$p" 2> /dev/null; done
  for ns in "${NSS[@]}"; do ip netns del "$ns" 2> /dev/null; done
  if [ -n "${KEEP:-}" ]; then
    rm -rf "$WORK"/*/hosts "$WORK"/*/state/releases "$WORK"/release
    echo "kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- The binary and the release ----
mkdir -p "$WORK/release"
cp "$SRC" "$WORK/release/nonstop"
NONSTOP=$WORK/release/nonstop
SIZE=$(stat -c %s "$NONSTOP")
echo "binary $SRC: $((SIZE / 1000000)) MB ($SIZE bytes); the release is a directory holding a copy of it"

LISTEN_SSH=127.0.0.1:19480 ADMIN_SSH=127.0.0.1:19490
LISTEN_LOCAL=127.0.0.1:19481 ADMIN_LOCAL=127.0.0.1:19491
PORTS=19501-19510 # the instances' ports: on each host's address, and on 127.0.0.1 for the local peer
SSHD_PORT=2222

port_open() { timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2> /dev/null; }
# A command in the background, waited for: Ctrl-C interrupts the wait at once (the trap then cleans up).
waited() { "$@" & wait $!; }
for hp in $LISTEN_SSH $LISTEN_LOCAL $ADMIN_SSH $ADMIN_LOCAL 127.0.0.1:19501 127.0.0.1:19505 127.0.0.1:19510; do
  ! port_open "${hp%:*}" "${hp#*:}" || die "$hp is in use: this benchmark needs 19480-19510 on 127.0.0.1"
done

# ---- 3 SSH hosts: a namespace each, a veth pair on a free 10.251.N.0/30 (N in 200..249), sshd ----
IPS=() HOSTDIRS=()
subnet_free() { [ -z "$(ip -o addr show to "10.251.$1.0/30")" ]; }
n=200
for k in 1 2 3; do
  while [ $n -le 249 ] && ! subnet_free $n; do n=$((n + 1)); done
  [ $n -le 249 ] || die "no free subnet 10.251.N.0/30 with N in 200..249"
  ns=nonstop-b-$$-$k vr=nbr$$x$k vh=nbh$$x$k
  ! ip netns list | grep -qw "$ns" || die "namespace $ns exists already"
  ! ip link show "$vr" > /dev/null 2>&1 || die "interface $vr exists already"
  NSS+=("$ns")
  ip netns add "$ns"
  VETHS+=("$vr")
  ip link add "$vr" type veth peer name "$vh"
  ip link set "$vh" netns "$ns"
  ip addr add "10.251.$n.1/30" dev "$vr"
  ip link set "$vr" up
  ip netns exec "$ns" ip addr add "10.251.$n.2/30" dev "$vh"
  ip netns exec "$ns" ip link set "$vh" up
  ip netns exec "$ns" ip link set lo up
  IPS+=("10.251.$n.2")
  HOSTDIRS+=("$WORK/sshd-$k")
  n=$((n + 1))
done

# The app service, with the ssh driver or the process driver; the settings both share come first.
write_config() { # peer dir
  local peer=$1 d=$2 listen admin
  if [ "$peer" = ssh ]; then listen=$LISTEN_SSH admin=$ADMIN_SSH; else listen=$LISTEN_LOCAL admin=$ADMIN_LOCAL; fi
  mkdir -p "$d/data"
  cat > "$d/nonstop.toml" <<CONF
state_dir = "$d/state"

[[listeners]]
listen = "$listen"

[admin]
listen = "$admin"

[access_log]
enabled = false

[[routes]]
service = "web"

[services.web]
response_timeout_ms = 2000
connect_timeout_ms = 500

[services.web.app]
version = "v1"
ports = "$PORTS"
ready_interval_ms = 100
ready_timeout_ms = 10000
soak_ms = 1000
stop_grace_ms = 5000
restart_backoff_base_ms = 200
p99_slack_ms = 2000
CONF
  if [ "$peer" = ssh ]; then
    cat >> "$d/nonstop.toml" <<CONF
driver = "ssh"
hosts = ["h1", "h2", "h3"]
count = 1
release = "$WORK/release"
keep_releases = 3
command = "./nonstop app --listen {addr} --version {version} --instance {instance} --db sqlite://$d/data/app.db --workers 8 --work-ms 2"
CONF
    for k in 1 2 3; do
      cat >> "$d/nonstop.toml" <<CONF

[hosts.h$k]
address = "${IPS[$((k - 1))]}:$SSHD_PORT"
user = "root"
dir = "$d/hosts/h$k"
connect_timeout_ms = 2000
CONF
    done
  else
    cat >> "$d/nonstop.toml" <<CONF
driver = "process"
count = 3
command = "$NONSTOP app --listen {addr} --version {version} --instance {instance} --db sqlite://$d/data/app.db --workers 8 --work-ms 2"
CONF
  fi
}

# nonstop's key pair, made once (state_dir/ssh), copied into each round's fresh state_dir with the pinned host keys.
BOOT=$WORK/boot
write_config ssh "$BOOT"
PUBLIC=$(RUST_LOG=warn "$NONSTOP" keys init --config "$BOOT/nonstop.toml" 2> "$BOOT/keys.log") ||
  die "nonstop keys init failed: $(cat "$BOOT/keys.log")"

mkdir -p /run/sshd # sshd's privilege separation directory
RCFILE=$(getent passwd root | cut -d: -f6)/.bashrc
: > "$WORK/empty"
if [ -n "${PLAIN_BASHRC:-}" ]; then
  echo "PLAIN_BASHRC: sshd's commands see an empty $RCFILE"
elif [ -f "$RCFILE" ]; then
  t0=$(date +%s%N); bash -c ". '$RCFILE'" < /dev/null > /dev/null 2>&1 || true; t1=$(date +%s%N)
  echo "note: $RCFILE takes $(((t1 - t0) / 1000000)) ms, and every SSH command pays it (PLAIN_BASHRC=1 to leave it out)"
fi
for k in 1 2 3; do
  hd=${HOSTDIRS[$((k - 1))]} ip_=${IPS[$((k - 1))]} ns=${NSS[$((k - 1))]}
  mkdir -p "$hd"
  echo "$PUBLIC" > "$hd/authorized_keys"
  ssh-keygen -q -t ed25519 -N "" -C "bench-host-$k" -f "$hd/host_key"
  cat > "$hd/sshd_config" <<CONF
ListenAddress $ip_:$SSHD_PORT
HostKey $hd/host_key
AuthorizedKeysFile $hd/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PidFile $hd/sshd.pid
LogLevel INFO
CONF
  # `ip netns exec` execs sshd (through unshare and sh, which exec too), so $! is sshd itself; -D keeps it in the
  # foreground.
  if [ -n "${PLAIN_BASHRC:-}" ] && [ -f "$RCFILE" ]; then
    ip netns exec "$ns" unshare -m --propagation private \
      sh -c 'mount --bind "$1" "$2" && exec /usr/sbin/sshd -D -e -f "$3"' sh "$WORK/empty" "$RCFILE" "$hd/sshd_config" \
      < /dev/null > /dev/null 2> "$hd/sshd.log" &
  else
    ip netns exec "$ns" /usr/sbin/sshd -D -e -f "$hd/sshd_config" < /dev/null > /dev/null 2> "$hd/sshd.log" &
  fi
  SSHD_PIDS+=($!)
done
for k in 1 2 3; do
  ip_=${IPS[$((k - 1))]}
  for _ in $(seq 100); do port_open "$ip_" $SSHD_PORT && break; sleep 0.1; done
  port_open "$ip_" $SSHD_PORT || die "sshd of host h$k does not listen on $ip_:$SSHD_PORT after 10 s: $(cat "${HOSTDIRS[$((k - 1))]}/sshd.log")"
done
RUST_LOG=warn timeout 60 "$NONSTOP" hosts trust --all --config "$BOOT/nonstop.toml" > "$BOOT/trust.log" 2>&1 ||
  die "nonstop hosts trust --all failed: $(cat "$BOOT/trust.log")"
RUST_LOG=warn timeout 60 "$NONSTOP" hosts check --config "$BOOT/nonstop.toml" > "$BOOT/check.log" 2>&1 ||
  die "nonstop hosts check failed: $(cat "$BOOT/check.log")"
echo "3 SSH hosts: ${IPS[*]} (port $SSHD_PORT, namespaces ${NSS[*]}), trusted and checked"

# ---- One peer's round: a fresh serve, v1 -> v2 -> v3 ----
fail_peer() { # dir what
  echo "ssh_deploy.sh: $2" >&2
  for f in "$1"/deploy-*.err "$1/serve.log"; do
    [ -s "$f" ] && { echo "--- $f (last 30 lines)" >&2; tail -30 "$f" >&2; }
  done
  exit 1
}

run_peer() { # peer round
  local peer=$1 r=$2 d="$WORK/$1-$2" admin listen from to t0 t1
  if [ "$peer" = ssh ]; then admin=$ADMIN_SSH listen=$LISTEN_SSH; else admin=$ADMIN_LOCAL listen=$LISTEN_LOCAL; fi
  for _ in $(seq 300); do port_open "${listen%:*}" "${listen#*:}" || port_open "${admin%:*}" "${admin#*:}" || break; sleep 0.1; done
  write_config "$peer" "$d"
  if [ "$peer" = ssh ]; then mkdir -p "$d/state" && cp -a "$BOOT/state/ssh" "$d/state/"; fi
  "$NONSTOP" check --config "$d/nonstop.toml" > "$d/check.log" 2>&1 || fail_peer "$d" "nonstop check: $(cat "$d/check.log")"
  RUST_LOG=warn "$NONSTOP" serve --config "$d/nonstop.toml" > "$d/serve.log" 2>&1 &
  SERVE_PID=$!
  waited python3 "$HELPER" wait "$NONSTOP" "$admin" v1 3 120 || fail_peer "$d" "$peer round $r: serve did not bring up v1"
  from=v1
  for to in v2 v3; do
    t0=$(date +%s%N)
    waited timeout 300 "$NONSTOP" deploy --version $to --json --admin "$admin" > "$d/deploy-$to.jsonl" 2> "$d/deploy-$to.err" ||
      fail_peer "$d" "$peer round $r: nonstop deploy --version $to failed (exit $?): $(tail -3 "$d/deploy-$to.jsonl")"
    t1=$(date +%s%N)
    python3 "$HELPER" parts "$d/deploy-$to.jsonl" "$peer" "$r" $from $to $(((t1 - t0) / 1000000)) "$WORK/results.jsonl" ||
      fail_peer "$d" "$peer round $r: no timings in the deploy's output"
    waited python3 "$HELPER" wait "$NONSTOP" "$admin" $to 3 60 || fail_peer "$d" "$peer round $r: $to does not serve after the deploy"
    from=$to
  done
  stop_serve
  if [ "$peer" = ssh ]; then
    for ns in "${NSS[@]}"; do
      for p in $(ip netns pids "$ns"); do
        if tr '\0' ' ' < "/proc/$p/cmdline" 2> /dev/null | grep -q -- ' app --listen'; then
          echo "warning: an instance is left in $ns after serve exited: $(tr '\0' ' ' < "/proc/$p/cmdline")" >&2
          kill -KILL "$p" 2> /dev/null || true
        fi
      done
    done
  fi
  # The shipped releases (hundreds of MB a round) are no longer needed.
  rm -rf "$d/hosts" "$d/state/releases"
}

echo "$ROUNDS round(s); each peer: a fresh serve, deploy v1->v2, then v2->v3; soak_ms = 1000; all times in ms"
for r in $(seq "$ROUNDS"); do
  echo
  echo "round $r"
  python3 "$HELPER" header
  if [ $((r % 2)) = 1 ]; then order="ssh local"; else order="local ssh"; fi
  for peer in $order; do run_peer "$peer" "$r"; done
done
python3 "$HELPER" report "$WORK/results.jsonl"
