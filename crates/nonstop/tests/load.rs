//! Integration tests of `nonstop load` against real `nonstop app` processes on loopback.

use std::path::Path;
use std::process::Command;

use nonstop_testkit::{headless, Proc, TempDir};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn app(dir: &TempDir, extra: &[&str]) -> Proc {
    let db = format!("sqlite://{}", dir.path().join("a.db").display());
    let mut args = vec!["app", "--listen", "127.0.0.1:0", "--db", &db];
    args.extend_from_slice(extra);
    Proc::start(bin(), &args)
}

/// Runs `nonstop load` with `args` plus `--json`, returning the exit code, stdout and the JSON document.
fn load(dir: &TempDir, args: &[&str]) -> (i32, String, serde_json::Value) {
    let json = dir.path().join(format!("run-{}.json", args.len()));
    let _ = std::fs::remove_file(&json); // a run that writes none must not be judged by an earlier one's
    let out = Command::new(bin())
        .arg("load")
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run nonstop load");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let doc = std::fs::read_to_string(&json).map(|t| serde_json::from_str(&t).expect("valid JSON")).unwrap_or_default();
    (out.status.code().unwrap_or(-1), stdout, doc)
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// Every scheduled request is in exactly one bucket, overall and in the timeline.
fn assert_exact_accounting(doc: &serde_json::Value) {
    let r = &doc["requests"];
    let statuses: u64 = doc["status"].as_object().unwrap().values().map(n).sum();
    let errors = ["connect", "reset", "timeout", "check"].iter().map(|k| n(&doc["errors"][*k])).sum::<u64>();
    assert_eq!(statuses + errors + n(&r["not_sent"]), n(&r["scheduled"]), "{doc}");
    assert_eq!(n(&r["ok"]) + n(&r["failed"]), n(&r["scheduled"]), "{doc}");
    let timeline: u64 = doc["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            ["ok", "http_4xx", "http_5xx", "connect", "reset", "timeout", "check", "not_sent"]
                .iter()
                .map(|k| n(&t[*k]))
                .sum::<u64>()
        })
        .sum();
    assert_eq!(timeline, n(&r["scheduled"]), "the per-second timeline must account for every request");
}

#[test]
fn open_model_schedules_exactly_and_tracks_a_header() {
    let dir = TempDir::new("load-open");
    let a = app(&dir, &["--version", "v7"]);
    let url = a.url("/");
    let (code, stdout, doc) = load(
        &dir,
        &[&url, "--rate", "200", "--duration", "3s", "--track-header", "X-Nonstop-Version", "--threads", "2"],
    );
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(n(&doc["requests"]["scheduled"]), 600, "3 s at 200/s is exactly 600 requests");
    assert_eq!(n(&doc["requests"]["ok"]), 600, "{stdout}");
    assert_exact_accounting(&doc);
    assert_eq!(n(&doc["headers"]["v7"]), 600);
    assert_eq!(doc["valid"], true);
    let achieved = doc["rate"]["achieved"].as_f64().unwrap();
    assert!((achieved - 200.0).abs() < 2.0, "achieved {achieved}");
    assert!(doc["timeline"].as_array().unwrap().len() >= 3);
}

#[test]
fn corrected_p99_shows_a_stall_that_the_uncorrected_one_hides() {
    let dir = TempDir::new("load-co");
    // All workers stall for 1 s every 5 s (at 5 s and 10 s after start).
    let a = app(&dir, &["--stall-every-ms", "5000", "--stall-ms", "1000"]);
    let url = a.url("/");
    // One connection: while it waits out a stall, the requests due meanwhile queue behind it, as in wrk. Measured
    // from their send, they look fast; measured from their schedule, they waited for the stall.
    let (code, stdout, doc) =
        load(&dir, &[&url, "--rate", "100", "--duration", "12s", "--connections", "1", "--threads", "1"]);
    assert_eq!(code, 0, "{stdout}");
    assert_exact_accounting(&doc);
    assert_eq!(n(&doc["requests"]["scheduled"]), 1200);
    let corrected = doc["latency_ms"]["p99"].as_f64().unwrap();
    let uncorrected = doc["latency_uncorrected_ms"]["p99"].as_f64().unwrap();
    assert!(corrected > 500.0, "corrected p99 {corrected} ms must show the 1 s stalls; {stdout}");
    assert!(uncorrected < 100.0, "uncorrected p99 {uncorrected} ms should hide them; {stdout}");
    assert!(n(&doc["max_success_gap_ms"]) >= 500, "{stdout}");
}

