//! Running a load: worker threads, each with a single-threaded runtime, its own connections and its own ledger.
//! Open model: request n is due at `schedule.due(n)` and is taken by worker `n % threads`; latency counts from
//! the due time, so a stalled server shows in the tail instead of slowing the generator (no coordinated omission).
//! Closed model: each connection sends its next request as soon as the previous one ends, like wrk.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, Method, Request};
use http_body_util::{BodyExt, Full};
use tokio::sync::Semaphore;

use crate::h1::{request_bytes, H1Conn};
use crate::scenario::Scenario;

use crate::ledger::{conclude, Ledger, Outcome, Summary, Timeline, SECOND_SLACK};
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
    /// Show a live one-line progress display on standard error.
    pub progress: bool,
    /// HTTP/2 with prior knowledge (h2c): one multiplexed connection per worker thread.
    pub http2: bool,
    /// Weighted flows of steps instead of one request: each arrival (open model) or loop turn (closed model)
    /// runs one flow.
    pub scenario: Option<Arc<Scenario>>,
    /// Stop the run at the first of these thresholds to fail mid-run (`--abort-on-fail`).
    pub abort_on: Vec<crate::threshold::Threshold>,
}

/// How a run ended.
pub struct RunResult {
    pub summary: Summary,
    /// The threshold that stopped the run early, if one did.
    pub aborted_by: Option<String>,
    /// The wall-clock time of the run's second 0, in milliseconds since the Unix epoch (to place marks from
    /// other clocks on its timeline).
    pub start_unix_ms: u64,
}

/// Fills `{{seq}}`, `{{uuid}}` and `{{random_int}}`.
pub fn render(template: &str, seq: u64, rng: &mut fastrand::Rng) -> String {
    render_with(template, seq, rng, &std::collections::BTreeMap::new())
}

