//! A small bounded pool of database connections, shared by the SQLite and PostgreSQL backends.
//!
//! At most `size` connections exist; a caller waits (fairly) for a slot. Connections are made lazily by the
//! backend, and a broken one is simply not returned, so the next caller makes a fresh one.

use std::sync::Mutex;

use tokio::sync::{Semaphore, SemaphorePermit};

pub struct Pool<T> {
    idle: Mutex<Vec<T>>,
    slots: Semaphore,
}

/// The right to use one connection: an idle one if there was one, else the caller makes one.
pub struct Slot<'a, T> {
    pool: &'a Pool<T>,
    _permit: SemaphorePermit<'a>,
    pub conn: Option<T>,
}

impl<T> Pool<T> {
    pub fn new(size: usize) -> Pool<T> {
        Pool { idle: Mutex::new(Vec::with_capacity(size)), slots: Semaphore::new(size.max(1)) }
    }

    pub async fn slot(&self) -> Slot<'_, T> {
        let permit = self.slots.acquire().await.expect("pool semaphore is never closed");
        let conn = self.idle.lock().expect("pool lock").pop();
        Slot { pool: self, _permit: permit, conn }
    }
}

impl<T> Slot<'_, T> {
    /// Returns a healthy connection to the pool. A connection that is not given back is dropped.
    pub fn give_back(self, conn: T) {
        self.pool.idle.lock().expect("pool lock").push(conn);
    }
}