#[test]
fn closed_model_accounts_for_every_request() {
    let dir = TempDir::new("load-closed");
    let a = app(&dir, &[]);
    let url = a.url("/");
    let (code, stdout, doc) = load(&dir, &[&url, "--connections", "4", "--duration", "2s", "--threads", "2"]);
    assert_eq!(code, 0, "{stdout}");
    assert_exact_accounting(&doc);
    assert!(n(&doc["requests"]["ok"]) > 100, "{stdout}");
    assert_eq!(n(&doc["requests"]["not_sent"]), 0);
    assert_eq!(doc["model"], "closed");
}

/// `--json -`: stdout is the JSON document alone (for `| jq`), and the text report goes to stderr.
#[test]
fn json_to_stdout_leaves_stdout_to_the_document() {
    let dir = TempDir::new("load-json-stdout");
    let a = app(&dir, &[]);
    let out = Command::new(bin())
        .args(["load", &a.url("/"), "--rate", "50", "--duration", "1s", "--threshold", "failed==0", "--json", "-"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(n(&doc["requests"]["scheduled"]), 50, "{doc}");
    assert_exact_accounting(&doc);
    assert!(stderr.contains("threshold failed==0: ok"), "the text report is on stderr: {stderr}");
    assert!(!Path::new("-").exists(), "no file named -");
}

/// `--marks`: a bad line is named before any load is sent (exit 2); good marks are placed on the run's own clock.
#[test]
fn marks_from_a_file_are_placed_on_the_run_and_a_bad_file_is_refused_at_once() {
    let dir = TempDir::new("load-marks");
    let a = app(&dir, &[]);
    let marks = dir.path().join("events.marks");
    std::fs::write(&marks, "{\"at_ms\": 1, \"label\": \"ok\"}\n{\"label\": \"no time\"}\n").unwrap();
    let html = dir.path().join("page.html");
    let run = |extra: &[&str]| {
        Command::new(bin())
            .args(["load", &a.url("/"), "--rate", "20", "--duration", "2s", "--json", "-", "--html"])
            .arg(&html)
            .arg("--marks")
            .arg(&marks)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("events.marks") && err.contains("line 2: expected"), "{err}");
    assert!(!err.contains("requests"), "refused before the run: {err}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    std::fs::write(&marks, format!("{{\"at_ms\": {}, \"label\": \"switched\"}}\n", now + 1000)).unwrap();
    let out = run(&["--title", "a run with an event", "--back", "index.html"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let at = doc["marks"][0]["at_s"].as_f64().unwrap();
    assert!(doc["start_unix_ms"].as_u64().unwrap() >= now && at > 0.0 && at <= 1.0, "{doc}");
    assert_eq!(doc["marks"][0]["label"], "switched");
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<h1>a run with an event</h1>") && page.contains("href=\"index.html\""), "{page}");
    assert!(page.contains("class=\"mark\"") && page.contains("switched"), "{page}");
}

#[test]
fn thresholds_set_the_exit_status() {
    let dir = TempDir::new("load-thresholds");
    let a = app(&dir, &["--fail-rate", "0.5"]);
    let url = a.url("/orders/count");
    let (code, stdout, doc) = load(&dir, &[&url, "--rate", "100", "--duration", "1s", "--threshold", "ok>=1"]);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("threshold ok>=1: ok"), "{stdout}");
    assert_exact_accounting(&doc);
    let (code, stdout, _) = load(&dir, &[&url, "--rate", "100", "--duration", "1s", "--threshold", "failed==0"]);
    assert_eq!(code, 1, "half the requests fail, so failed==0 must fail: {stdout}");
    assert!(stdout.contains("threshold failed==0: FAILED"), "{stdout}");

    // Nothing listens: every request is a connect error, and they are all counted.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (code, _, doc) =
        load(&dir, &[&format!("http://{dead}/"), "--rate", "50", "--duration", "1s", "--threshold", "errors==0"]);
    assert_eq!(code, 1);
    assert_eq!(n(&doc["errors"]["connect"]), 50);
    assert_exact_accounting(&doc);

    // Bad arguments: exit 2, every problem named at once.
    let out = Command::new(bin())
        .args(["load", "ftp://x/", "--rate=-1", "--duration", "soon", "--threshold", "p98<1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["--duration \"soon\"", "only http://", "unknown metric \"p98\"", "--rate must be"] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }
}

#[test]
fn a_slow_server_gives_timeouts_in_both_models() {
    let dir = TempDir::new("load-timeout");
    let a = app(&dir, &["--work-ms", "1500", "--workers", "64"]);
    let url = a.url("/");
    let (code, stdout, doc) =
        load(&dir, &[&url, "--rate", "20", "--duration", "1s", "--timeout", "300ms", "--threshold", "errors==0"]);
    assert_eq!(code, 1, "{stdout}");
    assert_eq!(n(&doc["errors"]["timeout"]), 20, "{stdout}");
    assert_exact_accounting(&doc);
    let p99 = doc["latency_ms"]["p99"].as_f64().unwrap();
    assert_eq!(p99, 0.0, "timeouts carry no response latency");
    let (_, stdout, doc) = load(&dir, &[&url, "--connections", "2", "--duration", "1s", "--timeout", "300ms"]);
    assert!(n(&doc["errors"]["timeout"]) >= 2, "{stdout}");
    assert_eq!(n(&doc["requests"]["ok"]), 0, "{stdout}");
    assert_exact_accounting(&doc);
}

#[test]
fn html_report_renders_its_charts_in_headless_chromium() {
    let dir = TempDir::new("load-html");
    let a = app(&dir, &["--version", "v3", "--fail-rate", "0.2"]);
    let url = a.url("/");
    let page = dir.path().join("report.html");
    let out = Command::new(bin())
        .args(["load", &url, "--rate", "100", "--duration", "3s", "--track-header", "X-Nonstop-Version", "--html"])
        .arg(&page)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let html = std::fs::read_to_string(&page).unwrap();
    for external in ["<script", "<link", "src=", "href=", "@import", "url("] {
        assert!(!html.contains(external), "the page must need no network or script: found {external:?}");
    }

    // The DOM as Chromium parsed it: three charts, with bars for outcomes and header values, and four lines.
    let dom = headless(&dir, &["--dump-dom"], &page);
    let dom = String::from_utf8_lossy(&dom.stdout);
    for id in ["throughput", "latency", "headers"] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "chart {id} missing from the rendered DOM");
    }
    let chart =
        |id: &str| dom.split(&format!("id=\"{id}\"")).nth(1).unwrap().split("</svg>").next().unwrap().to_string();
    assert!(chart("throughput").matches("class=\"bar\"").count() >= 3, "throughput bars");
    assert!(chart("throughput").contains("5xx"), "the injected failures appear in the throughput chart");
    assert_eq!(chart("latency").matches("<polyline").count(), 4, "p50, p90, p99 and max lines");
    assert!(chart("headers").contains("v3"), "the tracked header's value is charted");

    // And it paints: a screenshot of the page is produced.
    let shot = dir.path().join("report.png");
    let out = headless(&dir, &["--window-size=1000,1200", &format!("--screenshot={}", shot.display())], &page);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "the screenshot is (nearly) empty");
}

