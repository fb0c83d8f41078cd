//! The access log of a real `nonstop serve`: every request answered before SIGTERM is in the file after shutdown
//! (the lines are buffered, and flushed at exit), SIGUSR1 reopens the file after it was moved away (logrotate),
//! nginx's `combined` format, and sampling that keeps every error.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nonstop_testkit::{get, send, Proc, TempDir};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn app(dir: &TempDir) -> Proc {
    let db = format!("sqlite://{}", dir.path().join("app.db").display());
    Proc::start(bin(), &["app", "--listen", "127.0.0.1:0", "--db", &db])
}

/// A proxy in front of `app` whose access log is `dir/access.log`, with `extra` keys in `[access_log]`.
fn proxy(dir: &TempDir, app: &Proc, extra: &str) -> (Proc, PathBuf) {
    let log = dir.path().join("access.log");
    let config = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[access_log]\npath = \"{}\"\n{extra}\n\n[[routes]]\nservice = \"app\"\n\n\
         [services.app]\nservers = [{{ addr = \"{}\" }}]\n",
        log.display(),
        app.addr
    );
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, config).unwrap();
    (Proc::start(bin(), &["serve", "--config", path.to_str().unwrap()]), log)
}

fn stop(mut p: Proc) {
    p.signal(libc::SIGTERM);
    let status = p.wait_exit(Duration::from_secs(20)).expect("the proxy exits after SIGTERM");
    assert!(status.success(), "{status:?}");
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_answered_before_sigterm_is_logged_and_sigusr1_reopens_the_file() {
    let dir = TempDir::new("access-log");
    let a = app(&dir);
    // A long flush interval: only the shutdown can have written the last lines.
    let (p, log) = proxy(&dir, &a, "flush_ms = 60000");
    for i in 0..100 {
        assert_eq!(get(p.addr, &format!("/before/{i}")).await.status, 404);
    }
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    p.signal(libc::SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.exists() {
        assert!(Instant::now() < deadline, "SIGUSR1 made no new file at {}", log.display());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..50 {
        assert_eq!(get(p.addr, &format!("/after/{i}")).await.status, 404);
    }
    stop(p);
    let old = lines(&rotated);
    let new = lines(&log);
    assert_eq!(old.len(), 100, "the lines before the reopen are in the moved file");
    assert_eq!(new.len(), 50, "and the ones after it in the new one, all written at shutdown");
    // Each serving thread buffers its own lines, so they come in order per thread, not overall.
    let mut paths = std::collections::BTreeSet::new();
    for l in &old {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        paths.insert(v["path"].as_str().unwrap().to_string());
        assert_eq!(
            (v["status"].as_u64(), v["method"].as_str(), v["service"].as_str()),
            (Some(404), Some("GET"), Some("app"))
        );
        assert!(v["duration_ms"].as_f64().is_some() && v["ts_ms"].as_u64().is_some(), "{l}");
    }
    assert_eq!(paths, (0..100).map(|i| format!("/before/{i}")).collect(), "each request once");
    assert!(new.iter().all(|l| l.contains("\"path\":\"/after/")), "{new:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_combined_format_reads_like_nginx_and_sampling_keeps_every_error() {
    let dir = TempDir::new("access-log-combined");
    let a = app(&dir);
    let (p, log) = proxy(&dir, &a, "format = \"combined\"\nsuccess_sample_percent = 0");
    for _ in 0..20 {
        let r =
            send(p.addr, http::Method::GET, "/health?probe=1", &[("user-agent", "probe/1 \"x\"")], "").await.unwrap();
        assert_eq!(r.status, 200);
    }
    let r = send(p.addr, http::Method::GET, "/missing?q=1", &[("user-agent", "probe/1"), ("referer", "http://a/")], "")
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    stop(p);
    let got = lines(&log);
    assert_eq!(got.len(), 1, "successes are sampled out at 0%, the error is kept: {got:?}");
    let l = &got[0];
    assert!(l.starts_with("127.0.0.1 - - ["), "{l}");
    assert!(l.ends_with("] \"GET /missing?q=1 HTTP/1.1\" 404 - \"http://a/\" \"probe/1\""), "{l}");
    // [02/Dec/2026:17:51:08 +0000]
    let stamp = &l[l.find('[').unwrap() + 1..l.find(']').unwrap()];
    assert_eq!((stamp.len(), &stamp[2..3], &stamp[6..7], &stamp[20..]), (26, "/", "/", " +0000"), "{stamp}");
}
