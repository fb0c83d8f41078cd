//! The I/O shell of health: active checks of every server of every service on the service's interval (a TCP
//! connect, or an HTTP GET of the health path), and the pools' periodic tick (ejections that run out, waiters that
//! gave up, dispatch). Runs on its own thread; the decisions are in [`crate::health`] and [`crate::pool`].

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nonstop_config::Health;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::Shared;

/// How often the pools tick and due checks start.
const TICK: Duration = Duration::from_millis(50);
/// Largest health-check response head read.
const CHECK_HEAD_BYTES_MAX: usize = 16 * 1024;

struct Due {
    at: Instant,
    running: Arc<AtomicBool>,
}

pub async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let mut due: HashMap<(String, SocketAddr), Due> = HashMap::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.changed() => return,
        }
        let now = Instant::now();
        let snap = shared.snapshot.load_full();
        let mut live = Vec::new();
        for svc in snap.services.values() {
            svc.pool.tick(now);
            let health = &svc.config.health;
            if !health.enabled {
                continue;
            }
            for server in svc.servers() {
                let key = (svc.name.clone(), server.addr);
                live.push(key.clone());
                let interval = health.interval;
                let entry = due.entry(key).or_insert_with(|| Due {
                    // Spread the first checks over one interval.
                    at: now + interval.mul_f64(fastrand::f64()),
                    running: Arc::new(AtomicBool::new(false)),
                });
                if now < entry.at || entry.running.load(Relaxed) {
                    continue;
                }
                entry.at = now + interval;
                entry.running.store(true, Relaxed);
                let (running, pool, health, addr) =
                    (entry.running.clone(), svc.pool.clone(), health.clone(), server.addr);
                tokio::spawn(async move {
                    let passed = check(addr, &health).await;
                    if let Err(why) = &passed {
                        tracing::debug!(server = %addr, "health check failed: {why}");
                    }
                    pool.on_check(addr, Instant::now(), passed.is_ok());
                    running.store(false, Relaxed);
                });
            }
        }
        due.retain(|k, _| live.contains(k));
    }
}

/// One check: connect, and with a path, GET it and expect a status in range; all within the timeout.
pub async fn check(addr: SocketAddr, health: &Health) -> Result<(), String> {
    match tokio::time::timeout(health.timeout, check_inner(addr, health)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} ms", health.timeout.as_millis())),
    }
}

async fn check_inner(addr: SocketAddr, health: &Health) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    let Some(path) = &health.path else { return Ok(()) };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: nonstop-health-check\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(1024);
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                let code = resp.code.unwrap_or(0);
                let (lo, hi) = health.expect_status;
                return if (lo..=hi).contains(&code) {
                    Ok(())
                } else {
                    Err(format!("status {code}, expected {lo}-{hi}"))
                };
            }
            Ok(httparse::Status::Partial) if buf.len() < CHECK_HEAD_BYTES_MAX => {}
            Ok(httparse::Status::Partial) => return Err("response head too large".into()),
            Err(e) => return Err(format!("bad response: {e}")),
        }
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
