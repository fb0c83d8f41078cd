//! One upstream server: its live counters, its latency estimate, and its own pool of connections built on
//! `hyper::client::conn`, so the proxy always knows whether a request was written.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use http::{Request, Response};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::ewma::PeakEwma;
use crate::h1down::ClientBody;
use crate::h1up::{self, ExchangeError, RawBody, RawConn};
use crate::metrics::Stats;
use crate::pool::Pool;
use nonstop_limit::{Limiter, Outcome as LimitOutcome, Settings as LimitSettings, View as LimitView};
use tokio_util::sync::CancellationToken;

/// The body the proxy sends upstream: kept in memory (so that it can be sent again on a retry), or the client's
/// body streamed with the route's size limit.
pub enum ReqBody {
    Full(Option<Bytes>),
    Stream(Limited<ClientBody>),
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ReqBody::Full(data) => Poll::Ready(data.take().filter(|d| !d.is_empty()).map(|d| Ok(Frame::data(d)))),
            ReqBody::Stream(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Full(data) => data.as_ref().is_none_or(Bytes::is_empty),
            ReqBody::Stream(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Full(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            ReqBody::Stream(b) => b.size_hint(),
        }
    }
}

/// A request as it goes to a server: the rewritten head, and the headers the proxy adds after the head's own.
#[derive(Clone, Copy)]
pub struct Outgoing<'a> {
    pub head: &'a http::request::Parts,
    pub added: &'a [(http::HeaderName, http::HeaderValue)],
}

/// How to talk to one server.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub idle_max: usize,
    pub h2: bool,
}

