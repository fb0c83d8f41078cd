//! The embedded store: queued requests and their status in one redb file. Every write goes through one writer
//! thread that takes all the operations waiting, applies them in one transaction and commits it; redb's commit
//! returns only after the fsync, so an append is acknowledged (and its client answered 202) only once it is on
//! disk, and one fsync serves many requests (group commit). Each request has a sequence number (the order of
//! the store's tables, and the admin API's `QUEUE.N`) and a random [`Key`] (its client-facing id and delivery
//! Idempotency-Key), with an index from key to number. The directory is created 0700 and the file 0600: it holds
//! pending requests' headers (`Authorization`, `Cookie`) as they came.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::oneshot;

use crate::key::Key;
use crate::ledger::{State, Status};
use crate::record::QueuedRequest;

const REQUESTS: TableDefinition<u64, &[u8]> = TableDefinition::new("requests");
const STATUS: TableDefinition<u64, &[u8]> = TableDefinition::new("status");
/// Queued requests by due time: (next_at_ms, id).
const DUE: TableDefinition<(u64, u64), ()> = TableDefinition::new("due");
const DEAD: TableDefinition<u64, ()> = TableDefinition::new("dead");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Request numbers by key, and keys by number.
const KEYS: TableDefinition<u128, u64> = TableDefinition::new("keys");
const KEY_OF: TableDefinition<u64, u128> = TableDefinition::new("key_of");
/// Failed requests (a 4xx the service gave for good), and their stored request kept for a replay (not counted
/// in the queue's bytes: it is not waiting).
const FAILED: TableDefinition<u64, ()> = TableDefinition::new("failed");
const FAILED_REQUESTS: TableDefinition<u64, &[u8]> = TableDefinition::new("failed_requests");
/// Finished (done or failed) requests by the time they finished: (finished_ms, id), for retention.
const FINISHED: TableDefinition<(u64, u64), ()> = TableDefinition::new("finished");
const NEXT_ID: &str = "next_id";
/// The queue's depth and bytes as of the last commit, so that opening the store reads two numbers instead of
/// scanning every status it ever kept.
const DEPTH: &str = "depth";
const BYTES: &str = "bytes";
/// Finished requests deleted per commit at most, so that a long backlog of expired ones does not stall appends.
const PRUNE_BATCH: usize = 10_000;
/// How often an idle writer wakes to delete expired finished statuses.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
const NODE_ID: &str = "node_id";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the queue is full ({0})")]
    Full(String),
    #[error("the queue's store failed: {0}")]
    Io(String),
    #[error("no request {0} in the queue")]
    Missing(u64),
    #[error("request {0} is neither a dead letter nor failed")]
    NotDead(u64),
    #[error("the queue's store is closed")]
    Closed,
}

impl StoreError {
    fn io(e: impl std::fmt::Display) -> StoreError {
        StoreError::Io(e.to_string())
    }
}

/// Bounds of one queue.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Requests waiting for delivery (queued) at most.
    pub length_max: u64,
    /// Bytes of requests not yet delivered at most.
    pub bytes_max: u64,
    /// Operations applied in one transaction at most.
    pub batch_max: usize,
    /// Queued requests are delivered from this store (embedded). False when a broker holds the queue and the
    /// store keeps only statuses and requests for replay: nothing is ever due here.
    pub local_delivery: bool,
    /// Finished (done, failed) statuses kept at most; the oldest finished go first.
    pub finished_keep_max: u64,
    /// How long a finished status is kept, ms.
    pub finished_keep_ms: u64,
}

/// Live figures, for metrics.
#[derive(Default)]
pub struct Counts {
    /// Requests queued (waiting for delivery).
    pub depth: AtomicU64,
    /// Bytes of requests not yet delivered.
    pub bytes: AtomicU64,
    pub dead: AtomicU64,
    /// Commits, and operations they carried (group commit batch sizes).
    pub commits: AtomicU64,
    pub committed_ops: AtomicU64,
    pub batch_max_seen: AtomicU64,
}

enum Op {
    Append(QueuedRequest, u64, oneshot::Sender<Result<(u64, Key), StoreError>>),
    Update(u64, Status, oneshot::Sender<Result<(), StoreError>>),
    Replay(u64, u64, oneshot::Sender<Result<(), StoreError>>),
    Purge(oneshot::Sender<Result<u64, StoreError>>),
    Forget(u64, oneshot::Sender<Result<(), StoreError>>),
}

pub struct Store {
    db: Arc<Database>,
    ops: Option<mpsc::Sender<Op>>,
    writer: Option<std::thread::JoinHandle<()>>,
    pub counts: Arc<Counts>,
    /// A random number fixed when the store was created: tells this node's requests from other nodes'.
    pub node_id: u64,
}

