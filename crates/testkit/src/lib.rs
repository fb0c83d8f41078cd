//! Test support shared by the integration tests: start the real `nonstop` binary on loopback with an OS-assigned
//! port, send signals to it, and talk HTTP/1.1 to it over real sockets.

pub mod docker;
pub mod dockerd;
pub mod echo;
pub mod git;
pub mod raw;
pub mod sshd;
pub mod tls;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
pub use http::Method;
use http::{HeaderMap, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A running child process, killed (SIGKILL) when dropped.
pub struct Proc {
    child: Child,
    pub addr: SocketAddr,
    /// The line that announced the address, for other addresses it names (such as the admin API's).
    pub banner: String,
}

impl Proc {
    /// Starts `bin args...` and waits (up to 30 s) for the line `... listening on http://ADDR ...` on its stdout.
    pub fn start(bin: &Path, args: &[&str]) -> Proc {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = rest.split_whitespace().next().unwrap_or_default().to_string();
                        let _ = tx.send((addr, line.clone()));
                        sent = true;
                    }
                }
            }
        });
        let (addr, banner) = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok((addr, banner)) => {
                (addr.parse().unwrap_or_else(|e| panic!("bad address {addr:?} from {args:?}: {e}")), banner)
            }
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                panic!("{} {args:?} did not report a listening address (exit: {status:?})", bin.display());
            }
        };
        Proc { child, addr, banner }
    }

    /// Every listening address in the banner (`listening on http://A http://B (...)`), in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        let list =
            self.banner.split_once("listening on ").map_or("", |(_, rest)| rest.split(" (").next().unwrap_or(""));
        list.split_whitespace().filter_map(|u| u.strip_prefix("http://")?.parse().ok()).collect()
    }

    /// The address printed after `label http://` in the banner, such as the admin API's.
    pub fn addr_after(&self, label: &str) -> Option<SocketAddr> {
        self.banner.split(&format!("{label} http://")).nth(1)?.split([',', ')', ' ']).next()?.parse().ok()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with a pid we own; the worst case is ESRCH for a process that already exited.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// Waits up to `limit` for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("nonstop-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One HTTP/1.1 keep-alive connection.
pub struct Conn {
    sender: http1::SendRequest<Full<Bytes>>,
    addr: SocketAddr,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Result<Conn, BoxError> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender, addr })
    }

    /// Sends one request on this connection and reads the whole response.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Result<Resp, BoxError> {
        let mut req = Request::builder().method(method).uri(path);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            req = req.header("host", self.addr.to_string());
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Full::new(body.into()))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Resp { status: parts.status.as_u16(), headers: parts.headers, body })
    }
}

/// Sends one request on a new connection.
pub async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Resp, BoxError> {
    Conn::open(addr).await?.send(method, path, headers, body).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Resp {
    send(addr, Method::GET, path, &[], Bytes::new()).await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

pub async fn post_json(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    send(addr, Method::POST, path, &all, body.to_string()).await.unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// Polls `GET path` until it answers `status`, up to `limit`.
pub async fn wait_for_status(addr: SocketAddr, path: &str, status: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(r) = send(addr, Method::GET, path, &[], Bytes::new()).await {
            if r.status == status {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// Sends the same keyed POST `n` times at once, spread round robin over `addrs`, each on its own connection,
/// released together by a barrier; returns every response.
pub async fn concurrent_keyed_posts(addrs: &[SocketAddr], path: &str, key: &str, body: &str, n: usize) -> Vec<Resp> {
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (addr, barrier) = (addrs[i % addrs.len()], barrier.clone());
            let (path, key, body) = (path.to_string(), key.to_string(), body.to_string());
            tokio::spawn(async move {
                let mut conn = Conn::open(addr).await.expect("connect");
                barrier.wait().await;
                let headers = [("content-type", "application/json"), ("idempotency-key", key.as_str())];
                conn.send(Method::POST, &path, &headers, body).await.expect("answer")
            })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("task"));
    }
    out
}

/// The headless browser pages are checked in; `.ci/run` installs Debian's chromium.
pub fn chromium() -> &'static str {
    for c in ["/usr/bin/chromium", "/usr/bin/chromium-browser"] {
        if Path::new(c).exists() {
            return c;
        }
    }
    panic!("chromium is required for the page tests: run .ci/run, or apt-get install chromium");
}

/// Runs headless Chromium on a local page with `extra` flags (such as `--dump-dom`), its profile in `dir`.
pub fn headless(dir: &TempDir, extra: &[&str], page: &Path) -> std::process::Output {
    let profile = dir.path().join("chromium-profile");
    Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium")
}

/// Runs `BIN load http://ADDR --scenario SCENARIO ARGS --json FILE` on a thread (FILE: a fresh name in `dir`); `join`
/// gives its JSON result. Lines of its log about timeouts are passed on, to explain a failure; a run that wrote no
/// JSON panics with its log.
pub fn run_load(
    bin: &Path,
    addr: SocketAddr,
    scenario: &Path,
    args: &[&str],
    dir: &Path,
) -> std::thread::JoinHandle<serde_json::Value> {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let json = dir.join(format!("load-{}.json", RUNS.fetch_add(1, Ordering::Relaxed)));
    let mut cmd = Command::new(bin);
    cmd.arg("load").arg(format!("http://{addr}")).arg("--scenario").arg(scenario).args(args);
    cmd.arg("--json").arg(&json).env("RUST_LOG", "warn");
    std::thread::spawn(move || {
        let out = cmd.output().expect("run nonstop load");
        let log = String::from_utf8_lossy(&out.stderr);
        for line in log.lines().filter(|l| l.contains("timed out") || l.contains("timeout")) {
            eprintln!("DIAG load: {line}");
        }
        let text = std::fs::read_to_string(&json).unwrap_or_else(|_| panic!("no JSON from nonstop load: {log}"));
        serde_json::from_str(&text).expect("valid JSON")
    })
}
