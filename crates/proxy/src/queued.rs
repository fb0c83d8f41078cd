//! Durable queues at the proxy: accepting a request into its route's queue (202 only once it is on disk), its
//! public status, and the dispatcher that delivers queued requests to the service through the same pool,
//! balancer and admission control as live traffic. The decisions are in `nonstop_queue::ledger`; this is the I/O
//! shell around them.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Limited};
use nonstop_queue::{Limits, Outcome, Policy, QueuedRequest, State, Status, Store, StoreError};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

use crate::admission::Tried;
use crate::pool::Acquired;
use crate::upstream::ReqBody;
use crate::Shared;

/// Largest answer body read from the service on delivery (the status keeps the first 16 KiB).
const ANSWER_BYTES_MAX: usize = 1024 * 1024;
/// How long the dispatcher sleeps when nothing wakes it (a back-off running out is noticed within this).
const IDLE_TICK: Duration = Duration::from_millis(50);

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Counters of one queue, for metrics.
#[derive(Default)]
pub struct QueueCounters {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub deliveries: AtomicU64,
    pub retries: AtomicU64,
    pub done: AtomicU64,
    pub failed: AtomicU64,
    pub dead: AtomicU64,
}

/// One running queue.
pub struct Queue {
    pub name: String,
    pub service: String,
    pub store: Store,
    policy: Policy,
    concurrency: usize,
    /// Ids being delivered right now.
    delivering: Mutex<HashSet<u64>>,
    in_flight: AtomicUsize,
    wake: Notify,
    pub counters: QueueCounters,
}

impl Queue {
    pub fn open(cfg: &nonstop_config::Queue) -> Result<Arc<Queue>, StoreError> {
        let limits = Limits { length_max: cfg.length_max, bytes_max: cfg.bytes_max, batch_max: cfg.batch_max };
        let store = Store::open(&cfg.path.join(format!("{}.redb", cfg.name)), limits)?;
        Ok(Arc::new(Queue {
            name: cfg.name.clone(),
            service: cfg.service.clone(),
            store,
            policy: Policy {
                attempts_max: cfg.attempts_max,
                backoff_base_ms: cfg.backoff_base.as_millis() as u64,
                backoff_max_ms: cfg.backoff_max.as_millis() as u64,
            },
            concurrency: cfg.concurrency,
            delivering: Mutex::new(HashSet::new()),
            in_flight: AtomicUsize::new(0),
            wake: Notify::new(),
            counters: QueueCounters::default(),
        }))
    }

    /// The public id of request `n`: `QUEUE.N`.
    pub fn public_id(&self, n: u64) -> String {
        format!("{}.{n}", self.name)
    }

    pub fn delivering(&self, n: u64) -> bool {
        self.delivering.lock().expect("delivering lock").contains(&n)
    }

    /// Wakes the dispatcher (after a replay).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub fn delivering_count(&self) -> usize {
        self.in_flight.load(Relaxed)
    }

    /// Persists a request (its rewritten head and its whole body); returns its number once it is on disk.
    pub async fn accept(&self, head: &http::request::Parts, body: Bytes) -> Result<u64, StoreError> {
        let headers = head
            .headers
            .iter()
            .filter(|(k, _)| *k != http::header::CONTENT_LENGTH)
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let req = QueuedRequest { method: head.method.to_string(), path, headers, body: body.to_vec() };
        let result = self.store.append(req, now_ms()).await;
        match &result {
            Ok(_) => {
                self.counters.accepted.fetch_add(1, Relaxed);
                self.wake.notify_one();
            }
            Err(_) => {
                self.counters.refused.fetch_add(1, Relaxed);
            }
        }
        result
    }

    /// The public view of request `n`.
    pub fn status_json(&self, n: u64) -> Result<Option<Value>, StoreError> {
        let Some(s) = self.store.status(n)? else { return Ok(None) };
        Ok(Some(status_json(&self.public_id(n), &self.name, &s, self.delivering(n))))
    }
}

pub fn status_json(id: &str, queue: &str, s: &Status, delivering: bool) -> Value {
    let state = if s.state == State::Queued && delivering { "delivering" } else { s.state.name() };
    let mut v = json!({
        "id": id,
        "queue": queue,
        "status": state,
        "attempts": s.attempts,
        "created_ms": s.created_ms,
        "updated_ms": s.updated_ms,
    });
    if s.state == State::Queued {
        v["next_attempt_ms"] = s.next_at_ms.into();
    }
    if let Some(code) = s.last_status {
        v["response"] = json!({ "status": code, "body": String::from_utf8_lossy(&s.body) });
    }
    if let Some(e) = &s.last_error {
        v["error"] = e.clone().into();
    }
    v
}