thread_local! {
    /// The worker thread this code runs on: pooled connections are reused only on the thread whose runtime
    /// registered their socket.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the current thread as worker `index` (called once per worker thread).
pub fn set_worker(index: usize) {
    WORKER.with(|w| w.set(index));
}

fn worker() -> usize {
    WORKER.with(Cell::get)
}

/// A connection to send on, checked out of a server's pool (or new).
pub enum Sender {
    /// The proxy's own HTTP/1.1 client.
    Raw(RawConn),
    /// hyper's HTTP/1.1 client with a connection task, for exchanges that may be upgraded.
    Upgradable(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

struct Idle {
    conn: RawConn,
    since: Instant,
    worker: usize,
}

/// A pooled connection idle at least this long is probed (one non-blocking read) before reuse.
const PROBE_AFTER_IDLE: Duration = Duration::from_millis(50);

/// A server's response body: from the proxy's own client, or from hyper's.
pub enum UpBody {
    Raw(RawBody),
    Hyper(Incoming),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpBody::Raw(b) => Pin::new(b).poll_frame(cx).map(|o| o.map(|r| r.map_err(Into::into))),
            UpBody::Hyper(b) => Pin::new(b).poll_frame(cx).map(|o| o.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Raw(b) => b.is_end_stream(),
            UpBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Raw(b) => b.size_hint(),
            UpBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// A server of a service, shared by every worker thread and kept across reloads while its address stays.
pub struct Server {
    pub addr: SocketAddr,
    weight: AtomicU32,
    in_flight: AtomicU32,
    draining: AtomicBool,
    /// The service pool this server belongs to: told when a slot frees.
    owner: Weak<Pool>,
    /// Set while the server's health wants to hear of successes too (see [`Pool::report`]).
    wants_report: AtomicBool,
    /// Cancelled at the drain deadline: long-lived responses and upgraded connections end.
    cutoff: Mutex<CancellationToken>,
    ewma: Mutex<PeakEwma>,
    pool: Mutex<Vec<Idle>>,
    /// The shared HTTP/2 connection; the async lock makes concurrent first requests wait for one connect.
    h2: tokio::sync::Mutex<Option<http2::SendRequest<ReqBody>>>,
    pub connects: AtomicU64,
    /// Requests by the status the client got, when this server answered last.
    pub stats: Stats,
    /// Every try sent to this server, retried ones included, by the server's status (or 502/504 for a failed
    /// exchange): what deploy analysis judges a version by. Kept for the servers of app services only.
    pub tries: Stats,
    /// The server's part in a deploy ([`Role`] as a number).
    role: std::sync::atomic::AtomicU8,
    /// Put on trial by a deploy that has not succeeded (see [`Server::on_trial`]).
    suspect: AtomicBool,
    /// Requests sent (or about to be) that have no response head yet: what the adaptive limit bounds.
    pending: AtomicU32,
    /// The adaptive concurrency limit, fed one sample per answer.
    limiter: Mutex<Limiter>,
    /// The limiter's current limit, readable without its lock.
    limit: AtomicU32,
}

pub use nonstop_deploy::Role;

/// Initial latency estimate for a server with no samples yet.
const INITIAL_LATENCY: Duration = Duration::from_millis(1);

impl Server {
    pub fn new(addr: SocketAddr, weight: u32, pool: Weak<Pool>) -> Arc<Server> {
        Arc::new(Server {
            addr,
            weight: AtomicU32::new(weight),
            in_flight: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            owner: pool,
            wants_report: AtomicBool::new(false),
            cutoff: Mutex::new(CancellationToken::new()),
            ewma: Mutex::new(PeakEwma::new(Instant::now(), INITIAL_LATENCY)),
            pool: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
            connects: AtomicU64::new(0),
            stats: Stats::default(),
            tries: Stats::default(),
            role: std::sync::atomic::AtomicU8::new(0),
            suspect: AtomicBool::new(false),
            pending: AtomicU32::new(0),
            limiter: Mutex::new(Limiter::new(LimitSettings::default(), Instant::now())),
            limit: AtomicU32::new(LimitSettings::default().ceiling),
        })
    }

    /// Requests out to this server with no response head yet.
    pub fn pending(&self) -> u32 {
        self.pending.load(Relaxed)
    }

    /// The concurrency limit in force: the learned one once the server showed overload, else the ceiling (see
    /// `nonstop-limit`).
    pub fn limit(&self) -> u32 {
        self.limit.load(Relaxed)
    }

    pub fn limit_view(&self) -> LimitView {
        self.limiter.lock().expect("limiter lock").view()
    }

    /// The user's `server_in_flight_max`: the adaptive limit never passes it.
    pub(crate) fn set_limit_ceiling(&self, ceiling: u32) {
        let mut l = self.limiter.lock().expect("limiter lock");
        l.set_ceiling(ceiling, Instant::now());
        self.limit.store(l.effective(), Relaxed);
    }

    /// One answer (or failure) of a try on this server, for the adaptive limit.
    fn limit_sample(&self, now: Instant, latency: Duration, outcome: LimitOutcome) {
        let mut l = self.limiter.lock().expect("limiter lock");
        l.on_answer(now, latency, self.pending.load(Relaxed), outcome);
        self.limit.store(l.effective(), Relaxed);
    }

    /// Periodic stall check of the adaptive limit.
    pub(crate) fn limit_tick(&self, now: Instant) {
        let mut l = self.limiter.lock().expect("limiter lock");
        l.on_tick(now, self.pending.load(Relaxed));
        self.limit.store(l.effective(), Relaxed);
    }

    pub fn role(&self) -> Role {
        match self.role.load(Relaxed) {
            1 => Role::Trial,
            2 => Role::Standby,
            3 => Role::Draining,
            _ => Role::Serving,
        }
    }

    /// Sets the deploy role (the pool sets the drain flag to match).
    pub(crate) fn set_role(&self, r: Role) {
        // A server put on trial stays suspect while it drains after a failed deploy; only serving clears it.
        match r {
            Role::Trial => self.suspect.store(true, Relaxed),
            Role::Serving => self.suspect.store(false, Relaxed),
            Role::Standby | Role::Draining => {}
        }
        let n = match r {
            Role::Serving => 0,
            Role::Trial => 1,
            Role::Standby => 2,
            Role::Draining => 3,
        };
        self.role.store(n, Relaxed);
    }

    /// On trial in a deploy, or draining after one failed: its 5xx answers are retried elsewhere (an answer that
    /// arrives just after the rollback still comes from the bad version).
    pub fn on_trial(&self) -> bool {
        self.suspect.load(Relaxed)
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    pub fn set_weight(&self, w: u32) {
        self.weight.store(w, Relaxed);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Relaxed)
    }

    /// Starts or ends a drain. A drain cuts long-lived requests off at `deadline` (if it is still on by then).
    pub fn set_draining(self: &Arc<Server>, on: bool, deadline: Duration) {
        self.mark_draining(on, deadline);
        if let Some(pool) = self.owner.upgrade() {
            pool.changed();
        }
    }

    /// [`Server::set_draining`] without telling the pool (for the pool itself, under its lock).
    pub(crate) fn mark_draining(self: &Arc<Server>, on: bool, deadline: Duration) {
        let was = self.draining.swap(on, Relaxed);
        if on && !was {
            let token = self.cutoff.lock().expect("cutoff lock").clone();
            let server = self.clone();
            std::thread::Builder::new()
                .name("drain-deadline".into())
                .spawn(move || {
                    std::thread::sleep(deadline);
                    if server.draining() {
                        token.cancel();
                    }
                })
                .ok();
        }
        if !on {
            let mut cutoff = self.cutoff.lock().expect("cutoff lock");
            if cutoff.is_cancelled() {
                *cutoff = CancellationToken::new();
            }
        }
    }

    /// Cancelled when a drain reaches its deadline.
    pub fn cutoff(&self) -> CancellationToken {
        self.cutoff.lock().expect("cutoff lock").clone()
    }

    pub fn wants_report(&self) -> bool {
        self.wants_report.load(Relaxed)
    }

    pub fn set_wants_report(&self, on: bool) {
        self.wants_report.store(on, Relaxed);
    }

    pub fn latency_ns(&self) -> f64 {
        self.ewma.lock().expect("ewma lock").estimate_ns()
    }

    /// Plain mean latency (for queue-wait estimates), nanoseconds.
    pub fn mean_latency_ns(&self) -> f64 {
        self.ewma.lock().expect("ewma lock").mean_ns()
    }

    pub fn observe_latency(&self, now: Instant, rtt: Duration) {
        self.ewma.lock().expect("ewma lock").observe(now, rtt);
    }

    pub fn pool_idle(&self) -> usize {
        self.pool.lock().expect("pool lock").len()
    }

    /// Counts a request as in flight on this server until the guard drops.
    pub fn begin(self: &Arc<Server>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        self.pending.fetch_add(1, Relaxed);
        InFlight { server: self.clone(), pending: true, quiet: false }
    }

    /// Sends one request on a connection from [`Server::checkout`] and waits for the response head. On the proxy's
    /// own client the response body gives the connection back to the pool when read to the end.
    pub async fn send(
        self: &Arc<Server>,
        sender: Sender,
        request: Outgoing<'_>,
        body: ReqBody,
        settings: &ConnSettings,
        response_timeout: Duration,
        timer: Pin<&mut tokio::time::Sleep>,
    ) -> Result<Response<UpBody>, ProxyError> {
        let Outgoing { head, added } = request;
        let addr = self.addr;
        let request = |body: ReqBody| {
            let mut r = Request::new(body);
            *r.method_mut() = head.method.clone();
            *r.uri_mut() = head.uri.clone();
            *r.version_mut() = head.version;
            let mut headers = head.headers.clone();
            for (name, value) in added {
                headers.append(name.clone(), value.clone());
            }
            *r.headers_mut() = headers;
            r
        };
        match sender {
            Sender::Raw(conn) => {
                let path = head.uri.path_and_query().map_or("/", |p| p.as_str());
                let server = self.clone();
                let idle_max = settings.idle_max;
                let give_back = Box::new(move |conn: RawConn| server.checkin(conn, idle_max));
                // Pinned where it is built, and polled by hand: `select!` would keep a second copy of it.
                let mut exchange =
                    std::pin::pin!(h1up::exchange(conn, &head.method, path, &head.headers, added, body, give_back));
                // The caller's timer is reused: moving a registered timer's deadline later costs next to nothing,
                // where a new timer per try is registered with the runtime and removed again.
                let mut timer = timer;
                timer.as_mut().reset(tokio::time::Instant::now() + response_timeout);
                let result = std::future::poll_fn(|cx| {
                    if let Poll::Ready(r) = exchange.as_mut().poll(cx) {
                        return Poll::Ready(Ok(r));
                    }
                    timer.as_mut().poll(cx).map(Err)
                })
                .await;
                match result {
                    Ok(Ok(resp)) => Ok(resp.map(UpBody::Raw)),
                    Ok(Err(ExchangeError::Unsent(source))) => {
                        Err(ProxyError::UpstreamIo { addr, sent: false, stale: false, dropped: false, source })
                    }
                    Ok(Err(ExchangeError::Failed(source))) => {
                        Err(ProxyError::UpstreamIo { addr, sent: true, stale: false, dropped: false, source })
                    }
                    Ok(Err(ExchangeError::Stale(source))) => {
                        Err(ProxyError::UpstreamIo { addr, sent: true, stale: true, dropped: false, source })
                    }
                    Ok(Err(ExchangeError::Dropped(source))) => {
                        Err(ProxyError::UpstreamIo { addr, sent: true, stale: false, dropped: true, source })
                    }
                    Ok(Err(ExchangeError::BodyTooLarge)) => Err(ProxyError::BodyTooLarge(0)),
                    Ok(Err(ExchangeError::ClientBody(e))) => Err(ProxyError::ClientBody(e)),
                    Err(_) => Err(ProxyError::ResponseTimeout { addr, ms: response_timeout.as_millis() }),
                }
            }
            Sender::Upgradable(mut s) => {
                let req = request(body);
                // hyper's futures are large: boxed, they stay out of the proxy's own client's path.
                let result =
                    Box::pin(timed(addr, response_timeout, async { s.try_send_request(req).await.map_err(unsent) }))
                        .await;
                match result {
                    Ok(resp) => Ok(resp.map(UpBody::Hyper)),
                    Err(Ok((sent, source))) => Err(ProxyError::Upstream { addr, sent, source }),
                    Err(Err(e)) => Err(e),
                }
            }
            Sender::H2(mut s) => {
                let req = request(body);
                let result =
                    Box::pin(timed(addr, response_timeout, async { s.try_send_request(req).await.map_err(unsent) }))
                        .await;
                match result {
                    Ok(resp) => Ok(resp.map(UpBody::Hyper)),
                    Err(Ok((sent, source))) => {
                        // REFUSED_STREAM (and GOAWAY past this stream) mean the server did not process it.
                        let refused = !sent || h2_refused(&source);
                        if source.is_closed() || refused {
                            *self.h2.lock().await = None;
                        }
                        Err(ProxyError::Upstream { addr, sent: !refused, source })
                    }
                    Err(Err(e)) => Err(e),
                }
            }
        }
    }

    /// A connection to this server: pooled, or new. `upgrade` asks for one that can be taken over after a 101.
    pub async fn checkout(&self, settings: &ConnSettings, upgrade: bool) -> Result<Sender, ProxyError> {
        if !settings.h2 && !upgrade {
            if let Some(conn) = self.pooled(settings) {
                return Ok(Sender::Raw(conn));
            }
        }
        // Connecting awaits far larger futures than the pooled path: boxed, they stay out of every request's.
        Box::pin(self.connect(settings, upgrade)).await
    }

    /// A pooled HTTP/1.1 connection of this worker thread, still fit to use.
    fn pooled(&self, settings: &ConnSettings) -> Option<RawConn> {
        let me = worker();
        loop {
            let idle = {
                let mut pool = self.pool.lock().expect("pool lock");
                pool.iter().rposition(|i| i.worker == me).map(|at| pool.swap_remove(at))
            };
            let idle = idle?;
            let idle_for = idle.since.elapsed();
            if idle_for >= settings.idle_timeout {
                continue;
            }
            // Readable while idle means the server closed it (or sent something unasked): not reusable. A
            // connection reused at once is not probed (a system call per request); if its server died just then,
            // the exchange fails as "stale" and a safe request is retried for free.
            if idle_for >= PROBE_AFTER_IDLE {
                let mut probe = [0u8; 1];
                match idle.conn.stream.try_read(&mut probe) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    _ => continue,
                }
            }
            return Some(idle.conn);
        }
    }

    /// A new connection (or the shared HTTP/2 one).
    async fn connect(&self, settings: &ConnSettings, upgrade: bool) -> Result<Sender, ProxyError> {
        if settings.h2 && !upgrade {
            let mut shared = self.h2.lock().await;
            if let Some(s) = shared.as_ref() {
                if !s.is_closed() {
                    let mut s = s.clone();
                    drop(shared);
                    s.ready().await.map_err(|source| ProxyError::Handshake { addr: self.addr, source })?;
                    return Ok(Sender::H2(s));
                }
            }
            let s = self.connect_h2(settings).await?;
            *shared = Some(s.clone());
            return Ok(Sender::H2(s));
        }
        if upgrade {
            return Ok(Sender::Upgradable(self.connect_upgradable(settings).await?));
        }
        Ok(Sender::Raw(RawConn::new(self.tcp(settings).await?)))
    }

    async fn tcp(&self, settings: &ConnSettings) -> Result<TcpStream, ProxyError> {
        let addr = self.addr;
        let stream = match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(ProxyError::Connect { addr, source }),
            Err(_) => return Err(ProxyError::ConnectTimeout { addr, ms: settings.connect_timeout.as_millis() }),
        };
        let _ = stream.set_nodelay(true);
        self.connects.fetch_add(1, Relaxed);
        Ok(stream)
    }

    async fn connect_upgradable(&self, settings: &ConnSettings) -> Result<http1::SendRequest<ReqBody>, ProxyError> {
        let stream = self.tcp(settings).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ProxyError::Handshake { addr: self.addr, source })?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        Ok(sender)
    }

    async fn connect_h2(&self, settings: &ConnSettings) -> Result<http2::SendRequest<ReqBody>, ProxyError> {
        let stream = self.tcp(settings).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ProxyError::Handshake { addr: self.addr, source })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    fn checkin(&self, mut conn: RawConn, idle_max: usize) {
        conn.reused = conn.reused.saturating_add(1);
        let mut pool = self.pool.lock().expect("pool lock");
        if pool.len() < idle_max {
            pool.push(Idle { conn, since: Instant::now(), worker: worker() });
        }
    }

    /// Closes every idle connection (on removal from the pool, or on shutdown).
    pub fn close_idle(&self) {
        self.pool.lock().expect("pool lock").clear();
        if let Ok(mut h2) = self.h2.try_lock() {
            *h2 = None;
        }
    }
}

/// Whether hyper handed the request back unwritten, with its error.
fn unsent(mut e: hyper::client::conn::TrySendError<Request<ReqBody>>) -> SendFailure {
    let sent = e.take_message().is_none();
    Ok((sent, e.into_error()))
}

/// A send failure: `Ok((sent, error))` from hyper, or `Err` for the proxy's own timeout.
type SendFailure = Result<(bool, hyper::Error), ProxyError>;

async fn timed<T>(
    addr: SocketAddr,
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, SendFailure>>,
) -> Result<T, SendFailure> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => Err(Err(ProxyError::ResponseTimeout { addr, ms: limit.as_millis() })),
    }
}

