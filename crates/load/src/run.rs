//! Running a load: worker threads, each with a single-threaded runtime, its own connections and its own ledger.
//! Open model: request n is due at `schedule.due(n)` and is taken by worker `n % threads`; latency counts from
//! the due time, so a stalled server shows in the tail instead of slowing the generator (no coordinated omission).
//! Closed model: each connection sends its next request as soon as the previous one ends, like wrk.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use crate::ledger::{Ledger, Outcome, Summary};
use crate::schedule::Schedule;

/// What each request looks like. Header values and the body may hold `{{seq}}`, `{{uuid}}` and `{{random_int}}`.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// Host header value.
    pub authority: String,
    pub path: String,
    pub method: Method,
    pub headers: Vec<(HeaderName, String)>,
    pub body: Option<String>,
}

#[derive(Debug, Clone)]
pub enum Model {
    /// `connections` connections, each sending back to back for `duration`.
    Closed { connections: usize, duration: Duration },
    /// Requests at the schedule's times, over at most `connections` connections at once.
    Open { schedule: Schedule, connections: usize },
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub target: Target,
    pub model: Model,
    pub threads: usize,
    pub timeout: Duration,
    pub keep_alive: bool,
    pub track_header: Option<HeaderName>,
}

/// Fills `{{seq}}`, `{{uuid}}` and `{{random_int}}`.
pub fn render(template: &str, seq: u64, rng: &mut fastrand::Rng) -> String {
    if !template.contains("{{") {
        return template.to_string();
    }
    let mut out = template.replace("{{seq}}", &seq.to_string());
    while out.contains("{{uuid}}") {
        let (a, b) = (rng.u64(..), rng.u64(..));
        let uuid = format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0x0fff,
            ((b >> 48) & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        );
        out = out.replacen("{{uuid}}", &uuid, 1);
    }
    while out.contains("{{random_int}}") {
        out = out.replacen("{{random_int}}", &rng.u32(..1_000_000_000).to_string(), 1);
    }
    out
}

struct Worker {
    index: usize,
    cfg: Arc<RunConfig>,
    start: Instant,
    ledger: Arc<Mutex<Ledger>>,
    idle: Mutex<Vec<http1::SendRequest<Full<Bytes>>>>,
}

/// Runs the load and returns the merged summary.
pub fn run(cfg: RunConfig) -> Summary {
    let threads = cfg.threads.max(1);
    let cfg = Arc::new(cfg);
    let span = match &cfg.model {
        Model::Closed { duration, .. } => *duration,
        Model::Open { schedule, .. } => schedule.duration(),
    };
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|index| {
            let cfg = cfg.clone();
            std::thread::Builder::new()
                .name(format!("load-{index}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                    let worker = Arc::new(Worker {
                        index,
                        ledger: Arc::new(Mutex::new(Ledger::new(span + cfg.timeout * 2 + Duration::from_secs(2)))),
                        cfg,
                        start,
                        idle: Mutex::new(Vec::new()),
                    });
                    rt.block_on(drive(worker.clone(), threads));
                    drop(rt);
                    let mut ledger = worker.ledger.lock().expect("ledger lock");
                    std::mem::replace(&mut *ledger, Ledger::new(Duration::ZERO))
                })
                .expect("spawn load worker")
        })
        .collect();
    let mut ledgers = handles.into_iter().map(|h| h.join().expect("load worker panicked"));
    let mut merged = ledgers.next().expect("at least one worker");
    for l in ledgers {
        merged.merge(l);
    }
    merged.finish(span)
}

