//! Client listeners: one OS thread per worker, each with its own single-threaded runtime and its own
//! `SO_REUSEPORT` socket per listener, so the kernel spreads connections and threads share nothing on the accept
//! path (nginx's worker model).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{watch, Semaphore};

use http::Request;
use hyper::body::Incoming;
use tokio_util::task::TaskTracker;

use crate::error::ProxyError;
use crate::forward::{error_response, handle, ConnCtx, RespBody};
use crate::h1down::{self, ClientBody, Ended, Limits};
use crate::idle::{self, Activity, End, Watched};
use crate::io::{duplicate, write_last, TrackedIo, REQUEST_TIMEOUT_RESPONSE};
use crate::Shared;

/// hyper's own limit on request headers, which it parses without allocating.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Kernel accept backlog of each listening socket.
pub const BACKLOG: i32 = 4096;

/// Binds one listening socket with `SO_REUSEPORT`, so several may share the address.
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    bind_with(addr, true)
}

/// Binds one listening socket without `SO_REUSEPORT`: nobody else can bind the address while it is open (the admin
/// API has one socket, so it needs no sharing).
pub fn bind_exclusive(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    bind_with(addr, false)
}

fn bind_with(addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// One listener's sockets for one worker thread, and what it shares with the other threads.
pub struct Bound {
    pub index: usize,
    pub socket: std::net::TcpListener,
    pub connections: Arc<Semaphore>,
}

/// Runs the accept loops of one worker thread until `shutdown` turns true, then drains its connections.
pub async fn run_worker(shared: Arc<Shared>, bound: Vec<Bound>, mut shutdown: watch::Receiver<bool>, drain: Duration) {
    let mut tasks = Vec::new();
    for b in bound {
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(accept_loop(shared, b, shutdown, drain)));
    }
    let _ = shutdown.wait_for(|&s| s).await;
    for t in tasks {
        let _ = t.await;
    }
}

/// hyper's server settings for one client connection, from the listener's config.
fn client_builder(cfg: &nonstop_config::Listener) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let mut h1 = builder.http1();
    h1.timer(TokioTimer::new())
        .header_read_timeout(cfg.header_read_timeout)
        .max_buf_size(cfg.header_bytes_max.max(8192));
    // hyper parses into a stack array of its default size; any other limit costs a heap array per request.
    if cfg.header_count_max != HYPER_DEFAULT_MAX_HEADERS {
        h1.max_headers(cfg.header_count_max);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(cfg.header_bytes_max.min(u32::MAX as usize) as u32)
        .keep_alive_interval(None);
    builder
}

/// The size of an HTTP/1.x request head as it came on the wire, near enough (hyper's own limit, its read buffer,
/// cannot go below 8 KiB).
fn head_bytes(req: &Request<Incoming>) -> usize {
    let line = req.method().as_str().len() + req.uri().to_string().len() + 12;
    line + req.headers().iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum::<usize>() + 2
}

/// hyper's side of a client connection: each request goes to [`handle`] with hyper's body, counted in
/// `activity` until its response body is sent. An HTTP/1.x head over `header_bytes_max` gets 431.
fn hyper_service(
    ctx: Arc<ConnCtx>,
    activity: Arc<Activity>,
    header_bytes_max: usize,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = http::Response<Watched<RespBody>>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<Output = Result<http::Response<Watched<RespBody>>, std::convert::Infallible>>
                 + Send
                 + 'static,
> + Clone {
    service_fn(move |req: Request<Incoming>| {
        let open = activity.enter();
        let too_large = req.version() < http::Version::HTTP_2 && head_bytes(&req) > header_bytes_max;
        let answer = (!too_large).then(|| handle(ctx.clone(), req.map(ClientBody::Hyper)));
        async move {
            let resp = match answer {
                Some(answer) => {
                    let Ok(resp) = answer.await;
                    resp
                }
                None => error_response(&ProxyError::HeadTooLarge(header_bytes_max)),
            };
            Ok(resp.map(|body| Watched { body, _open: open }))
        }
    })
}

async fn accept_loop(shared: Arc<Shared>, b: Bound, mut shutdown: watch::Receiver<bool>, drain: Duration) {
    let listener = match tokio::net::TcpListener::from_std(b.socket) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register listener");
            return;
        }
    };
    // Every connection's task, to wait for on drain (each connection watches `shutdown` itself).
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            p = b.connections.clone().acquire_owned() => p.expect("connection semaphore is never closed"),
            _ = shutdown.wait_for(|&s| s) => break,
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|&s| s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let snap = shared.snapshot.load();
        let Some(cfg) = snap.config.listeners.get(b.index) else { continue };
        let builder = client_builder(cfg);
        let limits = Limits {
            header_read_timeout: cfg.header_read_timeout,
            header_bytes_max: cfg.header_bytes_max,
            header_count_max: cfg.header_count_max,
        };
        let listener_name = cfg.name.clone();
        let tls = snap.tls.get(b.index).cloned().flatten();
        // Only the load balancers in front may say who the client is.
        let proxy_protocol = cfg.proxy_protocol;
        if proxy_protocol
            && !cfg.trusted_proxies.is_empty()
            && !cfg.trusted_proxies.iter().any(|n| n.contains(&nonstop_guard::canonical(peer.ip())))
        {
            tracing::debug!(%peer, "a PROXY protocol listener refused a peer that is not a trusted proxy");
            continue;
        }
        drop(snap);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let stop = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let mut stream = stream;
            let mut peer = peer;
            if proxy_protocol {
                match tokio::time::timeout(limits.header_read_timeout, proxy_header(&mut stream)).await {
                    Ok(Ok(Some(client))) => peer = client,
                    Ok(Ok(None)) => {}
                    Ok(Err(why)) => {
                        tracing::debug!(%peer, error = %why, "connection closed: no PROXY protocol header");
                        return;
                    }
                    Err(_) => return,
                }
            }
            let ctx = Arc::new(ConnCtx::new(
                shared,
                (listener_name, b.index),
                peer,
                tls.is_some(),
                limits.header_read_timeout,
            ));
            match tls {
                None => {
                    // The proxy's own HTTP/1.1 server first; hyper takes over for what it does not handle.
                    let Ended::HandOff(io) = h1down::serve(stream, ctx.clone(), limits, shutdown).await else {
                        return;
                    };
                    // On the heap: inline, hyper's connection would make every connection's task as large as
                    // its state, idle plain HTTP/1.1 ones included.
                    Box::pin(serve_with_hyper(io, ctx, builder, limits, stop)).await;
                }
                Some(acceptor) => {
                    Box::pin(serve_tls(stream, acceptor, ctx, builder, limits, stop)).await;
                }
            }
        });
    }
    drop(listener);
    tracker.close();
    let drained = tracker.wait();
    if tokio::time::timeout(drain, drained).await.is_err() {
        tracing::warn!("drain timeout: closing the remaining client connections");
    }
}