impl Drop for Store {
    /// Closes the writer (it finishes the operations already sent) and waits for it, so that the file is
    /// released when the store is gone.
    fn drop(&mut self) {
        self.ops.take();
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Store {
    /// Opens (or creates) the store at `path` and starts its writer thread. Its directory is made (or left)
    /// owner-only (0700) and its file 0600.
    pub fn open(path: &Path, limits: Limits) -> Result<Store, StoreError> {
        private_file(path).map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        let db = Database::create(path).map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        let db = Arc::new(db);
        let counts = Arc::new(Counts::default());
        let node_id;
        {
            let w = db.begin_write().map_err(StoreError::io)?;
            {
                let mut meta = w.open_table(META).map_err(StoreError::io)?;
                let existing = meta.get(NODE_ID).map_err(StoreError::io)?.map(|v| v.value());
                node_id = match existing {
                    Some(id) => id,
                    None => {
                        let id = random_u64();
                        meta.insert(NODE_ID, id).map_err(StoreError::io)?;
                        id
                    }
                };
            }
            {
                w.open_table(FAILED).map_err(StoreError::io)?;
                w.open_table(FAILED_REQUESTS).map_err(StoreError::io)?;
                w.open_table(FINISHED).map_err(StoreError::io)?;
                // Create every table, and count what is there.
                let requests = w.open_table(REQUESTS).map_err(StoreError::io)?;
                let status = w.open_table(STATUS).map_err(StoreError::io)?;
                let due = w.open_table(DUE).map_err(StoreError::io)?;
                let dead = w.open_table(DEAD).map_err(StoreError::io)?;
                w.open_table(META).map_err(StoreError::io)?;
                w.open_table(KEYS).map_err(StoreError::io)?;
                w.open_table(KEY_OF).map_err(StoreError::io)?;
                let meta = w.open_table(META).map_err(StoreError::io)?;
                let saved = |k: &str| meta.get(k).map(|v| v.map(|v| v.value())).map_err(StoreError::io);
                let (depth, bytes) = match (saved(DEPTH)?, saved(BYTES)?) {
                    (Some(depth), Some(bytes)) => (depth, bytes),
                    _ => {
                        // A store written before the counts were kept: counted once, then kept at every commit.
                        let mut bytes = 0u64;
                        for entry in requests.iter().map_err(StoreError::io)? {
                            let (_, v) = entry.map_err(StoreError::io)?;
                            bytes += v.value().len() as u64;
                        }
                        let mut queued = 0u64;
                        for entry in status.iter().map_err(StoreError::io)? {
                            let (_, v) = entry.map_err(StoreError::io)?;
                            if Status::decode(v.value()).is_some_and(|s| s.state == State::Queued) {
                                queued += 1;
                            }
                        }
                        (queued, bytes)
                    }
                };
                let _ = &due;
                counts.bytes.store(bytes, Relaxed);
                counts.depth.store(depth, Relaxed);
                counts.dead.store(dead.len().map_err(StoreError::io)?, Relaxed);
            }
            w.commit().map_err(StoreError::io)?;
        }
        let (tx, rx) = mpsc::channel();
        let (wdb, wcounts) = (db.clone(), counts.clone());
        let writer = std::thread::Builder::new()
            .name("queue-writer".into())
            .spawn(move || writer(wdb, rx, limits, wcounts))
            .map_err(StoreError::io)?;
        Ok(Store { db, ops: Some(tx), writer: Some(writer), counts, node_id })
    }

    fn sender(&self) -> Result<&mpsc::Sender<Op>, StoreError> {
        self.ops.as_ref().ok_or(StoreError::Closed)
    }

    /// Persists a request; returns its number and its key once it is on disk.
    pub async fn append(&self, req: QueuedRequest, now_ms: u64) -> Result<(u64, Key), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?.send(Op::Append(req, now_ms, tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Records a request's new status (after a delivery).
    pub async fn update(&self, id: u64, status: Status) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?.send(Op::Update(id, status, tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues a dead letter, or a failed request, again.
    pub async fn replay(&self, id: u64, now_ms: u64) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?.send(Op::Replay(id, now_ms, tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Deletes a request that was never acknowledged (its broker publish failed).
    pub async fn forget(&self, id: u64) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?.send(Op::Forget(id, tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Deletes every dead letter; returns how many.
    pub async fn purge(&self) -> Result<u64, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?.send(Op::Purge(tx)).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Up to `limit` queued requests due at `now_ms`, earliest first, leaving out `skip` (those being delivered).
    pub fn due(
        &self,
        now_ms: u64,
        limit: usize,
        skip: &HashSet<u64>,
    ) -> Result<Vec<(u64, QueuedRequest, Status)>, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        let due = r.open_table(DUE).map_err(StoreError::io)?;
        let requests = r.open_table(REQUESTS).map_err(StoreError::io)?;
        let status = r.open_table(STATUS).map_err(StoreError::io)?;
        let mut out = Vec::new();
        for entry in due.range((0u64, 0u64)..=(now_ms, u64::MAX)).map_err(StoreError::io)? {
            if out.len() >= limit {
                break;
            }
            let (k, _) = entry.map_err(StoreError::io)?;
            let (_, id) = k.value();
            if skip.contains(&id) {
                continue;
            }
            let req = requests.get(id).map_err(StoreError::io)?.and_then(|v| QueuedRequest::decode(v.value()));
            let st = status.get(id).map_err(StoreError::io)?.and_then(|v| Status::decode(v.value()));
            if let (Some(req), Some(st)) = (req, st) {
                out.push((id, req, st));
            }
        }
        Ok(out)
    }

    /// When the next queued request is due, if any is.
    pub fn next_due_ms(&self) -> Result<Option<u64>, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        let due = r.open_table(DUE).map_err(StoreError::io)?;
        let first = due.first().map_err(StoreError::io)?;
        Ok(first.map(|(k, _)| k.value().0))
    }

    pub fn status(&self, id: u64) -> Result<Option<Status>, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        let status = r.open_table(STATUS).map_err(StoreError::io)?;
        let v = status.get(id).map_err(StoreError::io)?;
        Ok(v.and_then(|v| Status::decode(v.value())))
    }

    /// The key of request `id`; `None` for an unknown request, or one stored before requests had keys.
    pub fn key(&self, id: u64) -> Result<Option<Key>, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        let key_of = r.open_table(KEY_OF).map_err(StoreError::io)?;
        Ok(key_of.get(id).map_err(StoreError::io)?.map(|v| Key(v.value())))
    }

    /// The number of the request with `key`.
    pub fn number(&self, key: Key) -> Result<Option<u64>, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        let keys = r.open_table(KEYS).map_err(StoreError::io)?;
        Ok(keys.get(key.0).map_err(StoreError::io)?.map(|v| v.value()))
    }

    pub fn request(&self, id: u64) -> Result<Option<QueuedRequest>, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        let requests = r.open_table(REQUESTS).map_err(StoreError::io)?;
        if let Some(v) = requests.get(id).map_err(StoreError::io)? {
            return Ok(QueuedRequest::decode(v.value()));
        }
        let failed = r.open_table(FAILED_REQUESTS).map_err(StoreError::io)?;
        let v = failed.get(id).map_err(StoreError::io)?;
        Ok(v.and_then(|v| QueuedRequest::decode(v.value())))
    }

    /// Requests still queued that were never tried (with a broker: those whose publish may not have been confirmed
    /// before a crash), with their stored request.
    pub fn untried(&self) -> Result<Vec<(u64, QueuedRequest)>, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        let status = r.open_table(STATUS).map_err(StoreError::io)?;
        let requests = r.open_table(REQUESTS).map_err(StoreError::io)?;
        let mut out = Vec::new();
        // The requests table holds only the requests not finished (queued and dead), never the whole history.
        for entry in requests.iter().map_err(StoreError::io)? {
            let (k, v) = entry.map_err(StoreError::io)?;
            let s = status.get(k.value()).map_err(StoreError::io)?.and_then(|v| Status::decode(v.value()));
            if s.is_some_and(|s| s.state == State::Queued && s.attempts == 0) {
                if let Some(req) = QueuedRequest::decode(v.value()) {
                    out.push((k.value(), req));
                }
            }
        }
        Ok(out)
    }

    /// Up to `limit` dead letters, oldest id first.
    pub fn dead(&self, limit: usize) -> Result<Vec<(u64, Status)>, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        let dead = r.open_table(DEAD).map_err(StoreError::io)?;
        let status = r.open_table(STATUS).map_err(StoreError::io)?;
        let mut out = Vec::new();
        for entry in dead.iter().map_err(StoreError::io)?.take(limit) {
            let (k, _) = entry.map_err(StoreError::io)?;
            if let Some(s) = status.get(k.value()).map_err(StoreError::io)?.and_then(|v| Status::decode(v.value())) {
                out.push((k.value(), s));
            }
        }
        Ok(out)
    }

    /// Up to `limit` failed requests (the service answered a 4xx for good), oldest id first.
    pub fn failed(&self, limit: usize) -> Result<Vec<(u64, Status)>, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        let failed = r.open_table(FAILED).map_err(StoreError::io)?;
        let status = r.open_table(STATUS).map_err(StoreError::io)?;
        let mut out = Vec::new();
        for entry in failed.iter().map_err(StoreError::io)?.take(limit) {
            let (k, _) = entry.map_err(StoreError::io)?;
            if let Some(s) = status.get(k.value()).map_err(StoreError::io)?.and_then(|v| Status::decode(v.value())) {
                out.push((k.value(), s));
            }
        }
        Ok(out)
    }

    /// Finished (done or failed) statuses kept.
    pub fn finished(&self) -> Result<u64, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        r.open_table(FINISHED).map_err(StoreError::io)?.len().map_err(StoreError::io)
    }