#[test]
fn find_max_reports_the_capacity_of_a_bounded_server() {
    let dir = TempDir::new("load-find-max");
    // 4 workers holding each request 10 ms, no accept queue: about 400 requests/s, then immediate 503s.
    let a = app(&dir, &["--workers", "4", "--accept-queue", "0", "--work-ms", "10"]);
    let url = a.url("/");
    let json = dir.path().join("find.json");
    let out = Command::new(bin())
        .args([
            "load",
            &url,
            "--find-max",
            "--step",
            "1s",
            "--start-rate",
            "50",
            "--max-error-rate",
            "1",
            "--max-p99",
            "200ms",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rate = doc["find_max"]["rate"].as_f64().unwrap();
    assert!((150.0..=450.0).contains(&rate), "found {rate}/s for a ~400/s server: {stdout}");
    let steps = doc["find_max"]["steps"].as_array().unwrap();
    assert!(steps.iter().any(|s| s["passed"] == false), "the search must have crossed the capacity: {stdout}");
    assert!(steps.len() <= 12);
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches(" kB").parse().ok()
}

#[test]
fn memory_stays_flat_over_a_two_minute_run_at_5000_per_second() {
    let dir = TempDir::new("load-memory");
    let a = app(&dir, &[]);
    let url = a.url("/health");
    let json = dir.path().join("memory.json");
    let mut child = Command::new(bin())
        .args(["load", &url, "--rate", "5000", "--duration", "120s", "--threads", "2", "--json"])
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let started = std::time::Instant::now();
    let mut samples = Vec::new(); // (seconds into the run, RSS KiB)
    while child.try_wait().unwrap().is_none() {
        std::thread::sleep(std::time::Duration::from_secs(5));
        if let Some(kib) = rss_kib(pid) {
            samples.push((started.elapsed().as_secs(), kib));
        }
        assert!(started.elapsed().as_secs() < 200, "the run did not end");
    }
    assert!(child.wait().unwrap().success());
    // After warm-up (the first 20 s), memory may not keep growing: the last sample is within 8 MiB of the
    // first one after warm-up, across the 100 s that follow.
    let after_warmup: Vec<u64> = samples.iter().filter(|(t, _)| *t >= 20).map(|(_, k)| *k).collect();
    assert!(after_warmup.len() >= 15, "too few samples: {samples:?}");
    let (first, last) = (after_warmup[0], *after_warmup.last().unwrap());
    assert!(last < first + 8 * 1024, "RSS grew from {first} KiB to {last} KiB over the run: {samples:?}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(n(&doc["requests"]["scheduled"]), 600_000);
    assert_exact_accounting(&doc);
    eprintln!("memory samples (s, KiB): {samples:?}; ok {}", doc["requests"]["ok"]);
}

#[test]
fn a_terminal_gets_a_live_progress_line_and_a_pipe_does_not() {
    let dir = TempDir::new("load-progress");
    let a = app(&dir, &[]);
    let cmd = format!("{} load {} --rate 100 --duration 3s", bin().display(), a.url("/"));
    // `script` runs the command on a pseudo-terminal, as a person at a shell would.
    let tty = Command::new("script").args(["-qfec", &cmd, "/dev/null"]).output().expect("script(1) from util-linux");
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(shown.matches("\r\x1b[K").count() >= 3, "no live line: {shown:?}");
    assert!(shown.contains("rate") && shown.contains("p99") && shown.contains("ok"), "{shown:?}");
    let piped = Command::new(bin()).args(["load", &a.url("/"), "--rate", "100", "--duration", "2s"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("\x1b[K"), "progress drawn into a pipe");
}

#[test]
fn http2_with_prior_knowledge() {
    let dir = TempDir::new("load-h2");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let echo = rt.block_on(nonstop_testkit::echo::start("e"));
    let url = format!("http://{echo}/");
    let (code, stdout, doc) =
        load(&dir, &[&url, "--http2", "--rate", "200", "--duration", "2s", "--track-header", "x-echo-version"]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(n(&doc["requests"]["ok"]), 400, "{stdout}");
    assert_eq!(n(&doc["headers"]["HTTP/2.0"]), 400, "every request went over HTTP/2: {}", doc["headers"]);
    assert_exact_accounting(&doc);
    let (code, stdout, doc) =
        load(&dir, &[&url, "--http2", "--connections", "8", "--duration", "1s", "--track-header", "x-echo-version"]);
    assert_eq!(code, 0, "{stdout}");
    assert_eq!(n(&doc["headers"]["HTTP/2.0"]), n(&doc["requests"]["ok"]));
    assert!(n(&doc["requests"]["ok"]) > 100, "{stdout}");
    assert_exact_accounting(&doc);
}

#[test]
fn scenario_flows_capture_check_and_count_every_step() {
    let dir = TempDir::new("load-scenario");
    let a = app(&dir, &[]);
    let scenario = dir.path().join("orders.toml");
    std::fs::write(
        &scenario,
        r#"
[[flow]]
name = "order"
weight = 1
[[flow.step]]
method = "POST"
url = "/orders"
headers = { "Idempotency-Key" = "{{uuid}}" }
json = { item = "book-{{seq}}", qty = 2 }
capture = { order_id = "id" }
check = { status = 201, json_path = "qty", json_equals = 2 }
[[flow.step]]
url = "/orders/{{order_id}}"
check = { status = 200, body_contains = "book-" }
think_ms = 5

[[flow]]
name = "wrong expectation"
weight = 1
[[flow.step]]
url = "/"
check = { body_contains = "this text is not there" }
"#,
    )
    .unwrap();
    let base = a.url("");
    let (code, stdout, doc) =
        load(&dir, &[&base, "--scenario", scenario.to_str().unwrap(), "--rate", "50", "--duration", "2s"]);
    assert_eq!(code, 0, "{stdout}");
    assert_exact_accounting(&doc);
    let checks = n(&doc["errors"]["check"]);
    let ok = n(&doc["requests"]["ok"]);
    // 100 arrivals: each "order" flow makes 2 ok requests, each "wrong expectation" flow 1 failed check.
    assert_eq!(checks + ok / 2, 100, "{stdout}");
    assert!(checks > 20 && ok > 40, "both flows ran: {stdout}");
    assert_eq!(ok % 2, 0, "every order flow ran both steps: {stdout}");
    let rows = nonstop_testkit::Conn::open(a.addr);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let count = rt.block_on(async {
        let mut c = rows.await.unwrap();
        c.send(nonstop_testkit::Method::GET, "/orders/count", &[], "").await.unwrap().json()["count"].as_u64().unwrap()
    });
    assert_eq!(count, ok / 2, "one row per successful POST step");
    // Broken down by flow and step, in the JSON and the text: each step's requests and how they ended.
    let steps = doc["steps"].as_array().unwrap_or_else(|| panic!("no steps: {doc}"));
    let row = |flow: &str, step: u64| {
        steps.iter().find(|s| s["flow"] == flow && s["step"] == step).unwrap_or_else(|| panic!("{flow} {step}: {doc}"))
    };
    assert_eq!(steps.len(), 3, "{doc}");
    assert_eq!(
        (row("order", 1)["request"].as_str(), row("order", 2)["request"].as_str()),
        (Some("POST /orders"), Some("GET /orders/{{order_id}}"))
    );
    assert_eq!(n(&row("order", 1)["ok"]) + n(&row("order", 2)["ok"]), ok, "{doc}");
    assert_eq!(n(&row("order", 2)["requests"]), n(&row("order", 1)["ok"]), "step 2 runs after each ok step 1");
    assert_eq!((n(&row("wrong expectation", 1)["check"]), n(&row("wrong expectation", 1)["ok"])), (checks, 0));
    let total: u64 = steps.iter().map(|s| n(&s["requests"])).sum();
    assert_eq!(total, n(&doc["requests"]["scheduled"]), "every request under one step");
    assert!(row("order", 1)["p99_ms"].as_f64().unwrap() > 0.0, "{doc}");
    let table = stdout.split("by flow and step:").nth(1).unwrap_or_else(|| panic!("no table: {stdout}"));
    let line = table.lines().find(|l| l.contains("wrong expectation")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains("GET /") && line.split_whitespace().any(|w| w == checks.to_string()), "{line}");

    // A scenario with a mistake is refused with exit 2, naming the problem.
    std::fs::write(&scenario, "[[flow]]\nname = \"x\"\n[[flow.step]]\nurl = \"/\"\ncolour = 1\n").unwrap();
    let out = Command::new(bin()).args(["load", &base, "--scenario", scenario.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));
}

#[test]
fn abort_on_fail_stops_the_run_at_the_first_failed_threshold() {
    let dir = TempDir::new("load-abort");
    let a = app(&dir, &["--fail-rate", "1"]);
    let url = a.url("/");
    let started = std::time::Instant::now();
    let (code, stdout, doc) =
        load(&dir, &[&url, "--rate", "100", "--duration", "30s", "--threshold", "failed==0", "--abort-on-fail"]);
    assert_eq!(code, 1, "{stdout}");
    assert!(started.elapsed().as_secs() < 10, "a 30 s run must stop within seconds of failing: {stdout}");
    assert!(stdout.contains("ABORTED: threshold failed==0"), "{stdout}");
    assert!(n(&doc["requests"]["scheduled"]) < 1000, "{stdout}");
    assert_exact_accounting(&doc);
}

/// A server that answers `answered` requests on each connection (keep-alive), then, as the next request arrives,
/// closes the connection without reading it: the kernel resets it, as when a server's idle timeout fires at the
/// instant the client reuses the connection. Returns its address; it serves until the test ends.
fn closes_on_reuse(answered: usize) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                for _ in 0..answered {
                    // Each request is one small GET: one read holds it whole.
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
                }
                // Wait for the next request to arrive, and close with it unread: a reset, no byte of answer.
                let _ = s.peek(&mut buf);
            });
        }
    });
    addr
}