async fn drive(w: Arc<Worker>, threads: usize) {
    // Close finished seconds as the run goes, so per-second histograms do not pile up.
    let closer = {
        let (ledger, start) = (w.ledger.clone(), w.start);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                ledger.lock().expect("ledger lock").close_before(start.elapsed());
            }
        })
    };
    match w.cfg.model.clone() {
        Model::Closed { connections, duration } => {
            let mine = connections / threads + usize::from(w.index < connections % threads);
            let end = w.start + duration;
            let loops: Vec<_> = (0..mine)
                .map(|c| {
                    let w = w.clone();
                    tokio::spawn(async move {
                        let mut rng = fastrand::Rng::with_seed((w.index as u64) << 32 | c as u64);
                        let mut seq = (w.index as u64) << 40 | (c as u64) << 32;
                        while Instant::now() < end {
                            let due = w.start.elapsed();
                            w.request(due, seq, &mut rng).await;
                            seq += 1;
                        }
                    })
                })
                .collect();
            for l in loops {
                let _ = l.await;
            }
        }
        Model::Open { schedule, connections } => {
            let mine = (connections / threads + usize::from(w.index < connections % threads)).max(1);
            let slots = Arc::new(Semaphore::new(mine));
            let end = w.start + schedule.duration();
            let mut rng = fastrand::Rng::with_seed(w.index as u64 + 1);
            let mut n = w.index as u64;
            while let Some(due) = schedule.due(n) {
                tokio::time::sleep_until((w.start + due).into()).await;
                // Past the end of the schedule, a request still waiting for a connection is not sent.
                let permit = tokio::select! {
                    biased;
                    p = slots.clone().acquire_owned() => Some(p.expect("slots never close")),
                    () = tokio::time::sleep_until(end.into()) => None,
                };
                let Some(permit) = permit else {
                    w.record(Outcome::NotSent, due, w.start.elapsed(), None, None);
                    n += threads as u64;
                    continue;
                };
                let w2 = w.clone();
                let mut task_rng = fastrand::Rng::with_seed(rng.u64(..));
                tokio::spawn(async move {
                    let _permit = permit;
                    w2.request(due, n, &mut task_rng).await;
                });
                n += threads as u64;
            }
            // Wait for the in-flight requests: each ends by its own timeout.
            let _ = tokio::time::timeout(w.cfg.timeout + Duration::from_secs(1), slots.acquire_many(mine as u32)).await;
        }
    }
    closer.abort();
}

impl Worker {
    fn record(&self, outcome: Outcome, due: Duration, done: Duration, service: Option<Duration>, header: Option<&str>) {
        self.ledger.lock().expect("ledger lock").record(outcome, due, done, service, header);
    }

    async fn request(&self, due: Duration, seq: u64, rng: &mut fastrand::Rng) {
        let t = &self.cfg.target;
        let mut req = Request::builder().method(t.method.clone()).uri(&t.path).header(http::header::HOST, &t.authority);
        for (name, value) in &t.headers {
            if let Ok(v) = HeaderValue::from_str(&render(value, seq, rng)) {
                req = req.header(name, v);
            }
        }
        if !self.cfg.keep_alive {
            req = req.header(http::header::CONNECTION, "close");
        }
        let body = t.body.as_deref().map(|b| render(b, seq, rng)).unwrap_or_default();
        let req = req.body(Full::new(Bytes::from(body))).expect("valid request");
        let sent = Instant::now();
        let result = tokio::time::timeout(self.cfg.timeout, self.exchange(req)).await;
        let done = self.start.elapsed();
        let service = Some(sent.elapsed());
        match result {
            Err(_) => self.record(Outcome::Timeout, due, done, service, None),
            Ok(Err(outcome)) => {
                self.record(outcome, due, done, if outcome == Outcome::Connect { None } else { service }, None)
            }
            Ok(Ok((status, header))) => {
                self.record(Outcome::from_status(status), due, done, service, header.as_deref())
            }
        }
    }

    /// One request and its whole response, over a pooled connection or a new one.
    async fn exchange(&self, req: Request<Full<Bytes>>) -> Result<(u16, Option<String>), Outcome> {
        let pooled = self.idle.lock().expect("idle lock").pop();
        let mut sender = match pooled {
            Some(s) if !s.is_closed() => s,
            _ => {
                let stream = TcpStream::connect(self.cfg.target.addr).await.map_err(|_| Outcome::Connect)?;
                let _ = stream.set_nodelay(true);
                let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.map_err(|_| Outcome::Connect)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                sender
            }
        };
        sender.ready().await.map_err(|_| Outcome::Reset)?;
        let resp = sender.send_request(req).await.map_err(|_| Outcome::Reset)?;
        let status = resp.status().as_u16();
        let header = self
            .cfg
            .track_header
            .as_ref()
            .and_then(|h| resp.headers().get(h))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        resp.into_body().collect().await.map_err(|_| Outcome::Reset)?;
        if self.cfg.keep_alive {
            self.idle.lock().expect("idle lock").push(sender);
        }
        Ok((status, header))
    }
}