/// Fills `{{seq}}`, `{{uuid}}`, `{{random_int}}` and `{{NAME}}` for every variable in `vars`.
pub fn render_with(
    template: &str,
    seq: u64,
    rng: &mut fastrand::Rng,
    vars: &std::collections::BTreeMap<String, String>,
) -> String {
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
    for (name, value) in vars {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    out
}

/// Watchdog resolution: a request past its timeout ends at most this much later.
pub const TIMEOUT_TICK: Duration = Duration::from_millis(20);

/// What the timeout watchdog knows of one connection: when its current request started (0: none in flight, else
/// nanoseconds since the run's start + 1), its socket, and whether the watchdog cut it.
#[derive(Default)]
struct Watch {
    started_ns: AtomicU64,
    fd: AtomicI32,
    fired: AtomicBool,
}

struct Worker {
    /// Set when an --abort-on-fail threshold failed: no new request is started.
    abort: Arc<AtomicBool>,
    index: usize,
    cfg: Arc<RunConfig>,
    start: Instant,
    ledger: Arc<Mutex<Ledger>>,
    /// Idle connections of the open model.
    idle: Mutex<Vec<H1Conn>>,
    /// The worker's HTTP/2 connection, when --http2; the async lock makes concurrent first requests share one connect.
    h2: tokio::sync::Mutex<Option<hyper::client::conn::http2::SendRequest<Full<Bytes>>>>,
    /// The request's bytes when no header or body template varies them.
    fixed: Option<Vec<u8>>,
    /// One entry per request in flight or connection loop; the watchdog cuts requests past the timeout, so that
    /// no timer is armed per request.
    watches: Mutex<Vec<Arc<Watch>>>,
}

/// Runs the load and returns the merged summary.
pub fn run(cfg: RunConfig) -> RunResult {
    let threads = cfg.threads.max(1);
    let cfg = Arc::new(cfg);
    let span = match &cfg.model {
        Model::Closed { duration, .. } => *duration,
        Model::Open { schedule, .. } => schedule.duration(),
    };
    let start = Instant::now();
    let start_unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let ledgers: Vec<Arc<Mutex<Ledger>>> = (0..threads)
        .map(|_| Arc::new(Mutex::new(Ledger::new(span + cfg.timeout * 2 + Duration::from_secs(2)))))
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let abort = Arc::new(AtomicBool::new(false));
    let aborted_by = Arc::new(Mutex::new(None::<String>));
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let monitor = {
        let (ledgers, stop, cfg, abort, aborted_by, timeline) =
            (ledgers.clone(), stop.clone(), cfg.clone(), abort.clone(), aborted_by.clone(), timeline.clone());
        std::thread::spawn(move || monitor(&ledgers, &timeline, &stop, start, &cfg, &abort, &aborted_by))
    };
    let handles: Vec<_> = (0..threads)
        .map(|index| {
            let cfg = cfg.clone();
            let ledger = ledgers[index].clone();
            let abort = abort.clone();
            std::thread::Builder::new()
                .name(format!("load-{index}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                    let t = &cfg.target;
                    let templated = t.headers.iter().any(|(_, v)| v.contains("{{"))
                        || t.body.as_deref().is_some_and(|b| b.contains("{{"));
                    let fixed = (!templated).then(|| {
                        let headers: Vec<(String, String)> =
                            t.headers.iter().map(|(k, v)| (k.as_str().to_string(), v.clone())).collect();
                        let body = t.body.as_deref().unwrap_or_default().as_bytes();
                        request_bytes(t.method.as_str(), &t.path, &t.authority, &headers, body, !cfg.keep_alive)
                    });
                    let worker = Arc::new(Worker {
                        abort,
                        index,
                        fixed,
                        watches: Mutex::new(Vec::new()),
                        ledger,
                        cfg,
                        start,
                        idle: Mutex::new(Vec::new()),
                        h2: tokio::sync::Mutex::new(None),
                    });
                    rt.block_on(drive(worker.clone(), threads));
                })
                .expect("spawn load worker")
        })
        .collect();
    for h in handles {
        h.join().expect("load worker panicked");
    }
    stop.store(true, Relaxed);
    let _ = monitor.join();
    // Every task that recorded into a ledger ended with its worker's runtime: take the ledgers as they are.
    let finished: Vec<Ledger> = ledgers
        .iter()
        .map(|l| std::mem::replace(&mut *l.lock().expect("ledger lock"), Ledger::new(Duration::ZERO)))
        .collect();
    let timeline = std::mem::take(&mut *timeline.lock().expect("timeline lock"));
    let aborted_by = aborted_by.lock().expect("abort lock").take();
    let ran = if aborted_by.is_some() { start.elapsed().min(span) } else { span };
    let mut summary = conclude(finished, timeline, ran);
    if let Some(sc) = &cfg.scenario {
        for s in &mut summary.steps {
            if let Some(step) = sc.flows.get(s.flow).and_then(|f| f.steps.get(s.step)) {
                s.flow_name = sc.flows[s.flow].name.clone();
                s.request = format!("{} {}", step.method, step.url);
            }
        }
    }
    RunResult { summary, aborted_by, start_unix_ms }
}

/// Once a second: merges the workers' finished seconds into the timeline, judges the --abort-on-fail thresholds
/// that can be judged mid-run, and (on a terminal) rewrites one line on standard error: elapsed time, the last
/// second's rate, ok, failed, p99 so far.
fn monitor(
    ledgers: &[Arc<Mutex<Ledger>>],
    timeline: &Mutex<Timeline>,
    stop: &AtomicBool,
    start: Instant,
    cfg: &RunConfig,
    abort: &AtomicBool,
    aborted_by: &Mutex<Option<String>>,
) {
    use std::io::Write;
    let mut last_total = 0;
    while !stop.load(Relaxed) {
        std::thread::sleep(Duration::from_millis(1000));
        let (mut counts, mut p99) = (crate::ledger::Counts::default(), 0.0f64);
        let limit = start.elapsed().as_secs().saturating_sub(SECOND_SLACK);
        let mut finished = Vec::new();
        for l in ledgers {
            let mut l = l.lock().expect("ledger lock");
            counts.merge(&l.counts());
            p99 = p99.max(l.p99_so_far_ms());
            finished.push(l.take_seconds_before(limit));
        }
        {
            let mut timeline = timeline.lock().expect("timeline lock");
            for seconds in finished {
                timeline.absorb(seconds);
            }
            timeline.close_before(limit);
        }
        let total = counts.total();
        if !abort.load(Relaxed) {
            if let Some(t) = cfg.abort_on.iter().find(|t| t.measure_live(&counts, p99).is_some_and(|v| !t.holds(v))) {
                *aborted_by.lock().expect("abort lock") = Some(t.text().to_string());
                abort.store(true, Relaxed);
            }
        }
        if !cfg.progress {
            last_total = total;
            continue;
        }
        let line = format!(
            "\r\x1b[K{:>5.0}s  rate {:>9.1}/s  ok {:>10}  failed {:>8}  p99 {:>9.2} ms",
            start.elapsed().as_secs_f64(),
            total.saturating_sub(last_total) as f64,
            counts.ok,
            counts.failed(),
            p99
        );
        last_total = total;
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.flush();
    }
    if cfg.progress {
        let _ = std::io::stderr().write_all(b"\r\x1b[K");
    }
}

async fn drive(w: Arc<Worker>, threads: usize) {
    let watchdog = {
        let w = w.clone();
        tokio::spawn(async move {
            let limit = w.cfg.timeout.as_nanos() as u64;
            loop {
                tokio::time::sleep(TIMEOUT_TICK).await;
                let now = w.start.elapsed().as_nanos() as u64 + 1;
                let mut watches = w.watches.lock().expect("watches lock");
                watches.retain(|watch| Arc::strong_count(watch) > 1);
                for watch in watches.iter() {
                    let started = watch.started_ns.load(Relaxed);
                    if started != 0 && now.saturating_sub(started) > limit && !watch.fired.swap(true, Relaxed) {
                        // SAFETY: shutdown(2) on the connection's socket; at worst the descriptor was just closed.
                        unsafe {
                            libc::shutdown(watch.fd.load(Relaxed), libc::SHUT_RDWR);
                        }
                    }
                }
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
                        let mut conn = None;
                        let watch = w.watch();
                        while Instant::now() < end && !w.abort.load(Relaxed) {
                            let due = w.start.elapsed();
                            match &w.cfg.scenario {
                                Some(sc) => w.iteration(sc, due, seq, &mut rng, &mut conn, &watch).await,
                                None => w.request(due, seq, &mut rng, &mut conn, &watch).await,
                            }
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
                if w.abort.load(Relaxed) {
                    break; // the run was stopped: later arrivals are not part of it
                }
                // Past the end of the schedule, a request still waiting for a connection is not sent.
                let permit = tokio::select! {
                    biased;
                    p = slots.clone().acquire_owned() => Some(p.expect("slots never close")),
                    () = tokio::time::sleep_until(end.into()) => None,
                };
                let Some(permit) = permit else {
                    // Every request the arrival would have made is not sent: one, or each step of a flow.
                    match w.cfg.scenario.as_ref() {
                        None => w.record(Outcome::NotSent, due, w.start.elapsed(), None, None),
                        Some(sc) => {
                            let flow = sc.pick_index(&mut rng);
                            for step in 0..sc.flows[flow].steps.len() {
                                w.record_in_flow((flow, step), Outcome::NotSent, due, w.start.elapsed(), None, None);
                            }
                        }
                    }
                    n += threads as u64;
                    continue;
                };
                let w2 = w.clone();
                let mut task_rng = fastrand::Rng::with_seed(rng.u64(..));
                tokio::spawn(async move {
                    let _permit = permit;
                    let mut conn = w2.idle.lock().expect("idle lock").pop();
                    let watch = w2.watch();
                    match w2.cfg.scenario.clone() {
                        Some(sc) => w2.iteration(&sc, due, n, &mut task_rng, &mut conn, &watch).await,
                        None => w2.request(due, n, &mut task_rng, &mut conn, &watch).await,
                    }
                    if let Some(c) = conn {
                        w2.idle.lock().expect("idle lock").push(c);
                    }
                });
                n += threads as u64;
            }
            // Wait for the in-flight requests: each ends by its own timeout.
            let _ = tokio::time::timeout(w.cfg.timeout + Duration::from_secs(1), slots.acquire_many(mine as u32)).await;
        }
    }
    watchdog.abort();
}

impl Worker {
    fn watch(&self) -> Arc<Watch> {
        let watch = Arc::new(Watch::default());
        self.watches.lock().expect("watches lock").push(watch.clone());
        watch
    }
}

impl Worker {
    fn record(&self, outcome: Outcome, due: Duration, done: Duration, service: Option<Duration>, header: Option<&str>) {
        self.ledger.lock().expect("ledger lock").record(outcome, due, done, service, header);
    }

    /// Records a request of step `at.1` of flow `at.0`, in the totals and under its step.
    fn record_in_flow(
        &self,
        at: (usize, usize),
        outcome: Outcome,
        due: Duration,
        done: Duration,
        service: Option<Duration>,
        header: Option<&str>,
    ) {
        let mut ledger = self.ledger.lock().expect("ledger lock");
        ledger.record(outcome, due, done, service, header);
        ledger.record_step(at.0, at.1, outcome, due, done);
    }

    /// The bytes of request `seq`: prepared once when nothing in it varies.
    fn bytes(&self, seq: u64, rng: &mut fastrand::Rng) -> std::borrow::Cow<'_, [u8]> {
        if let Some(fixed) = &self.fixed {
            return std::borrow::Cow::Borrowed(fixed);
        }
        let t = &self.cfg.target;
        let headers: Vec<(String, String)> =
            t.headers.iter().map(|(k, v)| (k.as_str().to_string(), render(v, seq, rng))).collect();
        let body = t.body.as_deref().map(|b| render(b, seq, rng)).unwrap_or_default();
        std::borrow::Cow::Owned(request_bytes(
            t.method.as_str(),
            &t.path,
            &t.authority,
            &headers,
            body.as_bytes(),
            !self.cfg.keep_alive,
        ))
    }

    /// Sends request `seq` (due at `due`) over `slot`'s connection, connecting first if it has none, and records
    /// how it ended.
    async fn request(
        &self,
        due: Duration,
        seq: u64,
        rng: &mut fastrand::Rng,
        slot: &mut Option<H1Conn>,
        watch: &Watch,
    ) {
        if self.cfg.http2 {
            return self.request_h2(due, seq, rng).await;
        }
        let bytes = self.bytes(seq, rng);
        let head_only = self.cfg.target.method == Method::HEAD;
        let (outcome, done, service, answer) = self.exchange_once(&bytes, head_only, false, slot, watch).await;
        self.record(outcome, due, done, service, answer.as_ref().and_then(|a| a.tracked.as_deref()));
    }

    /// Runs one flow of the scenario: its steps in order on one connection, each recorded as a request, with
    /// captured variables carried from step to step. The first step is due at `due`; each later one when the
    /// previous step and its think time are over. A failed step ends the flow.
    async fn iteration(
        &self,
        scenario: &Scenario,
        due: Duration,
        seq: u64,
        rng: &mut fastrand::Rng,
        slot: &mut Option<H1Conn>,
        watch: &Watch,
    ) {
        let f = scenario.pick_index(rng);
        let flow = &scenario.flows[f];
        let mut vars = std::collections::BTreeMap::new();
        let mut step_due = due;
        for (i, step) in flow.steps.iter().enumerate() {
            let bytes = step.bytes(&self.cfg.target.authority, seq, rng, &vars);
            let head_only = step.method == Method::HEAD;
            let (mut outcome, done, service, answer) =
                self.exchange_once(&bytes, head_only, step.reads_body(), slot, watch).await;
            if let Some(a) = &answer {
                if !step.judge(a.status, a.body.as_deref().unwrap_or_default(), &mut vars) {
                    outcome = Outcome::CheckFailed;
                }
            }
            let tracked = answer.as_ref().and_then(|a| a.tracked.as_deref());
            self.record_in_flow((f, i), outcome, step_due, done, service, tracked);
            if !outcome.is_ok() {
                return;
            }
            if step.think_ms > 0 {
                tokio::time::sleep(Duration::from_millis(step.think_ms)).await;
            }
            step_due = self.start.elapsed();
        }
    }

    /// One exchange over `slot`'s connection (connecting first if it has none; a connection that cannot be reused
    /// is dropped from the slot): how it ended, when (from the run's start), the time from the send, and the
    /// response if there was one. `watch` lets the watchdog cut it at the timeout; connecting has its own timer.
    async fn exchange_once(
        &self,
        bytes: &[u8],
        head_only: bool,
        keep_body: bool,
        slot: &mut Option<H1Conn>,
        watch: &Watch,
    ) -> (Outcome, Duration, Option<Duration>, Option<crate::h1::Answer>) {
        let track = self.cfg.track_header.as_ref().map(|h| h.as_str());
        let sent = Instant::now();
        if slot.as_ref().is_some_and(H1Conn::closed_while_idle) {
            *slot = None;
        }
        let mut fresh = slot.is_none();
        let mut retried = false;
        loop {
            if fresh {
                match tokio::time::timeout(self.cfg.timeout, H1Conn::connect(self.cfg.target.addr)).await {
                    Ok(Ok(c)) => *slot = Some(c),
                    Ok(Err(_)) => return (Outcome::Connect, self.start.elapsed(), None, None),
                    Err(_) => {
                        tracing::warn!(target = %self.cfg.target.addr, "connecting timed out");
                        return (Outcome::Timeout, self.start.elapsed(), None, None);
                    }
                }
            }
            let conn = slot.as_mut().expect("connected above");
            let local = conn.local_addr();
            watch.fd.store(conn.raw_fd(), Relaxed);
            watch.fired.store(false, Relaxed);
            watch.started_ns.store(sent.duration_since(self.start).as_nanos() as u64 + 1, Relaxed);
            let result = conn.exchange_keeping(bytes, head_only, track, keep_body).await;
            watch.started_ns.store(0, Relaxed);
            let now = Instant::now();
            let (done, service) = (now.duration_since(self.start), Some(now.duration_since(sent)));
            match result {
                // A reused connection the server closed as the request left (its idle timeout): nothing of the answer
                // came, so the server did not take the request. Sent again once on a fresh connection, as curl does.
                Err(e) if e.no_answer() && !fresh && !retried && !watch.fired.load(Relaxed) => {
                    *slot = None;
                    fresh = true;
                    retried = true;
                    self.ledger.lock().expect("ledger lock").record_retry();
                    tracing::debug!(
                        ?local,
                        "a reused connection closed before answering: sending again on a fresh one"
                    );
                    continue;
                }
                Err(_) => {
                    *slot = None;
                    let outcome = if watch.fired.load(Relaxed) { Outcome::Timeout } else { Outcome::Reset };
                    if outcome == Outcome::Timeout {
                        tracing::warn!(fresh, ?local, "no answer within the timeout");
                    }
                    return (outcome, done, service, None);
                }
                Ok(answer) => {
                    if !answer.reusable || !self.cfg.keep_alive {
                        *slot = None;
                    }
                    return (Outcome::from_status(answer.status), done, service, Some(answer));
                }
            }
        }
    }

    /// One request over the worker's HTTP/2 connection (made on first use, and again after it fails).
    async fn request_h2(&self, due: Duration, seq: u64, rng: &mut fastrand::Rng) {
        let t = &self.cfg.target;
        let mut req = Request::builder().method(t.method.clone()).uri(format!("http://{}{}", t.authority, t.path));
        for (name, value) in &t.headers {
            if let Ok(v) = http::HeaderValue::from_str(&render(value, seq, rng)) {
                req = req.header(name, v);
            }
        }
        let body = t.body.as_deref().map(|b| render(b, seq, rng)).unwrap_or_default();
        let req = req.body(Full::new(Bytes::from(body))).expect("valid request");
        let sent = Instant::now();
        let track = self.cfg.track_header.clone();
        let exchange = async {
            let mut sender = {
                let mut shared = self.h2.lock().await;
                match shared.as_ref() {
                    Some(s) if !s.is_closed() => s.clone(),
                    _ => {
                        let stream = tokio::net::TcpStream::connect(t.addr).await.map_err(|_| Outcome::Connect)?;
                        let _ = stream.set_nodelay(true);
                        let (s, conn) = hyper::client::conn::http2::handshake(
                            hyper_util::rt::TokioExecutor::new(),
                            hyper_util::rt::TokioIo::new(stream),
                        )
                        .await
                        .map_err(|_| Outcome::Connect)?;
                        tokio::spawn(conn);
                        *shared = Some(s.clone());
                        s
                    }
                }
            };
            let resp = sender.send_request(req).await.map_err(|_| Outcome::Reset)?;
            let status = resp.status().as_u16();
            let tracked = track
                .as_ref()
                .and_then(|h| resp.headers().get(h))
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            resp.into_body().collect().await.map_err(|_| Outcome::Reset)?;
            Ok::<_, Outcome>((status, tracked))
        };
        let result = tokio::time::timeout(self.cfg.timeout, exchange).await;
        let now = Instant::now();
        let (done, service) = (now.duration_since(self.start), Some(now.duration_since(sent)));
        match result {
            Err(_) => self.record(Outcome::Timeout, due, done, service, None),
            Ok(Err(o)) => self.record(o, due, done, if o == Outcome::Connect { None } else { service }, None),
            Ok(Ok((status, tracked))) => {
                self.record(Outcome::from_status(status), due, done, service, tracked.as_deref())
            }
        }
    }
}
