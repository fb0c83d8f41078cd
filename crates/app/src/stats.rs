//! Counters of every request outcome, exposed at `GET /stats`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

#[derive(Default)]
pub struct Stats {
    /// Requests that got a worker (ran).
    pub ran: AtomicU64,
    /// Requests refused at once because workers and accept queue were full.
    pub rejected_queue_full: AtomicU64,
    /// Requests that waited past the queue timeout.
    pub rejected_queue_timeout: AtomicU64,
    /// Requests answered 500 by `--fail-rate`.
    pub injected_failures: AtomicU64,
    /// Orders written (new rows).
    pub orders_created: AtomicU64,
    /// Idempotent repeats answered from the first response.
    pub orders_replayed: AtomicU64,
    by_status: Mutex<BTreeMap<u16, u64>>,
}

impl Stats {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn record_status(&self, status: u16) {
        *self.by_status.lock().expect("stats lock").entry(status).or_default() += 1;
    }

    pub fn to_json(&self) -> serde_json::Value {
        let statuses: serde_json::Map<String, serde_json::Value> =
            self.by_status.lock().expect("stats lock").iter().map(|(s, n)| (s.to_string(), (*n).into())).collect();
        serde_json::json!({
            "ran": self.ran.load(Relaxed),
            "rejected_queue_full": self.rejected_queue_full.load(Relaxed),
            "rejected_queue_timeout": self.rejected_queue_timeout.load(Relaxed),
            "injected_failures": self.injected_failures.load(Relaxed),
            "orders_created": self.orders_created.load(Relaxed),
            "orders_replayed": self.orders_replayed.load(Relaxed),
            "status": statuses,
        })
    }
}
