//! Durable queues at the proxy: receiving a request's body (within the body deadline, and within the queue's
//! bound on body bytes in flight), accepting it into its route's queue (202 only once it is on disk), its public
//! status, and the dispatcher that delivers queued requests to the service through the same pool, balancer and
//! admission control as live traffic. The decisions are in `nonstop_queue::ledger`; this is the I/O shell around
//! them.
//!
//! A request has two ids. The client's, `QUEUE.KEY` (KEY: 128 random bits in hex), is in the 202 and its
//! Location, reads the public status, and is the Idempotency-Key of every delivery: it is unguessable, and unique
//! across nodes and wiped stores. The operator's, `QUEUE.N` (the store's sequence number), addresses the request
//! on the admin API and `nonstop queue`, whose records show both.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request};
use http_body_util::{BodyExt, Limited};
use nonstop_queue::broker::{self, Link, Names};
use nonstop_queue::{Key, Limits, Outcome, Policy, QueuedRequest, State, Status, Store, StoreError};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot, watch, Notify};

use crate::admission::Tried;
use crate::error::ProxyError;
use crate::h1down::ClientBody;
use crate::pool::Acquired;
use crate::upstream::{Outgoing, ReqBody};
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

/// How long an accept waits for the broker's confirm (reconnecting and publishing again meanwhile) before 503.
const PUBLISH_WAIT: Duration = Duration::from_secs(10);
/// Pause between two attempts to reach the broker.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);

/// A publish for the broker link of the queue's thread.
struct Publish {
    queue: String,
    message_id: String,
    attempts: u32,
    body: Vec<u8>,
    delay: Option<Duration>,
    deadline: Instant,
    reply: oneshot::Sender<Result<(), String>>,
}

/// The RabbitMQ side of a queue: the link lives on the queue's thread; publishes go to it through `tx`.
pub struct Rabbit {
    url: String,
    names: Names,
    length_max: u64,
    bytes_max: u64,
    tx: mpsc::UnboundedSender<Publish>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Publish>>>,
    /// Messages in the broker's main queue, refreshed by the queue's thread.
    pub depth: AtomicU64,
    pub dead_depth: AtomicU64,
    pub connected: std::sync::atomic::AtomicBool,
}

/// One running queue.
pub struct Queue {
    pub name: String,
    pub service: String,
    /// Deliveries happen only while it is open; `None`: always.
    pub window: Option<nonstop_schedule::Window>,
    pub store: Store,
    /// Set when RabbitMQ holds the queue (the store then keeps statuses, and requests for replay).
    pub rabbit: Option<Rabbit>,
    policy: Policy,
    concurrency: usize,
    /// Ids being delivered right now.
    delivering: Mutex<HashSet<u64>>,
    in_flight: AtomicUsize,
    wake: Notify,
    pub counters: QueueCounters,
    /// Whether the public status shows the service's answer body.
    status_body: bool,
    /// Bytes of request bodies being received (or committed) at once, across connections, at most.
    body_bytes_in_flight_max: u64,
    body_bytes_in_flight: AtomicU64,
}

/// Body bytes a request holds of its queue's `body_bytes_in_flight_max`, given back when it is dropped.
pub struct BodyBytes<'a> {
    queue: &'a Queue,
    bytes: u64,
}

impl BodyBytes<'_> {
    /// Takes `more` bytes of the bound, or refuses (503) when they are not free.
    fn take(&mut self, more: u64) -> Result<(), ProxyError> {
        let q = self.queue;
        let max = q.body_bytes_in_flight_max;
        match q
            .body_bytes_in_flight
            .fetch_update(Relaxed, Relaxed, |held| held.checked_add(more).filter(|&total| total <= max))
        {
            Ok(_) => {
                self.bytes += more;
                Ok(())
            }
            Err(held) => Err(ProxyError::QueueRefused {
                queue: q.name.clone(),
                why: format!(
                    "the request bodies it is receiving hold {held} bytes ({} of them this request's), and {more} \
                     more would pass its body_bytes_in_flight_max of {max} bytes",
                    self.bytes
                ),
            }),
        }
    }
}

