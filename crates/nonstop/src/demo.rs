//! `nonstop demo`: everything in one command, with nothing but this binary. It starts the proxy with three
//! supervised `nonstop app` instances (v1, one SQLite file), runs `nonstop load` phase by phase (GETs and POSTs,
//! tracking X-Nonstop-Version), and meanwhile deploys v2, kills an instance with SIGKILL, sends a burst of three
//! times the capacity, and tries a broken v3 that never becomes ready. It prints a verdict per phase, checks every
//! accepted order against the database, writes an HTML report, and exits 0 only if no request failed.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

use crate::admin_client;

#[derive(Args)]
pub struct DemoArgs {
    /// Directory for the demo's config, state, database, logs and report: created, or emptied first when it holds a
    /// previous demo's (its .nonstop-demo marker); any other non-empty directory is refused.
    #[arg(long, default_value = "nonstop-demo")]
    out: PathBuf,
    /// The port range of the app instances.
    #[arg(long, default_value = "19101-19140")]
    ports: String,
}

/// Work per request and workers per instance: capacity is INSTANCES * WORKERS * 1000 / WORK_MS requests/s.
const WORK_MS: u64 = 20;
const WORKERS: u64 = 2;
const INSTANCES: u64 = 3;
const CAPACITY_RPS: u64 = INSTANCES * WORKERS * 1000 / WORK_MS;
/// The steady rate, a third of capacity.
const STEADY_RPS: u64 = CAPACITY_RPS / 3;
/// The phases the demo runs (see `phases_run`).
const PHASES: usize = 5;

const SCENARIO: &str = r#"
[[flow]]
name = "read"
[[flow.step]]
url = "/"

[[flow]]
name = "order"
[[flow.step]]
method = "POST"
url = "/orders"
json = { item = "demo-{{seq}}", qty = 1 }
"#;

struct Phase {
    name: &'static str,
    what: String,
    doc: Value,
    html: String,
}

struct Demo {
    dir: PathBuf,
    exe: PathBuf,
    proxy: SocketAddr,
    admin: SocketAddr,
    phases: Vec<Phase>,
}

pub fn run(args: DemoArgs) -> ExitCode {
    match demo(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("nonstop demo: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn config(dir: &Path, exe: &Path, ports: &str) -> String {
    let command = format!(
        "{exe} app --listen {{addr}} --version {{version}} --instance {{instance}} --db sqlite://{db} \
         --work-ms {WORK_MS} --workers {WORKERS} --ready-after-ms ${{READY_AFTER_MS:-0}}",
        exe = exe.display(),
        db = dir.join("orders.db").display()
    );
    let q = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        r#"# Written by `nonstop demo`.
state_dir = "{state}"

[[listeners]]
listen = "127.0.0.1:0"

[admin]
listen = "127.0.0.1:0"

[access_log]
path = "{log}"

[[routes]]
service = "app"

[services.app]
balance = "least_inflight"

[services.app.retry]
add_idempotency_key = true

[services.app.admission]
# What one instance runs at once (its --workers); the rest waits in the proxy's queue, not in Tomcat's.
server_in_flight_max = {WORKERS}
# A burst may wait this long in the queue before the proxy sheds with 503 + Retry-After.
overload_wait_ms_max = 8000

[services.app.app]
command = "{command}"
count = {INSTANCES}
ports = "{ports}"
ready_interval_ms = 100
ready_timeout_ms = 5000
soak_ms = 3000
"#,
        state = q(&dir.join("state").display().to_string()),
        log = q(&dir.join("access.log").display().to_string()),
        command = q(&command),
    )
}

/// The file that says a directory is a demo's own, which the next demo may empty.
const MARKER: &str = ".nonstop-demo";

/// Makes `dir` the demo's: created when absent, used when empty, emptied when a previous demo's; anything else is
/// refused, so that `--out` never deletes what the demo did not create.
fn claim(dir: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
        if entries.next().is_some() {
            if !dir.join(MARKER).is_file() {
                bail!(
                    "{} is not empty and not a previous demo's (it has no {MARKER} file): refusing to delete it;                      choose another --out",
                    dir.display()
                );
            }
            std::fs::remove_dir_all(dir).with_context(|| format!("cannot empty {}", dir.display()))?;
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        dir.join(MARKER),
        "Written by `nonstop demo`: the next demo with this --out empties this directory.\n",
    )
    .with_context(|| format!("cannot write {}", dir.join(MARKER).display()))?;
    Ok(())
}

/// The `nonstop load` children running now, ended on SIGINT or SIGTERM.
static LOADS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// On the first SIGINT or SIGTERM: the load children are stopped, the proxy shuts down (its instances stopped),
/// and the demo exits 130 (SIGINT) or 143 (SIGTERM). A second signal exits at once.
fn on_signals(proxy: std::sync::Arc<std::sync::Mutex<Option<nonstop_proxy::Proxy>>>) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut int, mut term) = {
        let _g = rt.enter();
        (signal(SignalKind::interrupt())?, signal(SignalKind::terminate())?)
    };
    std::thread::spawn(move || {
        let code = rt.block_on(async {
            tokio::select! {
                _ = int.recv() => 130,
                _ = term.recv() => 143,
            }
        });
        eprintln!(
            "\nnonstop demo: {}: stopping the load, the proxy and its instances",
            if code == 130 { "SIGINT" } else { "SIGTERM" }
        );
        std::thread::spawn(move || {
            rt.block_on(async {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            });
            std::process::exit(code);
        });
        // Taken first: the main thread, seeing its load fail, then leaves the shutdown to this one.
        let proxy = proxy.lock().ok().and_then(|mut p| p.take());
        for pid in LOADS.lock().map(|l| l.clone()).unwrap_or_default() {
            // SAFETY: kill(2) on the pid of a child this process started and has not reaped (it is still listed).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        // None: the demo is past its phases and shuts the proxy down itself; it exits when done.
        if let Some(p) = proxy {
            p.shutdown();
            std::process::exit(code);
        }
    });
    Ok(())
}

