//! Deadlines for the client connections hyper serves (HTTP/2, TLS, and the HTTP/1.1 cases handed to it): a
//! connection with no request in progress (before its first request, between requests, or holding a request head
//! that never completes, such as HEADERS without END_HEADERS) is closed once it has sat idle for the limit, so
//! idle or stalled connections cannot hold `max_connections` slots for as long as their clients like.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a connection told to shut down (GOAWAY, or close after the current response) may take to end by
/// itself before it is dropped.
const GRACE: Duration = Duration::from_secs(1);

/// The requests in progress on one connection (response bodies included), and since when it has had none.
pub struct Activity {
    start: Instant,
    open: AtomicUsize,
    /// Milliseconds after `start` at which the last request in progress ended.
    idle_since_ms: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity { start: Instant::now(), open: AtomicUsize::new(0), idle_since_ms: AtomicU64::new(0) })
    }

    /// Counts a request in progress until the returned guard drops (with its response body).
    pub fn enter(self: &Arc<Activity>) -> Open {
        self.open.fetch_add(1, Ordering::Relaxed);
        Open(self.clone())
    }

    /// When the connection will have been idle for `limit`, or `None` while a request is in progress.
    fn idle_deadline(&self, limit: Duration) -> Option<Instant> {
        if self.open.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.start + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed)) + limit)
    }
}

/// A request in progress on its connection.
pub struct Open(Arc<Activity>);

impl Drop for Open {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since_ms.store(a.start.elapsed().as_millis() as u64, Ordering::Relaxed);
        a.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted as in progress until it is sent or dropped.
pub struct Watched<B> {
    pub body: B,
    pub _open: Open,
}

impl<B: Body + Unpin> Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Why [`drive`] ended the connection.
#[derive(Debug)]
pub enum End<E> {
    /// The connection ended by itself.
    Done(Result<(), E>),
    /// It sat idle past the limit.
    Idle,
    /// The proxy shut down.
    Shutdown,
}

/// Serves `conn` until it ends, until it has had no request in progress for `idle_max`, or until the proxy shuts
/// down; in the last two cases it is told to shut down gracefully and then given [`GRACE`] before it is dropped.
pub async fn drive<C: GracefulConnection>(
    conn: C,
    activity: &Activity,
    idle_max: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> End<C::Error> {
    tokio::pin!(conn);
    let why = loop {
        let deadline = activity.idle_deadline(idle_max).unwrap_or_else(|| Instant::now() + idle_max);
        tokio::select! {
            done = conn.as_mut() => return End::Done(done),
            _ = tokio::time::sleep_until(deadline) => {
                if activity.idle_deadline(idle_max).is_some_and(|d| d <= Instant::now()) {
                    break End::Idle;
                }
            }
            _ = shutdown.wait_for(|&s| s) => break End::Shutdown,
        }
    };
    conn.as_mut().graceful_shutdown();
    match why {
        // In-flight requests finish; the listener's drain timeout bounds the wait.
        End::Shutdown => {
            let _ = conn.as_mut().await;
        }
        // A client that ignores GOAWAY (or never finishes its head) is cut after a moment.
        _ => {
            let _ = tokio::time::timeout(GRACE, conn.as_mut()).await;
        }
    }
    why
}