#[test]
fn a_reused_connection_reset_before_answering_is_retried_once_on_a_fresh_one() {
    let dir = TempDir::new("load-keepalive-race");
    let url = format!("http://{}/", closes_on_reuse(1));
    // The open model, then the closed one (a run of several seconds each, so that their JSON files differ).
    for extra in [&["--rate", "50", "--duration", "2s"][..], &["--duration", "1s"][..]] {
        let mut args = vec![url.as_str(), "--threads", "1", "--connections", "1"];
        args.extend_from_slice(extra);
        let (code, stdout, doc) = load(&dir, &args);
        assert_exact_accounting(&doc);
        assert_eq!(n(&doc["errors"]["reset"]), 0, "every reset connection was reused: {stdout}");
        let ok = n(&doc["requests"]["ok"]);
        assert_eq!(ok, n(&doc["requests"]["scheduled"]), "{stdout}");
        // Each connection serves one request: every later request found its reused connection reset.
        assert_eq!(n(&doc["requests"]["retried"]), ok - 1, "{stdout}");
        assert!(stdout.contains(&format!("retried: {}", ok - 1)), "{stdout}");
        assert_eq!(code, 0, "{stdout}");
    }
    // A fresh connection reset before answering is not retried: the server itself refuses the request.
    let url = format!("http://{}/", closes_on_reuse(0));
    let (_, stdout, doc) = load(&dir, &[&url, "--rate", "20", "--duration", "1s", "--threads", "1"]);
    assert_exact_accounting(&doc);
    assert_eq!(n(&doc["errors"]["reset"]), 20, "{stdout}");
    assert_eq!(n(&doc["requests"]["retried"]), 0, "{stdout}");
}