fn demo(args: DemoArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    let exe = std::env::current_exe().context("cannot find this binary")?;
    let dir = std::path::absolute(&args.out).context("bad --out")?;
    claim(&dir)?;
    let config_path = dir.join("nonstop.toml");
    std::fs::write(&config_path, config(&dir, &exe, &args.ports))?;
    std::fs::write(dir.join("scenario.toml"), SCENARIO)?;

    println!("nonstop demo: proxy + 3 supervised app instances (v1, SQLite), capacity {CAPACITY_RPS} requests/s");
    println!("  config {}", config_path.display());
    let proxy = nonstop_proxy::Proxy::start(
        nonstop_proxy::ConfigSource::File(config_path.clone()),
        nonstop_proxy::Options { threads: 2, drain_timeout: Duration::from_secs(10) },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut d = Demo {
        dir: dir.clone(),
        exe,
        proxy: proxy.listen_addrs()[0],
        admin: proxy.admin_addr().context("the demo config has an admin API")?,
        phases: Vec::new(),
    };
    let proxy = std::sync::Arc::new(std::sync::Mutex::new(Some(proxy)));
    on_signals(proxy.clone())?;
    let result = d.phases_run();
    // Taken under the lock: a signal that arrived meanwhile shuts it down instead (and exits).
    let taken = proxy.lock().ok().and_then(|mut p| p.take());
    match taken {
        Some(p) => p.shutdown(),
        // The signal thread has it: it ends the instances and exits the process.
        None => loop {
            std::thread::sleep(Duration::from_secs(1));
        },
    }
    result?;
    let ok = d.verdict(started.elapsed())?;
    Ok(ok)
}

impl Demo {
    fn status(&self) -> anyhow::Result<Value> {
        let (code, text) = admin_client::call(self.admin, None, "GET", "/status", None)?;
        if code != 200 {
            bail!("status answered {code}: {text}");
        }
        Ok(serde_json::from_str::<Value>(&text)?["services"][0].clone())
    }

    fn wait_serving(&self, version: &str, limit: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + limit;
        loop {
            let s = self.status()?;
            let inst = s["instances"].as_array().cloned().unwrap_or_default();
            if inst.len() as u64 == INSTANCES
                && inst.iter().all(|i| i["version"] == version && i["state"] == "serving" && i["healthy"] == true)
            {
                return Ok(());
            }
            if Instant::now() > until {
                bail!("the instances did not all serve {version} within {limit:?}: {s}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The file of phase `n`'s events, which its load report marks on its charts.
    fn marks_file(&self, n: usize) -> PathBuf {
        self.dir.join(format!("phase-{n}.marks"))
    }

    /// Notes an event of phase `n` now, for its report's charts.
    fn mark(&self, n: usize, label: &str) {
        let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let line = serde_json::json!({ "at_ms": at_ms as u64, "label": label }).to_string() + "\n";
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .open(self.marks_file(n))
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
        if let Err(e) = appended {
            eprintln!("nonstop demo: cannot note the event {label:?} of phase {n}: {e}");
        }
    }

    /// Starts phase `n`'s load: `nonstop load` at `rate` for `secs`, writing JSON and an HTML page titled with the
    /// phase's name, linked back to the summary, with the phase's events marked.
    fn load(
        &self,
        n: usize,
        name: &str,
        rate: u64,
        secs: u64,
    ) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<(Value, String)>>> {
        let json = self.dir.join(format!("phase-{n}.json"));
        let html = format!("phase-{n}.html");
        let marks = self.marks_file(n);
        std::fs::write(&marks, "").with_context(|| format!("cannot create {}", marks.display()))?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("load")
            .arg(format!("http://{}", self.proxy))
            .arg("--scenario")
            .arg(self.dir.join("scenario.toml"))
            .args(["--rate", &rate.to_string(), "--duration", &format!("{secs}s"), "--connections", "3000"])
            .args(["--timeout", "30s", "--track-header", "X-Nonstop-Version", "--json"])
            .arg(&json)
            .arg("--html")
            .arg(self.dir.join(&html))
            .args(["--title", &format!("nonstop demo, phase {n} of {PHASES}: {name}"), "--back", "report.html"])
            .arg("--marks")
            .arg(&marks)
            .env("RUST_LOG", "warn");
        Ok(std::thread::spawn(move || {
            cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            let child = cmd.spawn().context("cannot run nonstop load")?;
            let pid = child.id();
            if let Ok(mut l) = LOADS.lock() {
                l.push(pid);
            }
            let out = child.wait_with_output();
            if let Ok(mut l) = LOADS.lock() {
                l.retain(|&p| p != pid);
            }
            let out = out.context("cannot run nonstop load")?;
            let text = std::fs::read_to_string(&json)
                .with_context(|| format!("nonstop load wrote no JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
            Ok((serde_json::from_str(&text)?, html))
        }))
    }

    /// Deploys `version` during phase `n`, marking its steps on the phase's charts.
    fn deploy(&self, n: usize, version: &str, env: &[(&str, &str)]) -> anyhow::Result<String> {
        let env: serde_json::Map<String, Value> =
            env.iter().map(|(k, v)| (k.to_string(), Value::String(v.to_string()))).collect();
        let body = serde_json::json!({ "version": version, "env": env }).to_string();
        let mut result = String::from("unknown");
        let r = admin_client::stream(self.admin, None, "POST", "/deploy", Some(&body), |line| {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                let at = v["at_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
                println!("    [{at:6.2}s] {}", v["message"].as_str().unwrap_or(""));
                let label = match v["step"].as_str().unwrap_or("") {
                    "start" => Some(format!("deploy of {version} starts")),
                    "in_service" => Some(format!("a {version} instance takes traffic")),
                    "drained" => Some("an old instance drained".to_string()),
                    "failed" => Some(format!("{version} failed")),
                    "rolled_back" => Some("rolled back".to_string()),
                    "done" => Some(format!("deploy of {version}: {}", v["result"].as_str().unwrap_or("done"))),
                    _ => None,
                };
                if let Some(label) = label {
                    self.mark(n, &label);
                }
                if v["done"] == true {
                    result = v["result"].as_str().unwrap_or("unknown").to_string();
                }
            }
        })?;
        if let Err((code, text)) = r {
            bail!("deploy of {version} refused ({code}): {text}");
        }
        Ok(result)
    }

    fn finish(
        &mut self,
        name: &'static str,
        what: String,
        h: std::thread::JoinHandle<anyhow::Result<(Value, String)>>,
    ) -> anyhow::Result<()> {
        let (doc, html) = h.join().map_err(|_| anyhow::anyhow!("the load thread panicked"))??;
        let r = &doc["requests"];
        println!(
            "    -> {} requests, {} failed, p99 {:.1} ms, versions {}",
            r["scheduled"],
            r["failed"],
            doc["latency_ms"]["p99"].as_f64().unwrap_or(0.0),
            doc["headers"]
        );
        self.phases.push(Phase { name, what, doc, html });
        Ok(())
    }

    fn phases_run(&mut self) -> anyhow::Result<()> {
        self.wait_serving("v1", Duration::from_secs(30))?;

        println!("\n1. steady: {STEADY_RPS} requests/s on v1");
        let h = self.load(1, "steady v1", STEADY_RPS, 4)?;
        self.finish("steady v1", format!("{STEADY_RPS} req/s, half GET /, half POST /orders"), h)?;

        println!("\n2. rolling deploy v1 -> v2 under load");
        let h = self.load(2, "rolling deploy to v2", STEADY_RPS, 10)?;
        std::thread::sleep(Duration::from_secs(1));
        let r = self.deploy(2, "v2", &[])?;
        if r != "succeeded" {
            bail!("the deploy of v2 ended {r}");
        }
        self.finish("rolling deploy to v2", "start new, wait ready, slow start, drain old, soak, stop old".into(), h)?;

        println!("\n3. kill -9 of one instance under load");
        let h = self.load(3, "kill -9 one instance", STEADY_RPS, 8)?;
        std::thread::sleep(Duration::from_secs(2));
        let victim = self.status()?["instances"][0].clone();
        let pid = victim["pid"].as_i64().context("an instance pid")? as i32;
        println!("    SIGKILL to instance {} (pid {pid}); the supervisor restarts it", victim["id"]);
        self.mark(3, &format!("kill -9 of instance {}", victim["id"]));
        // SAFETY: kill(2) on a pid the proxy reported for its own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        self.finish("kill -9 one instance", format!("SIGKILL to pid {pid} at 2 s"), h)?;
        self.wait_serving("v2", Duration::from_secs(20))?;

        let burst = 3 * CAPACITY_RPS;
        println!("\n4. burst: {burst} requests/s (3x capacity) for 2 s");
        let h = self.load(4, "burst 3x capacity", burst, 2)?;
        self.finish("burst 3x capacity", format!("{burst} req/s for 2 s; the excess waits in the proxy's queue"), h)?;

        println!("\n5. broken v3 (never ready) under load: automatic rollback");
        let h = self.load(5, "broken v3 rolled back", STEADY_RPS, 8)?;
        std::thread::sleep(Duration::from_secs(1));
        let r = self.deploy(5, "v3", &[("READY_AFTER_MS", "100000000")])?;
        if r != "rolled_back" {
            bail!("the broken v3 ended {r}, not rolled back");
        }
        self.finish(
            "broken v3 rolled back",
            "v3's health stays 503: not ready in 5 s, so traffic stays on v2".into(),
            h,
        )?;
        self.wait_serving("v2", Duration::from_secs(20))?;
        Ok(())
    }

    /// Prints the verdict and writes the report; true when nothing failed and every order is stored.
    fn verdict(&self, took: Duration) -> anyhow::Result<bool> {
        // The proxy is gone now; count the rows straight from the instances' database file through a fresh app.
        let rows = count_rows(&self.exe, &self.dir)?;
        let accepted: u64 = self.phases.iter().map(|p| p.doc["status"]["201"].as_u64().unwrap_or(0)).sum();
        let failed: u64 = self.phases.iter().map(|p| p.doc["requests"]["failed"].as_u64().unwrap_or(0)).sum();
        let total: u64 = self.phases.iter().map(|p| p.doc["requests"]["scheduled"].as_u64().unwrap_or(0)).sum();
        let ok = failed == 0 && rows == accepted && self.phases.iter().all(|p| p.doc["valid"] == true);

        println!("\nverdict ({:.0} s)", took.as_secs_f64());
        println!("  {:<24} {:>9} {:>7} {:>9}  versions", "phase", "requests", "failed", "p99 ms");
        let mut rows_html = String::new();
        for p in &self.phases {
            let r = &p.doc["requests"];
            let versions = versions(&p.doc["headers"]);
            let p99 = p.doc["latency_ms"]["p99"].as_f64().unwrap_or(0.0);
            println!(
                "  {:<24} {:>9} {:>7} {:>9.1}  {versions}",
                p.name,
                r["scheduled"].to_string(),
                r["failed"].to_string(),
                p99
            );
            let _ = write!(
                rows_html,
                "<tr><td><a href=\"{}\">{}</a></td><td>{}</td><td>{}</td><td class=\"{}\">{}</td><td>{p99:.1}</td><td>{}</td></tr>",
                p.html,
                esc(p.name),
                esc(&p.what),
                r["scheduled"],
                if r["failed"] == 0 { "ok" } else { "bad" },
                r["failed"],
                esc(&versions)
            );
        }
        println!("  {:<24} {total:>9} {failed:>7}", "total");
        println!("  orders accepted (201): {accepted}; rows in the database: {rows}");
        let line = if ok {
            format!("PASS: {total} requests, none failed; every accepted order is stored exactly once")
        } else {
            format!("FAIL: {failed} of {total} requests failed; {accepted} orders accepted, {rows} rows stored")
        };
        println!("  {line}");
        let charts = self.whole_run_charts();
        let report = self.dir.join("report.html");
        let html = format!(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>nonstop demo</title><style>\
             body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;text-align:left}}\
             .ok{{color:#080}}.bad{{color:#b00;font-weight:bold}}\
             .legend span{{margin-right:14px}}.legend i{{display:inline-block;width:10px;height:10px;margin-right:4px}}\
             </style></head><body>\
             <h1>nonstop demo</h1><p id=\"verdict\" class=\"{cls}\">{line}</p>\
             <p>Three supervised <code>nonstop app</code> instances (capacity {CAPACITY_RPS} requests/s) behind \
             <code>nonstop serve</code>; load from <code>nonstop load</code> (open model, half GET /, half POST \
             /orders with Idempotency-Key), {secs:.0} s in all.</p>\
             <table><tr><th>phase</th><th>what happened</th><th>requests</th><th>failed</th><th>p99 ms</th>\
             <th>versions served</th></tr>{rows_html}</table>\
             <p>Orders accepted (201): <b>{accepted}</b>. Rows in the database: <b>{rows}</b>.</p>\
             <p>The whole run, phase after phase (each phase's start and its events are marked):</p>{charts}\
             <p>Each phase links to its own load report. Config: <code>nonstop.toml</code>; deploy history: \
             <code>state/deploys.jsonl</code>; instance logs: <code>state/logs/</code>.</p></body></html>\n",
            cls = if ok { "ok" } else { "bad" },
            line = esc(&line),
            secs = took.as_secs_f64(),
        );
        std::fs::write(&report, html)?;
        println!("  report: {}", report.display());
        Ok(ok)
    }
}

impl Demo {
    /// The charts of every phase's timeline on one time axis, from the phases' reports, with each phase's start
    /// and events marked.
    fn whole_run_charts(&self) -> String {
        let Some(first) = self.phases.first().and_then(|p| p.doc["start_unix_ms"].as_u64()) else {
            return String::new();
        };
        let mut timeline = Vec::new();
        let mut marks = Vec::new();
        for (i, p) in self.phases.iter().enumerate() {
            let offset_ms = p.doc["start_unix_ms"].as_u64().unwrap_or(first).saturating_sub(first);
            let offset_s = offset_ms.div_ceil(1000);
            let seconds = p.doc["timeline"].as_array().map(Vec::as_slice).unwrap_or_default();
            timeline.extend(seconds.iter().filter_map(|v| nonstop_load::report::second_of_json(v, offset_s)));
            marks.push(nonstop_load::html::Mark { at_s: offset_s as f64, label: format!("{}. {}", i + 1, p.name) });
            for m in p.doc["marks"].as_array().map(Vec::as_slice).unwrap_or_default() {
                if let (Some(at), Some(label)) = (m["at_s"].as_f64(), m["label"].as_str()) {
                    marks.push(nonstop_load::html::Mark { at_s: offset_s as f64 + at, label: label.to_string() });
                }
            }
        }
        timeline.sort_by_key(|s| s.t);
        timeline.dedup_by_key(|s| s.t);
        nonstop_load::html::charts(&timeline, &marks, false)
    }
}

fn versions(headers: &Value) -> String {
    match headers.as_object() {
        Some(m) if !m.is_empty() => m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", "),
        _ => "-".into(),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// Counts the orders table with a short-lived app on the same database (GET /orders/count).
fn count_rows(exe: &Path, dir: &Path) -> anyhow::Result<u64> {
    use std::io::{BufRead, BufReader};
    let db = format!("sqlite://{}", dir.join("orders.db").display());
    let mut child = Command::new(exe)
        .args(["app", "--listen", "127.0.0.1:0", "--db", &db, "--instance", "counter"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start an app to count the orders")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("piped")?).read_line(&mut line)?;
    let addr: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("no address from the counting app: {line:?}"))?;
    let counted = admin_client::call(addr, None, "GET", "/orders/count", None);
    let _ = child.kill();
    let _ = child.wait();
    let (code, text) = counted?;
    if code != 200 {
        bail!("GET /orders/count answered {code}: {text}");
    }
    serde_json::from_str::<Value>(&text)?["count"].as_u64().context("a count")
}