/// Reads exactly the PROXY protocol header at the start of `stream` (what follows is HTTP or TLS, left unread):
/// the client it names, `None` for the load balancer's own connection, or why there is no valid header.
async fn proxy_header(stream: &mut tokio::net::TcpStream) -> Result<Option<SocketAddr>, String> {
    use nonstop_guard::proxy_protocol::{parse, Parsed, HEADER_BYTES_MAX};
    use tokio::io::AsyncReadExt;
    let mut got: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; HEADER_BYTES_MAX];
    loop {
        let room = HEADER_BYTES_MAX - got.len();
        let n = stream.peek(&mut buf[..room]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before a PROXY protocol header".to_string());
        }
        let mut candidate = got.clone();
        candidate.extend_from_slice(&buf[..n]);
        match parse(&candidate)? {
            Parsed::Header { len, source } => {
                let rest = len - got.len();
                stream.read_exact(&mut buf[..rest]).await.map_err(|e| e.to_string())?;
                return Ok(source);
            }
            // What is here is all header: take it, and wait for more.
            Parsed::Incomplete => {
                stream.read_exact(&mut buf[..n]).await.map_err(|e| e.to_string())?;
                got.extend_from_slice(&buf[..n]);
            }
        }
    }
}

/// A plaintext connection the proxy's own HTTP/1.1 server handed off (HTTP/2, an upgrade, a head it leaves to
/// hyper), served by hyper to its end.
async fn serve_with_hyper(
    io: h1down::HandOff,
    ctx: Arc<ConnCtx>,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    stop: watch::Receiver<bool>,
) {
    let last_word = duplicate(io.stream());
    let head_pending = ctx.head_pending.clone();
    let activity = Activity::new();
    let service = hyper_service(ctx, activity.clone(), limits.header_bytes_max);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let end = idle::drive(conn.into_owned(), &activity, limits.header_read_timeout, stop).await;
    // hyper closes a connection whose head did not arrive in time without a word; say why.
    let timed_out = match &end {
        End::Done(Err(e)) => e.downcast_ref::<hyper::Error>().is_some_and(hyper::Error::is_timeout),
        End::Idle => true,
        _ => false,
    };
    if let (true, true, Some(fd)) = (timed_out, head_pending.load(Ordering::Relaxed), &last_word) {
        write_last(fd, REQUEST_TIMEOUT_RESPONSE);
    }
}

/// A TLS connection: the handshake, then hyper to its end.
async fn serve_tls(
    stream: tokio::net::TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    ctx: Arc<ConnCtx>,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    stop: watch::Receiver<bool>,
) {
    // The handshake counts against the head timeout; a TLS client that stalls is simply closed.
    let Ok(Ok(stream)) = tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream)).await else {
        return;
    };
    let io = TrackedIo { stream, head_pending: ctx.head_pending.clone() };
    let activity = Activity::new();
    let service = hyper_service(ctx, activity.clone(), limits.header_bytes_max);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    idle::drive(conn.into_owned(), &activity, limits.header_read_timeout, stop).await;
}
