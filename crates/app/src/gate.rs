//! The Tomcat-style overload model: at most `workers` requests run, up to `accept_queue` more wait, the rest are refused.
//!
//! The decision of what happens to an arriving request is a pure function of the occupancy counters
//! ([`GateState::arrive`]), unit-tested without sockets. The async shell ([`Gate`]) pairs it with a fair (FIFO)
//! semaphore for the workers and a timeout for the waiters.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What happens to a request that arrives at the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// A worker is free: the request runs now.
    Run,
    /// All workers are busy but the accept queue has room: the request waits for a worker.
    Wait,
    /// Workers and accept queue are all full: refuse at once (Tomcat's "connection refused" past acceptCount).
    Refuse,
}

/// Occupancy of the gate: the pure decision core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateState {
    pub workers: usize,
    pub accept_queue: usize,
    /// Requests admitted (running or waiting).
    pub occupied: usize,
}

impl GateState {
    /// Decides the fate of one arriving request and, unless refused, counts it in.
    pub fn arrive(&mut self) -> Arrival {
        if self.occupied >= self.workers + self.accept_queue {
            Arrival::Refuse
        } else {
            self.occupied += 1;
            if self.occupied <= self.workers {
                Arrival::Run
            } else {
                Arrival::Wait
            }
        }
    }

    /// One admitted request left (finished, or gave up waiting).
    pub fn leave(&mut self) {
        debug_assert!(self.occupied > 0, "leave without arrive");
        self.occupied = self.occupied.saturating_sub(1);
    }
}

/// Why a request was not given a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Workers and queue full on arrival.
    QueueFull,
    /// Waited longer than the queue timeout.
    QueueTimeout,
}

/// The async gate shared by all connections.
pub struct Gate {
    state: std::sync::Mutex<GateState>,
    workers: Arc<Semaphore>,
    queue_timeout: Duration,
}

/// Held while a request owns a worker; frees the worker and the slot on drop.
pub struct Ticket<'a> {
    gate: &'a Gate,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.gate.state.lock().expect("gate lock").leave();
    }
}

impl Gate {
    pub fn new(workers: usize, accept_queue: usize, queue_timeout: Duration) -> Gate {
        Gate {
            state: std::sync::Mutex::new(GateState { workers, accept_queue, occupied: 0 }),
            workers: Arc::new(Semaphore::new(workers)),
            queue_timeout,
        }
    }

    /// Admits a request to a worker, makes it wait in the accept queue, or rejects it.
    pub async fn enter(&self) -> Result<Ticket<'_>, Rejection> {
        let arrival = self.state.lock().expect("gate lock").arrive();
        if arrival == Arrival::Refuse {
            return Err(Rejection::QueueFull);
        }
        // The semaphore is fair, so waiters are served in arrival order. A `Run` arrival can still find
        // the semaphore momentarily taken by a waiter that was counted before it; it then waits too.
        let acquired = tokio::time::timeout(self.queue_timeout, self.workers.clone().acquire_owned()).await;
        match acquired {
            Ok(Ok(permit)) => Ok(Ticket { gate: self, _permit: permit }),
            _ => {
                self.state.lock().expect("gate lock").leave();
                Err(Rejection::QueueTimeout)
            }
        }
    }

    /// Requests running on a worker now, and requests waiting in the accept queue now.
    pub fn occupancy(&self) -> (usize, usize) {
        let state = *self.state.lock().expect("gate lock");
        let running = state.workers - self.workers.available_permits();
        (running, state.occupied.saturating_sub(running))
    }

    pub fn queue_timeout(&self) -> Duration {
        self.queue_timeout
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_then_waits_then_refuses() {
        let mut g = GateState { workers: 2, accept_queue: 2, occupied: 0 };
        let got: Vec<Arrival> = (0..6).map(|_| g.arrive()).collect();
        assert_eq!(got, [Arrival::Run, Arrival::Run, Arrival::Wait, Arrival::Wait, Arrival::Refuse, Arrival::Refuse]);
        g.leave();
        assert_eq!(g.arrive(), Arrival::Wait);
        assert_eq!(g.arrive(), Arrival::Refuse);
    }

    #[test]
    fn zero_queue_refuses_past_workers() {
        let mut g = GateState { workers: 1, accept_queue: 0, occupied: 0 };
        assert_eq!(g.arrive(), Arrival::Run);
        assert_eq!(g.arrive(), Arrival::Refuse);
        g.leave();
        assert_eq!(g.arrive(), Arrival::Run);
    }

    #[tokio::test(start_paused = true)]
    async fn waiter_times_out_and_frees_its_slot() {
        let gate = Gate::new(1, 1, Duration::from_millis(100));
        let held = gate.enter().await.expect("first runs");
        assert_eq!(gate.enter().await.err(), Some(Rejection::QueueTimeout));
        // The timed-out waiter left, so the queue slot is free again; the worker is still held.
        let waiter = gate.enter();
        drop(held);
        assert!(waiter.await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn full_gate_refuses_immediately() {
        let gate = Gate::new(1, 0, Duration::from_secs(30));
        let _held = gate.enter().await.expect("first runs");
        assert_eq!(gate.enter().await.err(), Some(Rejection::QueueFull));
        assert_eq!(gate.occupancy(), (1, 0));
    }
}