    /// Creation time of the oldest queued request.
    pub fn oldest_queued_ms(&self) -> Result<Option<u64>, StoreError> {
        let r = self.db.begin_read().map_err(StoreError::io)?;
        let due = r.open_table(DUE).map_err(StoreError::io)?;
        let status = r.open_table(STATUS).map_err(StoreError::io)?;
        let mut oldest: Option<u64> = None;
        for entry in due.iter().map_err(StoreError::io)? {
            let (k, _) = entry.map_err(StoreError::io)?;
            if let Some(s) = status.get(k.value().1).map_err(StoreError::io)?.and_then(|v| Status::decode(v.value())) {
                oldest = Some(oldest.map_or(s.created_ms, |o| o.min(s.created_ms)));
            }
        }
        Ok(oldest)
    }
}

/// The reply each operation of a batch gets once the batch is committed (or failed).
enum Reply {
    Append(oneshot::Sender<Result<(u64, Key), StoreError>>, Result<(u64, Key), StoreError>),
    Unit(oneshot::Sender<Result<(), StoreError>>, Result<(), StoreError>),
    Count(oneshot::Sender<Result<u64, StoreError>>, Result<u64, StoreError>),
}

/// Creates the store's directory owner-only (0700), or makes an existing one so, and creates (or restricts) the
/// file 0600, before redb opens it.
fn private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        if std::fs::metadata(dir)?.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    let file =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(0o600).open(path)?;
    if file.metadata()?.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