impl Drop for BodyBytes<'_> {
    fn drop(&mut self) {
        self.queue.body_bytes_in_flight.fetch_sub(self.bytes, Relaxed);
    }
}

impl Queue {
    pub fn open(cfg: &nonstop_config::Queue) -> Result<Arc<Queue>, StoreError> {
        let limits = Limits {
            length_max: cfg.length_max,
            bytes_max: cfg.bytes_max,
            batch_max: cfg.batch_max,
            local_delivery: cfg.rabbitmq.is_none(),
            finished_keep_max: cfg.finished_keep_max,
            finished_keep_ms: cfg.finished_keep.as_millis() as u64,
        };
        let store = Store::open(&cfg.path.join(format!("{}.redb", cfg.name)), limits)?;
        let rabbit = cfg.rabbitmq.as_ref().map(|url| {
            let (tx, rx) = mpsc::unbounded_channel();
            Rabbit {
                url: url.clone(),
                names: Names::of(&cfg.name),
                length_max: cfg.length_max,
                bytes_max: cfg.bytes_max,
                tx,
                rx: Mutex::new(Some(rx)),
                depth: AtomicU64::new(0),
                dead_depth: AtomicU64::new(0),
                connected: std::sync::atomic::AtomicBool::new(false),
            }
        });
        let window = cfg.deliver_window.as_ref().map(|w| {
            let cron = nonstop_schedule::Cron::parse(&w.cron, &cfg.name, &w.time_zone)
                .expect("the config checked the window's schedule");
            nonstop_schedule::Window::new(cron, w.duration.as_millis() as u64)
        });
        Ok(Arc::new(Queue {
            name: cfg.name.clone(),
            service: cfg.service.clone(),
            window,
            store,
            rabbit,
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
            status_body: cfg.status_body,
            body_bytes_in_flight_max: cfg.body_bytes_in_flight_max,
            body_bytes_in_flight: AtomicU64::new(0),
        }))
    }

    /// The operator's id of request `n`, `QUEUE.N`: what the admin API and `nonstop queue` take. Sequential, so
    /// never given to clients.
    pub fn public_id(&self, n: u64) -> String {
        format!("{}.{n}", self.name)
    }

    /// The client's id of the request with `key`, `QUEUE.KEY`: the 202's id, and the Idempotency-Key of its
    /// deliveries.
    pub fn client_id(&self, key: Key) -> String {
        format!("{}.{key}", self.name)
    }

    /// The client's id of request `n`. A request stored before requests had keys keeps the id it was delivered
    /// with then (`QUEUE.N`, or `QUEUE.N@NODE` with RabbitMQ), so that its deliveries are still deduplicated.
    /// The admin API shows it as `key`.
    pub fn key_id(&self, n: u64) -> String {
        match self.store.key(n) {
            Ok(Some(key)) => self.client_id(key),
            Ok(None) | Err(_) => match self.rabbit {
                None => self.public_id(n),
                Some(_) => format!("{}.{n}@{:016x}", self.name, self.store.node_id),
            },
        }
    }

    /// The number of the request whose client id ends in `key` (the part after `QUEUE.`).
    fn number_of_key(&self, key: &str) -> Result<Option<u64>, StoreError> {
        match Key::parse(key) {
            Some(key) => self.store.number(key),
            None => Ok(None),
        }
    }