/// Delivers the queue's due requests, oldest due first, at most `concurrency` at once, until shutdown.
pub async fn dispatch(queue: Arc<Queue>, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let free = queue.concurrency.saturating_sub(queue.in_flight.load(Relaxed));
        if free > 0 {
            let skip = queue.delivering.lock().expect("delivering lock").clone();
            match queue.store.due(now_ms(), free, &skip) {
                Ok(due) => {
                    for (n, req, status) in due {
                        queue.delivering.lock().expect("delivering lock").insert(n);
                        queue.in_flight.fetch_add(1, Relaxed);
                        tokio::spawn(deliver(queue.clone(), shared.clone(), n, req, status));
                    }
                }
                Err(e) => tracing::error!(queue = %queue.name, "cannot read the queue: {e}"),
            }
        }
        tokio::select! {
            _ = queue.wake.notified() => {}
            _ = tokio::time::sleep(IDLE_TICK) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn deliver(queue: Arc<Queue>, shared: Arc<Shared>, n: u64, req: QueuedRequest, mut status: Status) {
    queue.counters.deliveries.fetch_add(1, Relaxed);
    if status.attempts > 0 {
        queue.counters.retries.fetch_add(1, Relaxed);
    }
    let outcome = send_once(&shared, &queue, n, req).await;
    status.after_delivery(outcome, now_ms(), &queue.policy, fastrand::f64());
    match status.state {
        State::Done => queue.counters.done.fetch_add(1, Relaxed),
        State::Failed => queue.counters.failed.fetch_add(1, Relaxed),
        State::Dead => {
            tracing::warn!(queue = %queue.name, id = n, "request is now a dead letter");
            queue.counters.dead.fetch_add(1, Relaxed)
        }
        State::Queued => 0,
    };
    if let Err(e) = queue.store.update(n, status).await {
        // The delivery is not recorded: the request stays due and is delivered again (the service dedupes by
        // its Idempotency-Key).
        tracing::error!(queue = %queue.name, id = n, "cannot record a delivery: {e}");
    }
    queue.delivering.lock().expect("delivering lock").remove(&n);
    queue.in_flight.fetch_sub(1, Relaxed);
    queue.wake.notify_one();
}

/// One delivery attempt through the service's pool, with `Idempotency-Key` set to the request's id.
async fn send_once(shared: &Shared, queue: &Queue, n: u64, req: QueuedRequest) -> Outcome {
    let snap = shared.snapshot.load_full();
    let Some(svc) = snap.services.get(&queue.service).cloned() else {
        return Outcome::Error(format!("no service {:?}", queue.service));
    };
    let mut headers = HeaderMap::new();
    for (k, v) in &req.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_bytes(v)) {
            headers.append(k, v);
        }
    }
    if let Ok(key) = HeaderValue::from_str(&queue.public_id(n)) {
        headers.insert(HeaderName::from_static("idempotency-key"), key);
    }
    let method = Method::from_bytes(req.method.as_bytes()).unwrap_or(Method::POST);
    let Ok(built) = Request::builder().method(method).uri(req.path.as_str()).body(()) else {
        return Outcome::Error(format!("bad stored path {:?}", req.path));
    };
    let (mut head, ()) = built.into_parts();
    head.headers = headers;

    let start = Instant::now();
    let wait = svc.config.admission.queue_wait_max.min(svc.config.request_timeout);
    let lease = match svc.pool.acquire(start, None, &Tried::default(), wait, true) {
        Acquired::Now(lease) => lease,
        Acquired::Wait(rx, limit) => match tokio::time::timeout(limit, rx).await {
            Ok(Ok(lease)) => lease,
            _ => return Outcome::Error(format!("no server of service {:?} became ready", svc.name)),
        },
        Acquired::Shed(_) | Acquired::Exhausted => {
            return Outcome::Error(format!("service {:?} is overloaded", svc.name));
        }
    };
    let server = lease.server().clone();
    let sender = match server.checkout(&svc.settings, false).await {
        Ok(s) => s,
        Err(e) => {
            svc.pool.report(&server, Instant::now(), true);
            return Outcome::Error(e.to_string());
        }
    };
    let body = ReqBody::Full(Some(Bytes::from(req.body)));
    let timeout = svc.config.response_timeout;
    match server.send(sender, &head, body, &svc.settings, timeout).await {
        Ok(resp) => {
            let now = Instant::now();
            server.observe_latency(now, now - start);
            let code = resp.status().as_u16();
            svc.pool.report(&server, now, resp.status().is_server_error());
            let body =
                match tokio::time::timeout(timeout, Limited::new(resp.into_body(), ANSWER_BYTES_MAX).collect()).await {
                    Ok(Ok(c)) => c.to_bytes().to_vec(),
                    _ => Vec::new(),
                };
            drop(lease);
            Outcome::Answered { status: code, body }
        }
        Err(e) => {
            if e.server_failed() {
                svc.pool.report(&server, Instant::now(), true);
            }
            Outcome::Error(e.to_string())
        }
    }
}
