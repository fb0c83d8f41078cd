#!/usr/bin/env python3
"""Helper of bench/ssh_deploy.sh (see there).

  ssh_deploy.py wait NONSTOP ADMIN VERSION COUNT SECONDS
      polls `nonstop status --json` until COUNT healthy serving instances of VERSION run and no deploy does
  ssh_deploy.py parts DEPLOY_JSONL PEER ROUND FROM TO WALL_MS RESULTS
      derives the parts of one deploy from its JSON lines, appends them to RESULTS (JSON lines), prints a row
  ssh_deploy.py header
      the header of the rows `parts` prints
  ssh_deploy.py report RESULTS
      medians per peer (and per transition), and the ratios ssh/local
"""
import json
import statistics
import subprocess
import sys
import time

COLS = [("total", 7), ("wall", 7), ("ship", 7), ("rollout", 8), ("drain", 6), ("soak", 6), ("stop", 6)]


def die(msg):
    print(f"ssh_deploy.py: {msg}", file=sys.stderr)
    sys.exit(1)


def wait(nonstop, admin, version, count, seconds):
    deadline = time.monotonic() + float(seconds)
    last = "no status yet"
    while time.monotonic() < deadline:
        try:
            out = subprocess.run([nonstop, "status", "--json", "--admin", admin], capture_output=True, timeout=10)
            if out.returncode == 0:
                svc = json.loads(out.stdout)["services"][0]
                inst = svc.get("instances") or []
                good = [i for i in inst if i.get("version") == version and i.get("state") == "serving"
                        and i.get("healthy") is True and i.get("running") is True]
                last = ", ".join(f"{i.get('id')} {i.get('version')} {i.get('state')} healthy={i.get('healthy')}"
                                 for i in inst) or "no instance"
                if len(good) == int(count) and len(inst) == int(count) and svc.get("deploy") is None:
                    return
            else:
                last = (out.stderr or out.stdout).decode(errors="replace").strip()
        except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError) as e:
            last = repr(e)
        time.sleep(0.2)
    die(f"not {count} healthy serving instances of {version} after {seconds} s at {admin}: {last}")


def events(path):
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                v = json.loads(line)
            except ValueError:
                continue
            if "step" in v:
                out.append(v)
    return out


def parts(path, peer, rnd, frm, to, wall_ms, results):
    ev = events(path)
    at = lambda e: int(e.get("at_ms", 0))
    first = lambda s: next((at(e) for e in ev if e["step"] == s), None)
    last = lambda s: next((at(e) for e in reversed(ev) if e["step"] == s), None)
    done = next((e for e in reversed(ev) if e["step"] == "done"), None)
    if done is None:
        die(f"{peer} round {rnd} {frm}->{to}: no `done` event in {path}")
    if done.get("result") != "succeeded":
        die(f"{peer} round {rnd} {frm}->{to}: the deploy did not succeed: {done.get('message')}")
    start = first("start") or 0
    shipped = [e for e in ev if e["step"] == "shipped"]
    r = {"peer": peer, "round": int(rnd), "from": frm, "to": to, "wall": int(wall_ms),
         "total": at(done) - start,
         "ship": (last("shipped") - start) if shipped else 0,
         "ship_hosts": [{"host": e.get("host"), "ms": e.get("ms"), "bytes": e.get("bytes")} for e in shipped]}
    if first("started") is None or last("in_service") is None:
        die(f"{peer} round {rnd} {frm}->{to}: no started/in_service events in {path}")
    r["rollout"] = last("in_service") - first("started")
    # Per new instance, in the order started: started -> ready.
    ready = []
    for s in (e for e in ev if e["step"] == "started"):
        rd = next((at(e) for e in ev if e["step"] == "ready" and e.get("instance") == s.get("instance")), None)
        ready.append(None if rd is None else rd - at(s))
    r["ready"] = ready
    # Drain: each wave's old instance, from the new one taking traffic to the old one drained (summed).
    ins = [at(e) for e in ev if e["step"] == "in_service"]
    drs = [at(e) for e in ev if e["step"] == "drained"]
    r["drain"] = sum(d - i for i, d in zip(ins, drs))
    r["soak"] = (first("soak_passed") - first("soak")) if first("soak") is not None and first("soak_passed") is not None else 0
    r["stop"] = at(done) - last("soak_passed") if last("soak_passed") is not None else 0
    with open(results, "a") as f:
        f.write(json.dumps(r) + "\n")
    print(row(r))