#[test]
fn reports_carry_the_thresholds_and_the_closed_model_claims_no_schedule() {
    let dir = TempDir::new("load-verdicts");
    let a = app(&dir, &[]);
    let url = a.url("/");
    let page = dir.path().join("closed.html");
    let (code, stdout, doc) = load(
        &dir,
        &[&url, "--connections", "2", "--duration", "2s", "--threshold", "failed==0", "--threshold", "p99<0.001ms"]
            .iter()
            .copied()
            .chain(["--html", page.to_str().unwrap()])
            .collect::<Vec<_>>(),
    );
    assert_eq!(code, 1, "p99 under a microsecond cannot hold: {stdout}");
    let t = doc["thresholds"].as_array().unwrap_or_else(|| panic!("{doc}"));
    assert_eq!((t[0]["threshold"].as_str(), &t[0]["held"]), (Some("failed==0"), &serde_json::json!(true)), "{doc}");
    assert_eq!((t[1]["threshold"].as_str(), &t[1]["held"]), (Some("p99<0.001ms"), &serde_json::json!(false)), "{doc}");
    assert!(t[1]["measured"].as_f64().unwrap() > 0.001, "{doc}");
    assert_eq!(doc["thresholds_held"], false);
    assert!(stdout.contains("latency (ms): p50"), "{stdout}");
    assert!(!stdout.contains("from schedule"), "a closed model has no schedule to measure from: {stdout}");

    let dom = headless(&dir, &["--dump-dom"], &page);
    let dom = String::from_utf8_lossy(&dom.stdout);
    let table = dom.split("id=\"thresholds\"").nth(1).unwrap_or_else(|| panic!("no thresholds table: {dom}"));
    let table = table.split("</table>").next().unwrap();
    assert!(table.contains("failed==0") && table.contains("p99&lt;0.001ms"), "{table}");
    assert_eq!((table.matches("class=\"held\"").count(), table.matches("class=\"failed\"").count()), (1, 1));
    assert!(!dom.contains("scheduled time"), "the closed model's latency chart claims no schedule");
    // Every chart's value ticks are round: equal steps of 1, 2 or 5 times a power of ten, from 0.
    for chart in ["throughput", "latency"] {
        let svg = dom.split(&format!("id=\"{chart}\"")).nth(1).unwrap().split("</svg>").next().unwrap();
        let ticks: Vec<f64> = svg
            .split("class=\"ytick\"")
            .skip(1)
            .map(|t| t.split('>').nth(1).unwrap().split('<').next().unwrap().parse().unwrap())
            .collect();
        assert!(ticks.len() >= 3, "{chart}: {ticks:?}");
        let step = ticks[1] - ticks[0];
        let mantissa = step / 10f64.powf(step.log10().floor());
        assert!([1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-6), "{chart}: step {step} of {ticks:?}");
        assert_eq!(ticks[0], 0.0);
        for w in ticks.windows(2) {
            assert!((w[1] - w[0] - step).abs() < 1e-6, "{chart}: uneven ticks {ticks:?}");
        }
    }
}