    /// Reads a request body to its end for the queue, within `deadline` (else 408) and `body_bytes_max` (else
    /// 413), holding its bytes of the queue's `body_bytes_in_flight_max` (else 503) until the returned guard is
    /// dropped. A declared length is held at once, before any byte is read; a body of unknown length as it comes.
    pub async fn receive(
        &self,
        body: ClientBody,
        declared: Option<u64>,
        body_bytes_max: u64,
        deadline: Duration,
    ) -> Result<(Bytes, BodyBytes<'_>), ProxyError> {
        let mut held = BodyBytes { queue: self, bytes: 0 };
        if let Some(n) = declared {
            held.take(n)?;
        }
        let read = async {
            let mut body = std::pin::pin!(body);
            let mut chunks: Vec<Bytes> = Vec::new();
            let mut len = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| ProxyError::ClientBody(std::io::Error::other(e.to_string())))?;
                let Ok(data) = frame.into_data() else { continue };
                len += data.len() as u64;
                if len > body_bytes_max {
                    return Err(ProxyError::BodyTooLarge(body_bytes_max));
                }
                if len > held.bytes {
                    held.take(len - held.bytes)?;
                }
                chunks.push(data);
            }
            Ok(match chunks.len() {
                0 => Bytes::new(),
                1 => chunks.pop().expect("one chunk"),
                _ => {
                    let mut all = Vec::with_capacity(len as usize);
                    for c in chunks.drain(..) {
                        all.extend_from_slice(&c);
                    }
                    Bytes::from(all)
                }
            })
        };
        match tokio::time::timeout(deadline, read).await {
            Ok(Ok(bytes)) => Ok((bytes, held)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(ProxyError::ClientBodyTimeout { ms: deadline.as_millis() }),
        }
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

    /// Persists a request (its rewritten head and its whole body); returns its number and key once it is on disk.
    pub async fn accept(&self, head: &http::request::Parts, body: Bytes) -> Result<(u64, Key), StoreError> {
        let headers = head
            .headers
            .iter()
            .filter(|(k, _)| *k != http::header::CONTENT_LENGTH)
            .map(|(k, v)| (k.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        let path = head.uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let req = QueuedRequest { method: head.method.to_string(), path, headers, body: Vec::from(body) };
        let result = match &self.rabbit {
            None => self.store.append(req, now_ms()).await,
            Some(r) => {
                let encoded = req.encode();
                let (n, key) = self.store.append(req, now_ms()).await?;
                match self.publish(r, &r.names.main, &self.client_id(key), 0, encoded, None).await {
                    Ok(()) => Ok((n, key)),
                    Err(e) => {
                        // Not confirmed: no 202, and no status left behind.
                        let _ = self.store.forget(n).await;
                        Err(StoreError::Io(e))
                    }
                }
            }
        };
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

    /// The broker's message id of request `n`: its client id, unique across nodes, and the Idempotency-Key of its
    /// deliveries.
    pub fn message_id(&self, n: u64) -> String {
        self.key_id(n)
    }

    /// Publishes through the queue thread's link and waits for the confirm.
    async fn publish(
        &self,
        r: &Rabbit,
        queue: &str,
        message_id: &str,
        attempts: u32,
        body: Vec<u8>,
        delay: Option<Duration>,
    ) -> Result<(), String> {
        let (reply, rx) = oneshot::channel();
        let deadline = Instant::now() + PUBLISH_WAIT;
        let p = Publish {
            queue: queue.to_string(),
            message_id: message_id.to_string(),
            attempts,
            body,
            delay,
            deadline,
            reply,
        };
        r.tx.send(p).map_err(|_| "the queue's broker link is closed".to_string())?;
        match tokio::time::timeout(PUBLISH_WAIT + Duration::from_secs(1), rx).await {
            Ok(Ok(result)) => result,
            _ => Err(format!("RabbitMQ did not confirm within {} s", PUBLISH_WAIT.as_secs())),
        }
    }

    /// Queues a dead letter or a failed request again (embedded: due now; RabbitMQ: published to the main queue
    /// again).
    pub async fn replay(&self, n: u64) -> Result<(), StoreError> {
        if let Some(r) = &self.rabbit {
            let Some(req) = self.store.request(n)? else { return Err(StoreError::Missing(n)) };
            match self.store.status(n)? {
                None => return Err(StoreError::Missing(n)),
                Some(s) if s.state != State::Dead && s.state != State::Failed => return Err(StoreError::NotDead(n)),
                Some(_) => {}
            }
            self.publish(r, &r.names.main, &self.message_id(n), 0, req.encode(), None).await.map_err(StoreError::Io)?;
        }
        self.store.replay(n, now_ms()).await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Deletes the dead letters (and, with RabbitMQ, empties the dead-letter queue).
    pub async fn purge(&self) -> Result<u64, StoreError> {
        let n = self.store.purge().await?;
        if let Some(r) = &self.rabbit {
            let link = Link::open(&r.url, &r.names, 1, r.length_max, r.bytes_max)
                .await
                .map_err(|e| StoreError::Io(e.to_string()))?;
            link.purge(&r.names.dead).await.map_err(|e| StoreError::Io(e.to_string()))?;
            let _ = link.conn.close(200, "purged".into()).await;
        }
        Ok(n)
    }

    /// The operator's view of request `n` (admin API): the whole record, the answer's body included, with the
    /// client's id as `key`.
    pub fn status_json(&self, n: u64) -> Result<Option<Value>, StoreError> {
        let Some(s) = self.store.status(n)? else { return Ok(None) };
        let mut v = status_json(&self.public_id(n), &self.name, &s, self.delivering(n));
        v["key"] = self.key_id(n).into();
        Ok(Some(v))
    }

    /// The client's view of the request whose client id is `QUEUE.KEY` (`key` is the part after the dot): without
    /// the answer's body, and with [`NO_ANSWER`] for the last delivery's error (whose text can name a server's
    /// address), unless the queue has `status_body = true`. `None` for anything that is not the key of a request
    /// of this queue (sequence numbers included).
    pub fn public_status(&self, key: &str) -> Result<Option<Value>, StoreError> {
        let Some(n) = self.number_of_key(key)? else { return Ok(None) };
        let Some(s) = self.store.status(n)? else { return Ok(None) };
        let mut v = status_json(&format!("{}.{key}", self.name), &self.name, &s, self.delivering(n));
        if !self.status_body {
            if let Some(response) = v.get_mut("response").and_then(Value::as_object_mut) {
                response.remove("body");
            }
            if let Some(error) = v.get_mut("error") {
                *error = NO_ANSWER.into();
            }
        }
        Ok(Some(v))
    }
}

/// The public status's `error` without `status_body`: the class of the last delivery's outcome (no answer from
/// the service: a connect error, a timeout, a reset, or no server to send it to), for its text names servers.
pub const NO_ANSWER: &str = "no answer";

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

/// Longest sleep of a queue waiting for its delivery window (the clock is read again after it).
const WINDOW_SLEEP_MAX: Duration = Duration::from_secs(60);

/// Delivers the queue's due requests, oldest due first, at most `concurrency` at once, until shutdown.
pub async fn dispatch(queue: Arc<Queue>, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    if queue.rabbit.is_some() {
        return rabbit_loop(queue, shared, shutdown).await;
    }
    loop {
        // Outside its delivery window a queue only accepts: it sleeps until the window opens.
        if let Some(w) = &queue.window {
            let now = now_ms();
            if !w.is_open(now) {
                let wait = w.next_open_ms(now).map_or(WINDOW_SLEEP_MAX, |t| {
                    Duration::from_millis(t.saturating_sub(now).max(1)).min(WINDOW_SLEEP_MAX)
                });
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
                continue;
            }
        }
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
    let outcome = send_once(&shared, &queue, &queue.key_id(n), req).await;
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
async fn send_once(shared: &Shared, queue: &Queue, key: &str, req: QueuedRequest) -> Outcome {
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
    if let Ok(key) = HeaderValue::from_str(key) {
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
    let timer = std::pin::pin!(tokio::time::sleep(timeout));
    match server.send(sender, Outgoing { head: &head, added: &[] }, body, &svc.settings, timeout, timer).await {
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

/// The RabbitMQ side of the queue's thread: keeps one link (reconnecting after any failure), publishes what
/// accepts and retries send it (an unconfirmed publish is sent again on the next link, until its deadline), and
/// consumes the main queue with manual acks and prefetch equal to the concurrency.
async fn rabbit_loop(queue: Arc<Queue>, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    use futures_lite::StreamExt;
    let r = queue.rabbit.as_ref().expect("rabbit queue");
    let Some(mut rx) = r.rx.lock().expect("rx lock").take() else { return };
    let mut pending: std::collections::VecDeque<Publish> = std::collections::VecDeque::new();
    let prefetch = queue.concurrency.min(u16::MAX as usize) as u16;
    // Requests persisted here whose publish may not have been confirmed before a crash are published again (a
    // duplicate is harmless: deliveries carry the same Idempotency-Key).
    let mut resend = match queue.store.untried() {
        Ok(list) => list,
        Err(e) => {
            tracing::error!(queue = %queue.name, "cannot read the store: {e}");
            Vec::new()
        }
    };
    if !resend.is_empty() {
        tracing::info!(queue = %queue.name, count = resend.len(), "publishing again requests not yet tried");
    }
    loop {
        if *shutdown.borrow() {
            return;
        }
        let link = match Link::open(&r.url, &r.names, prefetch, r.length_max, r.bytes_max).await {
            Ok(l) => Arc::new(l),
            Err(e) => {
                r.connected.store(false, Relaxed);
                tracing::warn!(queue = %queue.name, "cannot reach RabbitMQ: {e}");
                fail_expired(&mut pending, &mut rx);
                tokio::select! {
                    _ = tokio::time::sleep(RECONNECT_PAUSE) => continue,
                    _ = shutdown.changed() => return,
                }
            }
        };
        let tag = format!("nonstop-{:016x}", queue.store.node_id);
        // With a delivery window, the queue is consumed only while it is open (see `consume_in_window`).
        let mut consumer = None;
        r.connected.store(true, Relaxed);
        tracing::info!(queue = %queue.name, "connected to RabbitMQ");
        while let Some((n, req)) = resend.last() {
            if link.publish(&r.names.main, &queue.message_id(*n), 0, &req.encode(), None).await.is_err() {
                break;
            }
            resend.pop();
        }
        let mut depth_tick = tokio::time::interval(Duration::from_secs(1));
        // Publishes run concurrently (one task each, confirms awaited in parallel); one that fails with the link
        // comes back here to be sent again on the next link.
        let (failed_tx, mut failed_rx) = mpsc::unbounded_channel::<Publish>();
        for p in pending.drain(..) {
            tokio::spawn(publish_task(link.clone(), p, failed_tx.clone()));
        }
        'link: loop {
            let change = match consume_in_window(&queue, &link, &tag, &mut consumer).await {
                Ok(change) => change,
                Err(e) => {
                    tracing::warn!(queue = %queue.name, "cannot consume from RabbitMQ: {e}");
                    break 'link;
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(change), if queue.window.is_some() => {}
                p = rx.recv() => {
                    let Some(p) = p else { return };
                    tokio::spawn(publish_task(link.clone(), p, failed_tx.clone()));
                }
                p = failed_rx.recv() => {
                    if let Some(p) = p {
                        pending.push_back(p);
                    }
                    break 'link;
                }
                d = async { consumer.as_mut().expect("consuming").next().await }, if consumer.is_some() => match d {
                    Some(Ok(delivery)) => {
                        tokio::spawn(rabbit_deliver(queue.clone(), shared.clone(), delivery));
                    }
                    _ => break 'link,
                },
                _ = depth_tick.tick() => {
                    let (main, retry) = (link.depth(&r.names.main).await, link.depth(&r.names.retry).await);
                    match (main, retry, link.depth(&r.names.dead).await) {
                        (Ok(main), Ok(retry), Ok(dead)) => {
                            r.depth.store(u64::from(main) + u64::from(retry), Relaxed);
                            r.dead_depth.store(u64::from(dead), Relaxed);
                        }
                        _ => break 'link,
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
        // Publishes still in flight on the old link fail and come back; collect those that already did.
        drop(failed_tx);
        let _ = link.conn.close(200, "reconnecting".into()).await;
        while let Ok(p) = failed_rx.try_recv() {
            pending.push_back(p);
        }
        r.connected.store(false, Relaxed);
        tracing::warn!(queue = %queue.name, "lost RabbitMQ; reconnecting");
    }
}

/// Starts or cancels the consumer of the main queue by the queue's delivery window (always consuming without
/// one); how long until the window next opens or closes (capped, so the clock is read again). Messages the
/// broker had already sent when the window closed are given back to it (nack with requeue), unprocessed.
async fn consume_in_window(
    queue: &Queue,
    link: &Link,
    tag: &str,
    consumer: &mut Option<nonstop_queue::lapin::Consumer>,
) -> Result<Duration, nonstop_queue::lapin::Error> {
    use futures_lite::StreamExt;
    use nonstop_queue::lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicNackOptions};
    let r = queue.rabbit.as_ref().expect("rabbit queue");
    let now = now_ms();
    let cap_ms = WINDOW_SLEEP_MAX.as_millis() as u64;
    let (open, change) = match &queue.window {
        None => (true, cap_ms),
        Some(w) if w.is_open(now) => (true, w.closes_at_ms(now).map_or(cap_ms, |t| t.saturating_sub(now))),
        Some(w) => (false, w.next_open_ms(now).map_or(cap_ms, |t| t.saturating_sub(now))),
    };
    let change = Duration::from_millis(change.max(1)).min(WINDOW_SLEEP_MAX);
    if open && consumer.is_none() {
        let c = link
            .channel
            .basic_consume(
                r.names.main.as_str().into(),
                tag.into(),
                BasicConsumeOptions::default(),
                nonstop_queue::lapin::types::FieldTable::default(),
            )
            .await?;
        if queue.window.is_some() {
            tracing::info!(queue = %queue.name, "delivery window open: consuming from RabbitMQ");
        }
        *consumer = Some(c);
    } else if !open {
        if let Some(mut c) = consumer.take() {
            tracing::info!(queue = %queue.name, "delivery window closed: no longer consuming from RabbitMQ");
            link.channel.basic_cancel(tag.into(), BasicCancelOptions::default()).await?;
            let requeue = BasicNackOptions { requeue: true, ..Default::default() };
            while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(200), c.next()).await {
                let _ = d.nack(requeue).await;
            }
        }
    }
    Ok(change)
}

/// Publishes one message on the link and answers with the broker's confirm. A failure of the link sends it back
/// to the queue's loop (to be sent again after reconnecting); a refusal by the broker (nack, returned) is
/// answered at once.
async fn publish_task(link: Arc<Link>, p: Publish, failed: mpsc::UnboundedSender<Publish>) {
    if Instant::now() >= p.deadline || p.reply.is_closed() {
        let _ = p.reply.send(Err("RabbitMQ did not confirm in time".into()));
        return;
    }
    match link.publish(&p.queue, &p.message_id, p.attempts, &p.body, p.delay).await {
        Ok(()) => {
            let _ = p.reply.send(Ok(()));
        }
        Err(e @ (broker::BrokerError::Nacked | broker::BrokerError::Returned)) => {
            let _ = p.reply.send(Err(format!("{e} (the queue may be full)")));
        }
        Err(e) => {
            tracing::warn!("publish failed, will send again after reconnecting: {e}");
            if let Err(back) = failed.send(p) {
                let _ = back.0.reply.send(Err("RabbitMQ connection lost".into()));
            }
        }
    }
}

/// While the broker is unreachable: answers the publishes whose deadline passed.
fn fail_expired(pending: &mut std::collections::VecDeque<Publish>, rx: &mut mpsc::UnboundedReceiver<Publish>) {
    while let Ok(p) = rx.try_recv() {
        pending.push_back(p);
    }
    let now = Instant::now();
    pending.retain_mut(|p| {
        if now >= p.deadline || p.reply.is_closed() {
            let reply = std::mem::replace(&mut p.reply, oneshot::channel().0);
            let _ = reply.send(Err("RabbitMQ is unreachable".into()));
            false
        } else {
            true
        }
    });
}

/// Delivers one message from the broker, then acks it (done, failed, or sent on to the retry queue) or rejects it
/// into the dead-letter queue.
async fn rabbit_deliver(queue: Arc<Queue>, shared: Arc<Shared>, delivery: nonstop_queue::lapin::message::Delivery) {
    use nonstop_queue::lapin::options::{BasicAckOptions, BasicNackOptions};
    let r = queue.rabbit.as_ref().expect("rabbit queue");
    let message_id = delivery.properties.message_id().as_ref().map(|m| m.to_string()).unwrap_or_default();
    let attempts = broker::attempts_of(&delivery.properties);
    let Some(req) = QueuedRequest::decode(&delivery.data) else {
        tracing::error!(queue = %queue.name, "undecodable message {message_id:?}: dead-lettered");
        let _ = delivery.nack(broker::dead_letter_options()).await;
        return;
    };
    // This node's own requests have a status here (found by key, or by number for a message published before
    // requests had keys); other nodes' are delivered all the same.
    let own = match message_id.strip_prefix(&format!("{}.", queue.name)) {
        Some(rest) => match rest.strip_suffix(&format!("@{:016x}", queue.store.node_id)) {
            Some(n) => n.parse::<u64>().ok(),
            None => queue.number_of_key(rest).ok().flatten(),
        },
        None => None,
    };
    let mut status = own.and_then(|n| queue.store.status(n).ok().flatten()).unwrap_or_else(|| Status::new(now_ms()));
    status.attempts = attempts;
    if let Some(n) = own {
        queue.delivering.lock().expect("delivering lock").insert(n);
    }
    queue.in_flight.fetch_add(1, Relaxed);
    queue.counters.deliveries.fetch_add(1, Relaxed);
    if attempts > 0 {
        queue.counters.retries.fetch_add(1, Relaxed);
    }
    let encoded = req.encode();
    let outcome = send_once(&shared, &queue, &message_id, req).await;
    let now = now_ms();
    status.after_delivery(outcome, now, &queue.policy, fastrand::f64());
    let settled = match status.state {
        State::Done | State::Failed => {
            let c = if status.state == State::Done { &queue.counters.done } else { &queue.counters.failed };
            c.fetch_add(1, Relaxed);
            delivery.ack(BasicAckOptions::default()).await.is_ok()
        }
        State::Queued => {
            let delay = Duration::from_millis(status.next_at_ms.saturating_sub(now));
            let retry = &r.names.retry;
            match queue.publish(r, retry, &message_id, status.attempts, encoded, Some(delay)).await {
                Ok(()) => delivery.ack(BasicAckOptions::default()).await.is_ok(),
                Err(e) => {
                    tracing::warn!(queue = %queue.name, "cannot schedule a retry ({e}); requeued");
                    let _ = delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
                    false
                }
            }
        }
        State::Dead => {
            queue.counters.dead.fetch_add(1, Relaxed);
            delivery.nack(broker::dead_letter_options()).await.is_ok()
        }
    };
    if let (Some(n), true) = (own, settled) {
        if let Err(e) = queue.store.update(n, status).await {
            tracing::error!(queue = %queue.name, id = n, "cannot record a delivery: {e}");
        }
    }
    if let Some(n) = own {
        queue.delivering.lock().expect("delivering lock").remove(&n);
    }
    queue.in_flight.fetch_sub(1, Relaxed);
}