fn h2_refused(e: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if let Some(h2e) = c.downcast_ref::<h2::Error>() {
            return h2e.reason() == Some(h2::Reason::REFUSED_STREAM) || (h2e.is_go_away() && h2e.is_remote());
        }
        cause = c.source();
    }
    false
}

/// A request's slot on a server: the server's in-flight count, decremented on drop, which also lets a request
/// waiting in the pool's queue have the slot.
pub struct InFlight {
    server: Arc<Server>,
    /// Still waiting for the response head (counted in the server's `pending`).
    pending: bool,
    /// Released by the pool itself, under its lock: the pool is not told.
    quiet: bool,
}

impl InFlight {
    pub fn server(&self) -> &Arc<Server> {
        &self.server
    }

    /// The try ended with a response head or a failure after `latency`: the adaptive limit learns from it, and
    /// the request no longer counts against it (a streamed body still counts against `server_in_flight_max`).
    /// `learn`: the service's `adaptive_limit` is on (otherwise the limiter's lock is not taken at all).
    pub fn answered(&mut self, now: Instant, latency: Duration, outcome: LimitOutcome, learn: bool) {
        if !self.pending {
            return;
        }
        if learn {
            self.server.limit_sample(now, latency, outcome);
        }
        self.pending = false;
        self.server.pending.fetch_sub(1, Relaxed);
        if !learn {
            // Without the adaptive limit, admission counts whole requests only: nothing changed for a waiter.
            return;
        }
        if let Some(pool) = self.server.owner.upgrade() {
            pool.released();
        }
    }

    /// Frees the slot without telling the pool (for the pool itself, which holds its lock).
    pub fn release_quietly(mut self) {
        self.quiet = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.pending {
            self.server.pending.fetch_sub(1, Relaxed);
        }
        self.server.in_flight.fetch_sub(1, Relaxed);
        if self.quiet {
            return;
        }
        if let Some(pool) = self.server.owner.upgrade() {
            pool.released();
        }
    }
}