#[test]
fn find_max_honours_thresholds_and_writes_its_html_report() {
    let dir = TempDir::new("load-find-max-html");
    let a = app(&dir, &[]);
    let url = a.url("/");
    let (json, page) = (dir.path().join("find.json"), dir.path().join("find.html"));
    // The server takes far more than 200/s: only the threshold stops the search there.
    let out = Command::new(bin())
        .args(["load", &url, "--find-max", "--step", "1s", "--start-rate", "50", "--threshold", "rate<=200"])
        .arg("--json")
        .arg(&json)
        .arg("--html")
        .arg(&page)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rate = doc["find_max"]["rate"].as_f64().unwrap();
    assert!((150.0..=200.0).contains(&rate), "found {rate}/s under rate<=200: {stdout}");
    let steps = doc["find_max"]["steps"].as_array().unwrap();
    let failed = steps.iter().find(|s| s["passed"] == false).unwrap_or_else(|| panic!("{stdout}"));
    assert_eq!(failed["thresholds"][0]["held"], false, "{failed}");
    assert!(stdout.contains("threshold rate<=200: FAILED"), "{stdout}");

    let dom = headless(&dir, &["--dump-dom"], &page);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains(&format!("max rate: {rate:.0} requests/s")), "{dom}");
    let table = dom.split("id=\"steps\"").nth(1).unwrap_or_else(|| panic!("no steps table: {dom}"));
    let table = table.split("</table>").next().unwrap();
    assert_eq!(table.matches("<tr class=").count(), steps.len(), "{table}");
    for id in ["throughput", "latency", "thresholds"] {
        assert!(dom.contains(&format!("id=\"{id}\"")), "the best step's {id} is on the page");
    }
}