def header():
    h = f"{'peer':<6} {'round':>5} {'deploy':<7} " + " ".join(f"{n:>{w}}" for n, w in COLS)
    return h + "  start->ready per instance (ms)"


def row(r, label=None):
    if label is None:
        deploy = f"{r['from']}->{r['to']}"
        label = f"{r['peer']:<6} {r['round']:>5} {deploy:<7}"
    cells = " ".join(f"{fmt(r.get(n)):>{w}}" for n, w in COLS)
    ready = " ".join(fmt(x) for x in r.get("ready", []))
    return f"{label} {cells}  {ready}"


def fmt(x):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.0f}"
    return str(x)


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def medians(rs):
    m = {n: med([r[n] for r in rs]) for n, _ in COLS}
    k = max((len(r["ready"]) for r in rs), default=0)
    m["ready"] = [med([r["ready"][j] for r in rs if j < len(r["ready"])]) for j in range(k)]
    return m


def report(results):
    rs = [json.loads(l) for l in open(results) if l.strip()]
    if not rs:
        die("no results")
    n = len({r["round"] for r in rs})
    print()
    print(f"medians over {n} round(s), milliseconds (deploy's own clock; wall = the `nonstop deploy` command):")
    print(f"{'peer':<6} {'deploy':<13} " + " ".join(f"{n:>{w}}" for n, w in COLS) + "  start->ready per instance")
    groups = {}
    for peer in ("ssh", "local"):
        mine = [r for r in rs if r["peer"] == peer]
        for tr in sorted({(r["from"], r["to"]) for r in mine}):
            sel = [r for r in mine if (r["from"], r["to"]) == tr]
            groups[(peer, tr)] = medians(sel)
            print(row(groups[(peer, tr)], f"{peer:<6} {tr[0] + '->' + tr[1]:<13}"))
        groups[(peer, "all")] = medians(mine)
        print(row(groups[(peer, "all")], f"{peer:<6} {'both':<13}"))
    print()
    print("ratio ssh/local of the medians:")
    keys = sorted({k[1] for k in groups if k[1] != "all"}) + ["all"]
    for tr in keys:
        s, l = groups.get(("ssh", tr)), groups.get(("local", tr))
        if not s or not l:
            continue
        name = "both" if tr == "all" else f"{tr[0]}->{tr[1]}"
        ratio = lambda a, b: f"{a / b:.2f}x" if a is not None and b else "-"
        print(f"  {name:<8} total {ratio(s['total'], l['total'])} ({fmt(s['total'])} / {fmt(l['total'])} ms)   "
              f"rollout {ratio(s['rollout'], l['rollout'])} ({fmt(s['rollout'])} / {fmt(l['rollout'])} ms)")
    ships = [h for r in rs if r["peer"] == "ssh" for h in r["ship_hosts"]]
    if ships:
        sizes = sorted({h["bytes"] for h in ships if h.get("bytes")})
        ms = [h["ms"] for h in ships if h.get("ms") is not None and h.get("bytes")]
        mb = ", ".join(f"{b / 1e6:.1f} MB" for b in sizes) or "0 (already there)"
        print()
        print(f"release shipped: {mb} to each host per version; per-host ship time median {fmt(med(ms))} ms, "
              f"min {fmt(min(ms) if ms else None)}, max {fmt(max(ms) if ms else None)} "
              f"({len(ms)} shipments, the 3 hosts of a deploy in parallel)")


def main():
    a = sys.argv[1:]
    if not a:
        die(__doc__)
    if a[0] == "wait" and len(a) == 6:
        wait(*a[1:])
    elif a[0] == "parts" and len(a) == 8:
        parts(*a[1:])
    elif a[0] == "header":
        print(header())
    elif a[0] == "report" and len(a) == 2:
        report(a[1])
    else:
        die(__doc__)


if __name__ == "__main__":
    main()