/// A key no request of the store has yet (a collision of 128 random bits is not expected, but is not trusted
/// never to happen either).
fn fresh_key(keys: &redb::Table<u128, u64>) -> Result<Key, StoreError> {
    loop {
        let key = Key::random().map_err(|e| StoreError::Io(format!("no random key: {e}")))?;
        if keys.get(key.0).map_err(StoreError::io)?.is_none() {
            return Ok(key);
        }
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    h.finish()
}

/// True when some finished status is past the retention (by count or age).
fn prune_due(db: &Database, limits: &Limits) -> bool {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let check = || -> Result<bool, StoreError> {
        let r = db.begin_read().map_err(StoreError::io)?;
        let finished = r.open_table(FINISHED).map_err(StoreError::io)?;
        let oldest = finished.first().map_err(StoreError::io)?.map(|(k, _)| k.value().0);
        Ok(finished.len().map_err(StoreError::io)? > limits.finished_keep_max
            || oldest.is_some_and(|at| at.saturating_add(limits.finished_keep_ms) <= now))
    };
    check().unwrap_or(false)
}

fn writer(db: Arc<Database>, rx: mpsc::Receiver<Op>, limits: Limits, counts: Arc<Counts>) {
    loop {
        // Idle for a while: a commit with no operation, which deletes the finished statuses that expired.
        let mut batch = match rx.recv_timeout(PRUNE_EVERY) {
            Ok(first) => vec![first],
            Err(mpsc::RecvTimeoutError::Timeout) if prune_due(&db, &limits) => Vec::new(),
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        while batch.len() < limits.batch_max {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        // What the counts become if the batch commits.
        let (mut depth, mut bytes, mut dead) =
            (counts.depth.load(Relaxed), counts.bytes.load(Relaxed), counts.dead.load(Relaxed));
        let mut replies = Vec::with_capacity(batch.len());
        let result = (|| -> Result<(), StoreError> {
            let w = db.begin_write().map_err(StoreError::io)?;
            {
                let mut requests = w.open_table(REQUESTS).map_err(StoreError::io)?;
                let mut status = w.open_table(STATUS).map_err(StoreError::io)?;
                let mut due = w.open_table(DUE).map_err(StoreError::io)?;
                let mut dead_t = w.open_table(DEAD).map_err(StoreError::io)?;
                let mut meta = w.open_table(META).map_err(StoreError::io)?;
                let mut keys = w.open_table(KEYS).map_err(StoreError::io)?;
                let mut key_of = w.open_table(KEY_OF).map_err(StoreError::io)?;
                let mut failed_t = w.open_table(FAILED).map_err(StoreError::io)?;
                let mut failed_req = w.open_table(FAILED_REQUESTS).map_err(StoreError::io)?;
                let mut finished = w.open_table(FINISHED).map_err(StoreError::io)?;
                let mut next_id = meta.get(NEXT_ID).map_err(StoreError::io)?.map_or(1, |v| v.value());
                for op in batch {
                    match op {
                        Op::Append(req, now_ms, tx) => {
                            let size = req.encode();
                            if depth >= limits.length_max {
                                let e = StoreError::Full(format!("{depth} requests waiting"));
                                replies.push(Reply::Append(tx, Err(e)));
                                continue;
                            }
                            if bytes + size.len() as u64 > limits.bytes_max {
                                let e = StoreError::Full(format!("{bytes} bytes waiting"));
                                replies.push(Reply::Append(tx, Err(e)));
                                continue;
                            }
                            let id = next_id;
                            next_id += 1;
                            let key = fresh_key(&keys)?;
                            keys.insert(key.0, id).map_err(StoreError::io)?;
                            key_of.insert(id, key.0).map_err(StoreError::io)?;
                            let st = Status::new(now_ms);
                            requests.insert(id, size.as_slice()).map_err(StoreError::io)?;
                            status.insert(id, st.encode().as_slice()).map_err(StoreError::io)?;
                            if limits.local_delivery {
                                due.insert((st.next_at_ms, id), ()).map_err(StoreError::io)?;
                            }
                            depth += 1;
                            bytes += size.len() as u64;
                            replies.push(Reply::Append(tx, Ok((id, key))));
                        }
                        Op::Update(id, new, tx) => {
                            let old = status.get(id).map_err(StoreError::io)?.and_then(|v| Status::decode(v.value()));
                            let Some(old) = old else {
                                replies.push(Reply::Unit(tx, Err(StoreError::Missing(id))));
                                continue;
                            };
                            if old.state == State::Queued {
                                if limits.local_delivery {
                                    due.remove((old.next_at_ms, id)).map_err(StoreError::io)?;
                                }
                                depth = depth.saturating_sub(1);
                            }
                            match new.state {
                                State::Queued => {
                                    if limits.local_delivery {
                                        due.insert((new.next_at_ms, id), ()).map_err(StoreError::io)?;
                                    }
                                    depth += 1;
                                }
                                State::Done | State::Failed => {
                                    if let Some(v) = requests.remove(id).map_err(StoreError::io)? {
                                        bytes = bytes.saturating_sub(v.value().len() as u64);
                                        if new.state == State::Failed {
                                            failed_req.insert(id, v.value()).map_err(StoreError::io)?;
                                        }
                                    }
                                    if new.state == State::Failed {
                                        failed_t.insert(id, ()).map_err(StoreError::io)?;
                                    }
                                    finished.insert((new.updated_ms, id), ()).map_err(StoreError::io)?;
                                }
                                State::Dead => {
                                    dead_t.insert(id, ()).map_err(StoreError::io)?;
                                    dead += 1;
                                }
                            }
                            status.insert(id, new.encode().as_slice()).map_err(StoreError::io)?;
                            replies.push(Reply::Unit(tx, Ok(())));
                        }
                        Op::Replay(id, now_ms, tx) => {
                            let old = status.get(id).map_err(StoreError::io)?.and_then(|v| Status::decode(v.value()));
                            match old {
                                None => replies.push(Reply::Unit(tx, Err(StoreError::Missing(id)))),
                                Some(s) if s.state != State::Dead && s.state != State::Failed => {
                                    replies.push(Reply::Unit(tx, Err(StoreError::NotDead(id))))
                                }
                                Some(s)
                                    if s.state == State::Failed
                                        && failed_req.get(id).map_err(StoreError::io)?.is_none() =>
                                {
                                    // Failed before failed requests were kept: nothing to send again.
                                    replies.push(Reply::Unit(tx, Err(StoreError::Missing(id))))
                                }
                                Some(mut s) => {
                                    if s.state == State::Failed {
                                        finished.remove((s.updated_ms, id)).map_err(StoreError::io)?;
                                        failed_t.remove(id).map_err(StoreError::io)?;
                                        let v =
                                            failed_req.remove(id).map_err(StoreError::io)?.map(|v| v.value().to_vec());
                                        if let Some(v) = v {
                                            bytes += v.len() as u64;
                                            requests.insert(id, v.as_slice()).map_err(StoreError::io)?;
                                        }
                                    } else {
                                        dead_t.remove(id).map_err(StoreError::io)?;
                                        dead = dead.saturating_sub(1);
                                    }
                                    s.replay(now_ms);
                                    if limits.local_delivery {
                                        due.insert((s.next_at_ms, id), ()).map_err(StoreError::io)?;
                                    }
                                    depth += 1;
                                    status.insert(id, s.encode().as_slice()).map_err(StoreError::io)?;
                                    replies.push(Reply::Unit(tx, Ok(())));
                                }
                            }
                        }
                        Op::Forget(id, tx) => {
                            let st = status.remove(id).map_err(StoreError::io)?.and_then(|v| Status::decode(v.value()));
                            if let Some(st) = st {
                                if st.state == State::Queued {
                                    if limits.local_delivery {
                                        due.remove((st.next_at_ms, id)).map_err(StoreError::io)?;
                                    }
                                    depth = depth.saturating_sub(1);
                                }
                            }
                            if let Some(v) = requests.remove(id).map_err(StoreError::io)? {
                                bytes = bytes.saturating_sub(v.value().len() as u64);
                            }
                            if let Some(k) = key_of.remove(id).map_err(StoreError::io)?.map(|v| v.value()) {
                                keys.remove(k).map_err(StoreError::io)?;
                            }
                            replies.push(Reply::Unit(tx, Ok(())));
                        }
                        Op::Purge(tx) => {
                            let ids: Vec<u64> = dead_t
                                .iter()
                                .map_err(StoreError::io)?
                                .filter_map(|e| e.ok().map(|(k, _)| k.value()))
                                .collect();
                            for id in &ids {
                                dead_t.remove(*id).map_err(StoreError::io)?;
                                status.remove(*id).map_err(StoreError::io)?;
                                if let Some(v) = requests.remove(*id).map_err(StoreError::io)? {
                                    bytes = bytes.saturating_sub(v.value().len() as u64);
                                }
                                if let Some(k) = key_of.remove(*id).map_err(StoreError::io)?.map(|v| v.value()) {
                                    keys.remove(k).map_err(StoreError::io)?;
                                }
                            }
                            dead = dead.saturating_sub(ids.len() as u64);
                            replies.push(Reply::Count(tx, Ok(ids.len() as u64)));
                        }
                    }
                }
                // Retention of finished statuses: past the count or the age, the oldest finished go.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let mut kept = finished.len().map_err(StoreError::io)?;
                let mut expired = Vec::new();
                for entry in finished.iter().map_err(StoreError::io)? {
                    let (k, _) = entry.map_err(StoreError::io)?;
                    let (at, id) = k.value();
                    if expired.len() >= PRUNE_BATCH
                        || (kept <= limits.finished_keep_max && at.saturating_add(limits.finished_keep_ms) > now)
                    {
                        break;
                    }
                    expired.push((at, id));
                    kept -= 1;
                }
                for (at, id) in expired {
                    finished.remove((at, id)).map_err(StoreError::io)?;
                    status.remove(id).map_err(StoreError::io)?;
                    failed_t.remove(id).map_err(StoreError::io)?;
                    failed_req.remove(id).map_err(StoreError::io)?;
                    if let Some(k) = key_of.remove(id).map_err(StoreError::io)?.map(|v| v.value()) {
                        keys.remove(k).map_err(StoreError::io)?;
                    }
                }
                meta.insert(NEXT_ID, next_id).map_err(StoreError::io)?;
                meta.insert(DEPTH, depth).map_err(StoreError::io)?;
                meta.insert(BYTES, bytes).map_err(StoreError::io)?;
            }
            w.commit().map_err(StoreError::io)
        })();
        match result {
            Ok(()) => {
                counts.depth.store(depth, Relaxed);
                counts.bytes.store(bytes, Relaxed);
                counts.dead.store(dead, Relaxed);
                counts.commits.fetch_add(1, Relaxed);
                counts.committed_ops.fetch_add(n, Relaxed);
                counts.batch_max_seen.fetch_max(n, Relaxed);
                for r in replies {
                    match r {
                        Reply::Append(tx, v) => drop(tx.send(v)),
                        Reply::Unit(tx, v) => drop(tx.send(v)),
                        Reply::Count(tx, v) => drop(tx.send(v)),
                    }
                }
            }
            Err(e) => {
                tracing::error!("queue store commit failed: {e}");
                // Nothing of the batch is on disk: every operation fails, so no 202 is given for it. The
                // operations whose replies were not queued yet are dropped with their senders (Closed).
                let msg = e.to_string();
                for r in replies {
                    match r {
                        Reply::Append(tx, _) => drop(tx.send(Err(StoreError::Io(msg.clone())))),
                        Reply::Unit(tx, _) => drop(tx.send(Err(StoreError::Io(msg.clone())))),
                        Reply::Count(tx, _) => drop(tx.send(Err(StoreError::Io(msg.clone())))),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Outcome, Policy};

    fn req(n: u32) -> QueuedRequest {
        QueuedRequest {
            method: "POST".into(),
            path: "/orders".into(),
            headers: vec![("content-type".into(), b"application/json".to_vec())],
            body: format!("{{\"n\":{n}}}").into_bytes(),
        }
    }

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("nonstop-queue-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const LIMITS: Limits = Limits {
        length_max: 1000,
        bytes_max: 1 << 20,
        batch_max: 256,
        local_delivery: true,
        finished_keep_max: 1000,
        finished_keep_ms: u64::MAX, // these tests' clocks start at 0
    };
    const P: Policy = Policy { attempts_max: 2, backoff_base_ms: 100, backoff_max_ms: 100 };

    #[tokio::test]
    async fn appends_are_group_committed_and_survive_a_reopen() {
        let d = dir("reopen");
        let path = d.join("q.redb");
        {
            let store = Arc::new(Store::open(&path, LIMITS).unwrap());
            let mut tasks = Vec::new();
            for n in 0..200 {
                let s = store.clone();
                tasks.push(tokio::spawn(async move { s.append(req(n), 1000).await.unwrap() }));
            }
            let mut ids = Vec::new();
            let mut keys = HashSet::new();
            for t in tasks {
                let (id, key) = t.await.unwrap();
                ids.push(id);
                keys.insert(key);
                assert_eq!(store.number(key).unwrap(), Some(id), "indexed by key");
                assert_eq!(store.key(id).unwrap(), Some(key));
            }
            ids.sort();
            assert_eq!(ids, (1..=200).collect::<Vec<u64>>());
            assert_eq!(keys.len(), 200, "every request has a key of its own");
            let c = &store.counts;
            assert!(c.commits.load(Relaxed) < 200, "several appends per commit");
            assert_eq!(c.depth.load(Relaxed), 200);
        }
        let store = Store::open(&path, LIMITS).unwrap();
        assert_eq!(store.counts.depth.load(Relaxed), 200, "counted again on open");
        let due = store.due(1000, 10, &HashSet::from([1])).unwrap();
        assert_eq!(due.iter().map(|d| d.0).collect::<Vec<_>>(), (2..=11).collect::<Vec<u64>>());
        assert_eq!(due[0].1, req(1));
        assert_eq!(store.append(req(0), 2000).await.unwrap().0, 201, "ids continue after a reopen");
        let _ = std::fs::remove_dir_all(d);
    }

    #[tokio::test]
    async fn delivery_updates_move_requests_through_their_states() {
        let d = dir("states");
        let store = Store::open(&d.join("q.redb"), LIMITS).unwrap();
        let a = store.append(req(1), 0).await.unwrap().0;
        let b = store.append(req(2), 0).await.unwrap().0;
        let mut sa = store.status(a).unwrap().unwrap();
        sa.after_delivery(Outcome::Answered { status: 201, body: b"ok".to_vec() }, 10, &P, 0.0);
        store.update(a, sa).await.unwrap();
        assert_eq!(store.status(a).unwrap().unwrap().state, State::Done);
        assert!(store.request(a).unwrap().is_none(), "a delivered request's body is dropped");
        let mut sb = store.status(b).unwrap().unwrap();
        sb.after_delivery(Outcome::Error("refused".into()), 10, &P, 0.0);
        store.update(b, sb.clone()).await.unwrap();
        assert!(store.due(10, 10, &HashSet::new()).unwrap().is_empty(), "not due before its back-off");
        assert_eq!(store.due(60, 10, &HashSet::new()).unwrap().len(), 1);
        sb.after_delivery(Outcome::Answered { status: 500, body: vec![] }, 70, &P, 0.0);
        store.update(b, sb).await.unwrap();
        assert_eq!(store.dead(10).unwrap().iter().map(|d| d.0).collect::<Vec<_>>(), [b]);
        assert_eq!(store.counts.depth.load(Relaxed), 0);
        assert!(matches!(store.replay(a, 80).await, Err(StoreError::NotDead(_))));
        store.replay(b, 80).await.unwrap();
        assert_eq!(store.due(80, 10, &HashSet::new()).unwrap()[0].0, b);
        assert!(store.dead(10).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(d);
    }

    fn epoch_ms() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
    }

    async fn finish(store: &Store, id: u64, status: u16, at: u64) {
        let mut s = store.status(id).unwrap().unwrap();
        s.after_delivery(Outcome::Answered { status, body: vec![] }, at, &P, 0.0);
        store.update(id, s).await.unwrap();
    }

    #[tokio::test]
    async fn finished_statuses_are_kept_within_a_count_and_an_age() {
        let d = dir("retention");
        let store = Store::open(&d.join("q.redb"), Limits { finished_keep_max: 2, ..LIMITS }).unwrap();
        let now = epoch_ms();
        let mut ids = Vec::new();
        for i in 0..5 {
            let (id, key) = store.append(req(i), now).await.unwrap();
            ids.push((id, key));
        }
        for (i, (id, _)) in ids.iter().take(4).enumerate() {
            finish(&store, *id, if i % 2 == 0 { 200 } else { 404 }, now + i as u64).await;
        }
        assert_eq!(store.finished().unwrap(), 2, "only the newest two finished statuses are kept");
        for (id, key) in &ids[..2] {
            assert!(store.status(*id).unwrap().is_none(), "request {id} finished first and is gone");
            assert!(store.number(*key).unwrap().is_none(), "its key goes with it");
        }
        for (id, _) in &ids[2..] {
            assert!(store.status(*id).unwrap().is_some());
        }
        assert_eq!(store.failed(10).unwrap().iter().map(|f| f.0).collect::<Vec<_>>(), [ids[3].0]);
        assert_eq!(store.status(ids[4].0).unwrap().unwrap().state, State::Queued, "queued ones are never pruned");
        drop(store);

        // By age: a status that finished longer ago than finished_keep_ms goes at the next commit.
        let store =
            Store::open(&d.join("q.redb"), Limits { finished_keep_max: 1000, finished_keep_ms: 60_000, ..LIMITS })
                .unwrap();
        let old = store.append(req(9), now).await.unwrap().0;
        finish(&store, old, 200, now - 120_000).await;
        assert!(store.status(old).unwrap().is_none(), "finished two minutes ago, kept one");
        assert!(store.status(ids[3].0).unwrap().is_some(), "finished just now");
        assert_eq!(store.status(ids[4].0).unwrap().unwrap().state, State::Queued);
        let _ = std::fs::remove_dir_all(d);
    }

    #[tokio::test]
    async fn failed_requests_are_listed_and_replayed_like_dead_ones() {
        let d = dir("failed");
        let store = Store::open(&d.join("q.redb"), LIMITS).unwrap();
        let a = store.append(req(1), 0).await.unwrap().0;
        let size = store.counts.bytes.load(Relaxed);
        finish(&store, a, 422, 10).await;
        assert_eq!(store.status(a).unwrap().unwrap().state, State::Failed);
        assert_eq!(store.failed(10).unwrap().iter().map(|f| f.0).collect::<Vec<_>>(), [a]);
        assert_eq!(store.request(a).unwrap(), Some(req(1)), "a failed request is kept, to be sent again");
        assert_eq!(store.counts.bytes.load(Relaxed), 0, "it is not waiting, so it does not fill the queue");
        store.replay(a, 20).await.unwrap();
        assert!(store.failed(10).unwrap().is_empty());
        assert_eq!(store.finished().unwrap(), 0);
        let due = store.due(20, 10, &HashSet::new()).unwrap();
        assert_eq!((due[0].0, &due[0].1, due[0].2.attempts), (a, &req(1), 0));
        assert_eq!((store.counts.depth.load(Relaxed), store.counts.bytes.load(Relaxed)), (1, size));
        // Done is not replayable.
        finish(&store, a, 200, 30).await;
        assert!(matches!(store.replay(a, 40).await, Err(StoreError::NotDead(_))));
        let _ = std::fs::remove_dir_all(d);
    }

    #[tokio::test]
    async fn opening_reads_the_kept_counts_instead_of_scanning_the_history() {
        let d = dir("counts");
        let path = d.join("q.redb");
        let store = Store::open(&path, LIMITS).unwrap();
        for i in 0..3 {
            store.append(req(i), 0).await.unwrap();
        }
        let bytes = store.counts.bytes.load(Relaxed);
        drop(store);
        let store = Store::open(&path, LIMITS).unwrap();
        assert_eq!((store.counts.depth.load(Relaxed), store.counts.bytes.load(Relaxed)), (3, bytes));
        drop(store);
        // The counts come from the meta table, not from a walk over the statuses: set them apart, and see them.
        {
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(META).unwrap().insert(DEPTH, 41u64).unwrap();
            w.commit().unwrap();
        }
        let store = Store::open(&path, LIMITS).unwrap();
        assert_eq!(store.counts.depth.load(Relaxed), 41);
        let _ = std::fs::remove_dir_all(d);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_appends() {
        let d = dir("full");
        let store = Store::open(&d.join("q.redb"), Limits { length_max: 2, ..LIMITS }).unwrap();
        store.append(req(1), 0).await.unwrap();
        store.append(req(2), 0).await.unwrap();
        assert!(matches!(store.append(req(3), 0).await, Err(StoreError::Full(_))));
        let small = Store::open(&d.join("b.redb"), Limits { bytes_max: 10, ..LIMITS }).unwrap();
        assert!(matches!(small.append(req(1), 0).await, Err(StoreError::Full(_))));
        let _ = std::fs::remove_dir_all(d);
    }

    #[tokio::test]
    async fn keys_are_new_after_the_store_is_wiped_and_go_with_their_request() {
        let d = dir("wiped");
        let path = d.join("q.redb");
        let (first, first_key) = Store::open(&path, LIMITS).unwrap().append(req(1), 0).await.unwrap();
        std::fs::remove_dir_all(&d).unwrap();
        let store = Store::open(&path, LIMITS).unwrap();
        let (again, key) = store.append(req(1), 0).await.unwrap();
        assert_eq!(again, first, "numbers start over in a wiped store");
        assert_ne!(key, first_key, "keys do not");
        assert_eq!(store.number(first_key).unwrap(), None);
        store.forget(again).await.unwrap();
        assert_eq!((store.number(key).unwrap(), store.key(again).unwrap()), (None, None), "forgotten with it");
        let _ = std::fs::remove_dir_all(d);
    }

    #[tokio::test]
    async fn the_store_is_private_to_its_owner() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("modes");
        let path = d.join("q.redb");
        drop(Store::open(&path, LIMITS).unwrap());
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&d), mode(&path)), (0o700, 0o600));
        // A store left readable by an older version is restricted when it is opened.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(Store::open(&path, LIMITS).unwrap());
        assert_eq!((mode(&d), mode(&path)), (0o700, 0o600));
        let _ = std::fs::remove_dir_all(d);
    }
}
