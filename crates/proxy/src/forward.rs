//! Forwarding one request: route, choose a server, rewrite headers, send over the server's pool, and stream the
//! response back. WebSocket and other upgrades are bridged byte for byte.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::TokioIo;
use nonstop_config::{Balance, HashOn};
use serde_json::json;

use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::admission::{ShedReason, Tried};
use crate::balance::hash_key;
use crate::error::ProxyError;
use crate::h1down::ClientBody;
use crate::pool::Acquired;
use crate::state::{RouteEntry, RouteMatch, ServiceState, Snapshot, Target};
use crate::upstream::{InFlight, Outgoing, ReqBody, Server, UpBody};
use crate::Shared;
use nonstop_limit::Outcome as LimitOutcome;

/// A response body: a server's, a static file's, or one the proxy wrote.
pub type RespBody = Either<Either<UpstreamBody, StaticBody>, Full<Bytes>>;

/// Per client connection.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub listener: String,
    /// The listener's place in the config (for its trusted proxies).
    pub listener_index: usize,
    pub peer: SocketAddr,
    pub tls: bool,
    /// Cleared when a request head is complete (see [`crate::io::TrackedIo`]).
    pub head_pending: Arc<AtomicBool>,
    /// How long a request body kept for replay may take to arrive (the listener's header read timeout).
    pub body_timeout: Duration,
    /// The client's IP address as text, made once per connection for the forwarding headers.
    pub peer_ip: String,
    /// `X-Forwarded-For` when the client sent none: the client's IP address.
    pub xff: HeaderValue,
    /// The start of `Forwarded`: `for=IP;proto=SCHEME`.
    pub forwarded_for: String,
    /// A response timer to reuse from one request to the next (a request that finds it taken makes its own).
    timer: std::sync::Mutex<Option<Pin<Box<tokio::time::Sleep>>>>,
}

/// A response timer taken from the connection for one request, and given back when the request is done.
struct TimerLease<'a> {
    ctx: &'a ConnCtx,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<'a> TimerLease<'a> {
    fn take(ctx: &'a ConnCtx) -> TimerLease<'a> {
        let timer = ctx.timer.lock().expect("timer lock").take();
        let timer = timer.unwrap_or_else(|| Box::pin(tokio::time::sleep(Duration::from_secs(3600))));
        TimerLease { ctx, timer: Some(timer) }
    }

    fn get(&mut self) -> Pin<&mut tokio::time::Sleep> {
        self.timer.as_mut().expect("held until drop").as_mut()
    }
}

impl Drop for TimerLease<'_> {
    fn drop(&mut self) {
        if let Ok(mut slot) = self.ctx.timer.lock() {
            *slot = self.timer.take();
        }
    }
}

impl ConnCtx {
    /// The per-connection context; the forwarding headers' fixed parts are made here, once.
    pub fn new(
        shared: Arc<Shared>,
        (listener, listener_index): (String, usize),
        peer: SocketAddr,
        tls: bool,
        body_timeout: Duration,
    ) -> ConnCtx {
        let peer_ip = peer.ip().to_string();
        let xff = HeaderValue::from_str(&peer_ip).expect("an IP address is a valid header value");
        let mut forwarded_for = String::with_capacity(48);
        forwarded_for.push_str("for=");
        if peer.is_ipv6() {
            forwarded_for.push_str("\"[");
            forwarded_for.push_str(&peer_ip);
            forwarded_for.push_str("]\"");
        } else {
            forwarded_for.push_str(&peer_ip);
        }
        forwarded_for.push_str(if tls { ";proto=https" } else { ";proto=http" });
        ConnCtx {
            shared,
            listener,
            listener_index,
            peer,
            tls,
            head_pending: Arc::new(AtomicBool::new(false)),
            body_timeout,
            peer_ip,
            xff,
            forwarded_for,
            timer: std::sync::Mutex::new(None),
        }
    }
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those named in `Connection`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none, or only `Connection`: one pass over the names finds which to remove.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.eq_ignore_ascii_case("close") && !t.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

fn is_upgrade(req: &Request<ClientBody>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// The request's host without port, lower-case: from the URI (HTTP/2, absolute form) or the Host header.
fn request_host(req: &Request<ClientBody>) -> Option<String> {
    let authority: http::uri::Authority;
    let host = match req.uri().host() {
        Some(h) => h,
        None => {
            let value = req.headers().get(header::HOST)?.as_bytes();
            let text = std::str::from_utf8(value).ok()?;
            // The usual `name` or `name:port` is split by hand; anything else is parsed as an authority.
            if value.iter().all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':')) {
                match text.split_once(':') {
                    Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
                    Some(_) => return None,
                    None => text,
                }
            } else {
                authority = text.parse().ok()?;
                authority.host()
            }
        }
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

fn hash_of(req: &Request<ClientBody>, on: &HashOn, peer: SocketAddr) -> Option<u64> {
    match on {
        HashOn::Header(name) => req.headers().get(name.as_str()).map(|v| hash_key(v.as_bytes())),
        HashOn::Cookie(name) => req
            .headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .find(|(k, _)| k == name)
            .map(|(_, v)| hash_key(v.as_bytes())),
        HashOn::ClientIp => Some(hash_key(peer.ip().to_string().as_bytes())),
    }
}

pub(crate) fn error_response(e: &ProxyError) -> Response<RespBody> {
    let body = json!({ "error": e.to_string() }).to_string();
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let ProxyError::RateLimited { retry_after_s, .. } = e {
        h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_s));
    } else if e.status() == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let ProxyError::Unauthorized { challenge, .. } = e {
        h.insert(header::WWW_AUTHENTICATE, challenge.clone());
    }
    if let ProxyError::Files(nonstop_files::Error::Method(_)) = e {
        h.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    if let ProxyError::MethodNotAllowed(_) | ProxyError::BadRequest(_) | ProxyError::HeadTooLarge(_) = e {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// What became of one request, for stats and the access log.
#[derive(Default)]
struct Outcome<'s> {
    /// The route, when it sets response headers.
    route: Option<&'s RouteEntry>,
    /// The request's variables, when a header rule or request id needs them.
    vars: Option<Box<ReqVars>>,
    service: Option<Arc<ServiceState>>,
    /// Whether a route of static files answered.
    files: bool,
    server: Option<Arc<Server>>,
    /// Tries sent to servers (connects that failed included).
    attempts: u32,
    queue_wait: Duration,
    /// When the response head arrived (a clock read already made, reused for the request's duration).
    answered: Option<Instant>,
}

/// Serves one client request.
pub async fn handle(ctx: Arc<ConnCtx>, req: Request<ClientBody>) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    ctx.head_pending.store(false, Ordering::Relaxed);
    let snap = ctx.shared.snapshot.load_full();
    let method = req.method().clone();
    // Kept for the log only when there is one (a Uri clone shares its bytes).
    let uri = ctx.shared.access_log.as_ref().map(|_| req.uri().clone());
    let version = req.version();
    let (referer, user_agent) = match &ctx.shared.access_log {
        Some(log) if log.wants_client_headers() => {
            let h = |n: header::HeaderName| req.headers().get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            (h(header::REFERER), h(header::USER_AGENT))
        }
        _ => (None, None),
    };
    let host = request_host(&req);
    let mut out = Outcome::default();
    let result = forward(&ctx, &snap, req, host.as_deref(), start, &mut out).await;
    let (mut resp, error) = match result {
        Ok(resp) => (resp, None),
        Err(e) => (error_response(&e), Some(e)),
    };
    if let Some(vars) = &out.vars {
        if let Some(route) = out.route {
            route.response_headers.apply(resp.headers_mut(), vars.as_ref());
        }
        if let (Some(name), Ok(v)) = (&vars.id_header, HeaderValue::from_str(&vars.request_id)) {
            resp.headers_mut().insert(name.clone(), v);
        }
    }
    if let Some(Some(hsts)) = snap.hsts.get(ctx.listener_index) {
        if !resp.headers().contains_key(header::STRICT_TRANSPORT_SECURITY) {
            resp.headers_mut().insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
        }
    }
    let status = resp.status().as_u16();
    let elapsed = out.answered.unwrap_or_else(Instant::now).saturating_duration_since(start);
    match (&out.server, &out.service) {
        (Some(s), _) => s.stats.record(status, elapsed),
        (None, Some(svc)) => svc.unserved.record(status, elapsed),
        (None, None) if out.files => ctx.shared.files.record(status, elapsed),
        (None, None) => ctx.shared.unrouted.record(status, elapsed),
    }
    if let Some(log) = &ctx.shared.access_log {
        let server = out.server.as_ref().map(|s| s.addr);
        log.write(&nonstop_accesslog::Entry {
            at: std::time::SystemTime::now(),
            listener: &ctx.listener,
            client: ctx.peer,
            method: method.as_str(),
            host: host.as_deref(),
            path: uri.as_ref().map(|u| u.path()),
            target: uri.as_ref().and_then(|u| u.path_and_query()).map(|p| p.as_str()),
            version: match version {
                Version::HTTP_10 => "HTTP/1.0",
                Version::HTTP_2 => "HTTP/2.0",
                _ => "HTTP/1.1",
            },
            status,
            service: out.service.as_ref().map(|s| s.name.as_str()),
            server,
            duration: elapsed,
            attempts: out.attempts,
            queue_wait: out.queue_wait,
            shed: matches!(error, Some(ProxyError::Shed { .. })),
            error: error.as_ref().map(|e| e as &dyn std::fmt::Display),
            referer: referer.as_deref(),
            user_agent: user_agent.as_deref(),
            request_id: out.vars.as_ref().filter(|v| v.id_header.is_some()).map(|v| v.request_id.as_str()),
        });
    }
    Ok(resp)
}

/// The variables of a request, for header templates, kept for its response.
struct ReqVars {
    client: String,
    peer: String,
    host: String,
    method: String,
    path: String,
    query: String,
    scheme: &'static str,
    request_id: String,
    /// The listener's request id header, when it gives requests ids.
    id_header: Option<HeaderName>,
}

impl nonstop_rewrite::Vars for ReqVars {
    fn get(&self, v: nonstop_rewrite::Var) -> &str {
        use nonstop_rewrite::Var;
        match v {
            Var::Client => &self.client,
            Var::Peer => &self.peer,
            Var::Host => &self.host,
            Var::Method => &self.method,
            Var::Path => &self.path,
            Var::Query => &self.query,
            Var::Scheme => self.scheme,
            Var::RequestId => &self.request_id,
        }
    }
}

/// Longest request id kept from a client.
const REQUEST_ID_BYTES_MAX: usize = 128;

/// 128 random bits in hex.
fn random_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// What a route does before forwarding, past matching: its access list and rate limit, the request's id, the
/// variables its header rules read, and its path rewrite, which may answer a redirect instead.
fn dress<'s>(
    ctx: &ConnCtx,
    listener: Option<&nonstop_config::Listener>,
    route: &'s RouteEntry,
    req: &mut Request<ClientBody>,
    host: Option<&str>,
    out: &mut Outcome<'s>,
) -> Result<Option<Response<RespBody>>, ProxyError> {
    let needs_client = route.access.is_some() || route.rate_limit.is_some() || route.wants_client;
    let client = needs_client.then(|| {
        let trusted = listener.map_or(&[][..], |l| &l.trusted_proxies[..]);
        let forwarded = req.headers().get_all("x-forwarded-for").into_iter().filter_map(|v| v.to_str().ok());
        nonstop_guard::client_addr(ctx.peer.ip(), forwarded, trusted)
    });
    let id_header =
        listener.and_then(|l| l.request_id_header.as_deref()).and_then(|n| HeaderName::from_bytes(n.as_bytes()).ok());
    let request_id = match &id_header {
        Some(name) => {
            let sent = req.headers().get(name).and_then(|v| v.to_str().ok()).filter(|v| {
                !v.is_empty() && v.len() <= REQUEST_ID_BYTES_MAX && v.bytes().all(|b| b.is_ascii_graphic())
            });
            let id = sent.map_or_else(random_id, str::to_string);
            if let Ok(v) = HeaderValue::from_str(&id) {
                req.headers_mut().insert(name.clone(), v);
            }
            Some(id)
        }
        None if route.wants_request_id => Some(random_id()),
        None => None,
    };
    let rules = !route.request_headers.is_empty() || !route.response_headers.is_empty();
    if rules || request_id.is_some() {
        out.route = Some(route);
        out.vars = Some(Box::new(ReqVars {
            client: client.map_or_else(|| ctx.peer_ip.clone(), |c| c.to_string()),
            peer: ctx.peer_ip.clone(),
            host: host.unwrap_or_default().to_string(),
            method: req.method().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or_default().to_string(),
            scheme: if ctx.tls { "https" } else { "http" },
            request_id: request_id.unwrap_or_default(),
            id_header,
        }));
    }
    // Refused requests get their id and the route's response headers too.
    if let Some(client) = client {
        guard(route, req, client)?;
    }
    if route.rewrite.is_empty() {
        return Ok(None);
    }
    match route.rewrite.apply(req.uri().path(), req.uri().query()) {
        nonstop_rewrite::Rewritten::Unchanged => Ok(None),
        nonstop_rewrite::Rewritten::Target(target) => {
            let bad = || ProxyError::BadRequest("the route's rewrite made a path that is not a valid request target");
            let mut parts = std::mem::take(req.uri_mut()).into_parts();
            parts.path_and_query = Some(target.parse().map_err(|_| bad())?);
            *req.uri_mut() = http::Uri::from_parts(parts).map_err(|_| bad())?;
            Ok(None)
        }
        nonstop_rewrite::Rewritten::Redirect { status, location } => {
            let Ok(value) = HeaderValue::from_str(&location) else {
                return Err(ProxyError::BadRequest("the route's redirect made a Location that is not a valid header"));
            };
            let body = format!("redirecting to {location}\n");
            let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
            *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND);
            resp.headers_mut().insert(header::LOCATION, value);
            resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
            out.route = Some(route);
            Ok(Some(resp))
        }
    }
}

/// The route's access list and rate limit, for the request's client (see [`nonstop_guard`]).
fn guard(route: &RouteEntry, req: &Request<ClientBody>, client: std::net::IpAddr) -> Result<(), ProxyError> {
    if let Some(list) = &route.access {
        list.check(client).map_err(|r| ProxyError::Forbidden {
            client,
            why: match r {
                nonstop_guard::access::Refusal::Denied(net) => format!("denied (in {net})"),
                nonstop_guard::access::Refusal::NotAllowed => "not in the allow list".to_string(),
            },
        })?;
    }
    if let Some(limit) = &route.rate_limit {
        // Header values and addresses are told apart by their first byte, so that neither can pass for the other.
        let header = match &limit.key {
            nonstop_config::RateKey::Header(name) => req.headers().get(name.as_str()),
            nonstop_config::RateKey::Client => None,
        };
        let mut key = Vec::with_capacity(64);
        let what = match header {
            Some(v) => {
                key.push(b'h');
                key.extend_from_slice(v.as_bytes());
                "key"
            }
            None => {
                key.push(b'c');
                match client {
                    std::net::IpAddr::V4(a) => key.extend_from_slice(&a.octets()),
                    std::net::IpAddr::V6(a) => key.extend_from_slice(&a.octets()),
                }
                "client address"
            }
        };
        if let nonstop_guard::Verdict::Limit { retry_after } = limit.limiter.check(&key, Instant::now()) {
            let rate = limit.limiter.rate();
            return Err(ProxyError::RateLimited {
                rate: describe_rate(rate),
                key: what,
                retry_after_s: retry_after.as_nanos().div_ceil(1_000_000_000).max(1) as u64,
            });
        }
    }
    Ok(())
}

/// "10 requests/s (burst 20)".
fn describe_rate(rate: nonstop_guard::Rate) -> String {
    let per_s = 1.0 / rate.interval.as_secs_f64();
    let (n, unit) = if per_s >= 1.0 { (per_s.round(), "s") } else { ((per_s * 60.0).round(), "min") };
    let r = format!("{n} request{}/{unit}", if n == 1.0 { "" } else { "s" });
    format!("{r} (burst {})", rate.burst)
}

fn is_idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// A random version-4 UUID, as an Idempotency-Key.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = fastrand::u128(..).to_le_bytes();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{}-{}-{}-{}-{}", &h[0..8], &h[8..12], &h[12..16], &h[16..20], &h[20..32])
}

/// The request body across tries: kept in memory when small enough to replay, else streamed once.
enum BodySource {
    Replayable(Bytes),
    Once(Option<Limited<ClientBody>>),
}

impl BodySource {
    fn for_try(&mut self) -> Option<ReqBody> {
        match self {
            BodySource::Replayable(b) => Some(ReqBody::Full(Some(b.clone()))),
            BodySource::Once(b) => b.take().map(ReqBody::Stream),
        }
    }

    fn replayable(&self) -> bool {
        match self {
            BodySource::Replayable(_) => true,
            BodySource::Once(b) => b.is_some(),
        }
    }
}

/// Forwards one request, with its retries. Every future it awaits off the plain path (a queue, a body to collect,
/// a wait for a server, a probe of a failed one) is boxed: this future is moved and copied whole on every request,
/// so its size is that of its largest awaited future.
async fn forward<'s>(
    ctx: &ConnCtx,
    snap: &'s Snapshot,
    mut req: Request<ClientBody>,
    host: Option<&str>,
    start: Instant,
    out: &mut Outcome<'s>,
) -> Result<Response<RespBody>, ProxyError> {
    if let Some(id) = req.uri().path().strip_prefix(STATUS_PREFIX) {
        return request_status(ctx, req.method(), id);
    }
    // Which Host a server would read is anybody's guess (RFC 9110 §7.2: a request with two is invalid).
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    let listener = snap.config.listeners.get(ctx.listener_index);
    if listener.is_some_and(|l| l.redirect_https) {
        return https_redirect(ctx, &req, host);
    }
    let route = match snap.route(host, req.uri().path(), req.method()) {
        RouteMatch::Found(r) => r,
        RouteMatch::MethodNotAllowed => return Err(ProxyError::MethodNotAllowed(req.method().to_string())),
        RouteMatch::NotFound => {
            return Err(ProxyError::NoRoute {
                method: req.method().to_string(),
                host: host.unwrap_or_default().to_string(),
                path: req.uri().path().to_string(),
            });
        }
    };
    // The path as the client sent it, before the route's rewrites, for a static directory's redirect.
    let public_path = match &route.target {
        Target::Service(s) => {
            out.service = Some(s.clone());
            None
        }
        Target::Files(_) => {
            out.files = true;
            Some(req.uri().path().to_string())
        }
    };
    if route.dressed() || listener.is_some_and(|l| l.request_id_header.is_some()) {
        if let Some(redirect) = dress(ctx, listener, route, &mut req, host, out)? {
            return Ok(redirect);
        }
    }
    if let Some(auth) = &route.basic_auth {
        Box::pin(authenticate(auth, &req)).await?;
    }
    if let Some(fa) = &route.forward_auth {
        if let Some(answer) = Box::pin(forward_auth(ctx, fa, &mut req, host)).await? {
            return Ok(answer);
        }
    }
    let service = match &route.target {
        Target::Service(s) => s.clone(),
        Target::Files(files) => {
            return Box::pin(serve_files(route, files, &req, public_path.as_deref().unwrap_or("/"))).await;
        }
    };
    to_service(ctx, route, service, req, host, start, out).await
}

/// Sends a request to a route's service, with its retries (or into the route's queue).
async fn to_service<'s>(
    ctx: &ConnCtx,
    route: &'s RouteEntry,
    service: Arc<ServiceState>,
    mut req: Request<ClientBody>,
    host: Option<&str>,
    start: Instant,
    out: &mut Outcome<'s>,
) -> Result<Response<RespBody>, ProxyError> {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.body_bytes_max) {
        return Err(ProxyError::BodyTooLarge(route.body_bytes_max));
    }
    let key = match &service.config.balance {
        Balance::Hash(on) => hash_of(&req, on, ctx.peer),
        _ => None,
    };
    let retry = &service.config.retry;
    if retry.add_idempotency_key
        && matches!(*req.method(), Method::POST | Method::PATCH)
        && !req.headers().contains_key(IDEMPOTENCY_KEY)
    {
        if let Ok(v) = HeaderValue::from_str(&uuid_v4()) {
            req.headers_mut().insert(IDEMPOTENCY_KEY, v);
        }
    }
    let retryable = is_idempotent(req.method()) || req.headers().contains_key(IDEMPOTENCY_KEY);

    // The coding this client would get, should the answer be worth compressing.
    let compress = route.compress.as_ref().filter(|_| req.method() != Method::HEAD).map(|c| {
        let accept = req.headers().get_all(header::ACCEPT_ENCODING).into_iter().filter_map(|v| v.to_str().ok());
        (c, nonstop_compress::negotiate(accept, &c.settings.codings))
    });
    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let client_version = req.version();
    let (mut head, mut added, body) = rewrite_request(req, ctx, upgrade, host);
    if let Some(vars) = &out.vars {
        route.request_headers.apply_outgoing(&mut head.headers, &mut added, vars.as_ref());
    }
    if let Some(queue) = &route.queue {
        for (name, value) in added {
            head.headers.append(name, value);
        }
        return Box::pin(enqueue(ctx, queue, head, body, declared, route.body_bytes_max)).await;
    }
    // The clock read at the start serves the first try too, unless a body was awaited since.
    let mut clock = Some(start);
    let mut body = if body.is_end_stream() {
        BodySource::Replayable(Bytes::new())
    } else if !upgrade && declared.is_some_and(|n| n <= retry.body_bytes_max) {
        clock = None;
        let collect = Limited::new(body, route.body_bytes_max.min(usize::MAX as u64) as usize).collect();
        let Ok(collected) = Box::pin(tokio::time::timeout(ctx.body_timeout, collect)).await else {
            return Err(ProxyError::ClientBodyTimeout { ms: ctx.body_timeout.as_millis() });
        };
        match collected {
            Ok(collected) => BodySource::Replayable(collected.to_bytes()),
            Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                return Err(ProxyError::BodyTooLarge(route.body_bytes_max))
            }
            Err(e) => return Err(ProxyError::ClientBody(std::io::Error::other(e.to_string()))),
        }
    } else {
        BodySource::Once(Some(Limited::new(body, route.body_bytes_max.min(usize::MAX as u64) as usize)))
    };

    let pool = &service.pool;
    let deadline = start + service.config.request_timeout;
    let wait_max = service.config.admission.queue_wait_max;
    let mut tried = Tried::default();
    let mut timer = TimerLease::take(ctx);
    let mut reached = 0u32;
    // Tries are counted per server only where a deploy may judge them (the app services): a static pool pays
    // nothing for it on the hot path.
    let judged = service.config.app.is_some();
    let mut last: Option<ProxyError> = None;
    // Whether the last failure means the server went away (rather than failed this request).
    let mut last_gone = false;
    loop {
        let now = clock.take().unwrap_or_else(Instant::now);
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return Err(last.unwrap_or(ProxyError::Deadline { ms: service.config.request_timeout.as_millis() }));
        }
        // Wait for a server to come back when the last failure never reached one (it refused: servers are
        // restarting). After a server got the request and failed it (a timeout, a reset), another server may
        // have it if one is up, or if one is down and comes back in time; when every server is up and was
        // tried, the failure is the answer.
        let wait_for_recovery = last.is_none() || last_gone;
        if !(wait_for_recovery || retryable && !upgrade && body.replayable()) {
            return Err(last.expect("a failure is why no recovery is awaited"));
        }
        let wait_left = left.min(wait_max.saturating_sub(out.queue_wait));
        let mut try_start = now;
        let mut lease = match pool.acquire(now, key, &tried, wait_left, wait_for_recovery) {
            Acquired::Now(lease) => lease,
            Acquired::Wait(rx, limit) => {
                let waited_from = Instant::now();
                let got = Box::pin(tokio::time::timeout(limit, rx)).await;
                try_start = Instant::now();
                let waited = try_start - waited_from;
                out.queue_wait += waited;
                pool.waited(waited);
                match got {
                    Ok(Ok(lease)) => lease,
                    _ => {
                        pool.counters.queue_timeouts.fetch_add(1, Ordering::Relaxed);
                        let waited_ms = out.queue_wait.as_millis();
                        return Err(match last {
                            Some(last) => ProxyError::NoServerLeft {
                                service: service.name.clone(),
                                waited_ms,
                                last: Box::new(last),
                            },
                            None => ProxyError::QueueTimeout { service: service.name.clone(), waited_ms },
                        });
                    }
                }
            }
            Acquired::Exhausted => {
                return Err(last.unwrap_or_else(|| ProxyError::NoServer(service.name.clone())));
            }
            Acquired::Shed(ShedReason::NoTimeLeft) if last.is_some() => {
                let last = last.expect("checked");
                if wait_max.is_zero() {
                    // No queue: the failure itself is the answer.
                    return Err(last);
                }
                let last = Box::new(last);
                return Err(ProxyError::NoServerLeft {
                    service: service.name.clone(),
                    waited_ms: out.queue_wait.as_millis(),
                    last,
                });
            }
            Acquired::Shed(reason) => {
                let why = match reason {
                    ShedReason::QueueFull => "the queue is full".to_string(),
                    ShedReason::WaitTooLong { expected_ms } => {
                        format!("the expected wait of {expected_ms} ms is longer than allowed")
                    }
                    ShedReason::NoTimeLeft => "no time is left to wait for a server".to_string(),
                };
                return Err(ProxyError::Shed { service: service.name.clone(), why });
            }
        };
        let server = lease.server().clone();
        out.server = Some(server.clone());
        out.attempts += 1;
        let sender = match server.checkout(&service.settings, upgrade).await {
            Ok(sender) => sender,
            Err(e) => {
                // Never reached the server: any request may go elsewhere, and the body is still here.
                let now = Instant::now();
                lease.answered(now, now - try_start, limit_outcome(&e), service.config.admission.adaptive_limit);
                if judged {
                    server.tries.record(e.status().as_u16(), now - try_start);
                }
                if server.on_trial() {
                    tried.set_avoid_trial();
                }
                let epoch = pool.report(&server, now, true);
                tried.push(server.addr, epoch, now, false);
                pool.count_free_retry();
                last = Some(e);
                last_gone = true;
                continue;
            }
        };
        let Some(try_body) = body.for_try() else {
            return Err(last.unwrap_or(ProxyError::Deadline { ms: 0 }));
        };
        let per_try = service.config.response_timeout.min(deadline.saturating_duration_since(try_start));
        let sent = server
            .send(sender, Outgoing { head: &head, added: &added }, try_body, &service.settings, per_try, timer.get())
            .await;
        let now = Instant::now();
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => {
                lease.answered(now, now - try_start, limit_outcome(&e), service.config.admission.adaptive_limit);
                let e = match e {
                    ProxyError::Upstream { ref source, .. } if is_length_limit(source) => {
                        ProxyError::BodyTooLarge(route.body_bytes_max)
                    }
                    ProxyError::BodyTooLarge(_) => ProxyError::BodyTooLarge(route.body_bytes_max),
                    e => e,
                };
                if !e.server_failed() {
                    return Err(e);
                }
                if e.never_reached_server() && !service.config.named.is_empty() {
                    ctx.shared.resolve_hint.notify_one();
                }
                if judged {
                    server.tries.record(e.status().as_u16(), now - try_start);
                }
                if server.on_trial() {
                    tried.set_avoid_trial();
                }
                let epoch = pool.report(&server, now, true);
                if e.never_reached_server() && body.replayable() {
                    tried.push(server.addr, epoch, now, false);
                    pool.count_free_retry();
                    last = Some(e);
                    last_gone = true;
                    continue;
                }
                // A fresh connection closed with no answer counts as a gone server only if the server is indeed
                // going away: its port refuses a new connection, or resets one at once.
                let gone = e.server_gone() || (e.dropped() && Box::pin(going_away(server.addr)).await);
                if gone && retryable && !upgrade && body.replayable() {
                    // A keep-alive race or a dying server: repeating a safe request costs it nothing.
                    tried.push(server.addr, epoch, now, true);
                    pool.count_free_retry();
                    last = Some(e);
                    last_gone = true;
                    continue;
                }
                reached += 1;
                let again = retryable && !upgrade && body.replayable() && reached < retry.attempts_max;
                if again && pool.try_retry(now) {
                    tried.push(server.addr, epoch, now, true);
                    last = Some(e);
                    last_gone = false;
                    continue;
                }
                return Err(e);
            }
        };
        reached += 1;
        server.observe_latency(now, now - try_start);
        let status = resp.status();
        // The server says it is full: a signal for its limit, not a failure to eject it for.
        let adaptive = service.config.admission.adaptive_limit;
        let overload =
            adaptive && (status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS);
        let outcome = if overload { LimitOutcome::Overload } else { LimitOutcome::Answered };
        lease.answered(now, now - try_start, outcome, adaptive);
        if judged {
            server.tries.record(status.as_u16(), now - try_start);
        }
        let epoch = pool.report(&server, now, status.is_server_error() && !overload);
        // A deploy's new version on trial: any 5xx of it is worth another server (an old one, kept warm).
        let trial_failed = server.on_trial() && status.is_server_error();
        if trial_failed {
            tried.set_avoid_trial();
        }
        if overload
            && status == StatusCode::SERVICE_UNAVAILABLE
            && !trial_failed
            && retry.on_status.contains(&503)
            && retryable
            && !upgrade
            && body.replayable()
            && reached < retry.attempts_max
            && now < deadline
        {
            // Refused for being full: the request goes back through admission (a server with room, or the
            // queue, or a 503 of the proxy's own when even that is full), not straight onto a server that may be
            // just as full. It may come back to this server once that has room (it did not work on it).
            tried.push(server.addr, pool.epoch(&server, now), now, false);
            last_gone = true;
            continue;
        }
        if (retry.on_status.contains(&status.as_u16()) || trial_failed)
            && retryable
            && !upgrade
            && body.replayable()
            && reached < retry.attempts_max
            && now < deadline
            && pool.other_open(now, &tried, server.addr)
            && pool.try_retry(now)
        {
            // Another server can have it now; otherwise this answer is the best there is.
            tried.push(server.addr, epoch, now, true);
            last_gone = false;
            continue;
        }
        drop(tried);
        out.answered = Some(now);

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                let cutoff = server.cutoff();
                tokio::spawn(async move {
                    let _lease = lease;
                    if let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) {
                        let mut client = TokioIo::new(client);
                        let mut upstream = TokioIo::new(upstream);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                            _ = cutoff.cancelled() => {
                                // The drain deadline: close both sides cleanly.
                                let _ = tokio::io::AsyncWriteExt::shutdown(&mut client).await;
                                let _ = tokio::io::AsyncWriteExt::shutdown(&mut upstream).await;
                            }
                        }
                    }
                });
                let (parts, _) = resp.into_parts();
                let mut out = Response::from_parts(parts, Either::Right(Full::new(Bytes::new())));
                out.headers_mut().append(header::VIA, HeaderValue::from_static("1.1 nonstop"));
                return Ok(out);
            }
        }

        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if service.config.hide_identity {
            for h in ["server", "x-powered-by", "x-nonstop-instance"] {
                parts.headers.remove(h);
            }
        }
        parts.headers.append(header::VIA, via(parts.version));
        parts.version = client_version;
        // A body of unknown length may be long-lived (SSE, long poll): it ends at the server's drain deadline.
        let cutoff = body.size_hint().exact().is_none().then(|| Box::pin(server.cutoff().cancelled_owned()));
        let length = body.size_hint().exact();
        let encoder = compress.and_then(|(c, coding)| compressing(c, coding, parts.status, length, &mut parts.headers));
        let body = UpstreamBody { body: Encoded { inner: body, encoder }, cutoff, _in_flight: lease };
        return Ok(Response::from_parts(parts, Either::Left(Either::Left(body))));
    }
}

/// `308` to the same host, path and query on https, at the first TLS listener's port (left out when 443).
fn https_redirect(
    ctx: &ConnCtx,
    req: &Request<ClientBody>,
    host: Option<&str>,
) -> Result<Response<RespBody>, ProxyError> {
    let Some(host) = host.filter(|h| !h.is_empty()) else {
        return Err(ProxyError::BadRequest("a request to a listener that redirects to https must name its Host"));
    };
    let port = match ctx.shared.https_port {
        Some(443) | None => String::new(),
        Some(p) => format!(":{p}"),
    };
    let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_string() };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = format!("https://{host}{port}{target}");
    let location =
        HeaderValue::from_str(&location).map_err(|_| ProxyError::BadRequest("the request makes no valid https URL"))?;
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(b"redirecting to https\n"))));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    resp.headers_mut().insert(header::LOCATION, location);
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    Ok(resp)
}

/// The most bytes of a forward-auth service's 2xx body read (to give its connection back); past it, it is dropped.
const AUTH_BODY_BYTES_MAX: usize = 64 * 1024;

/// Asks a route's forward-auth service about a request: `None` lets it through (with the answer's copy_headers
/// set on it); `Some` is the service's refusal, to give the client as it is.
async fn forward_auth(
    ctx: &ConnCtx,
    fa: &crate::state::RouteForwardAuth,
    req: &mut Request<ClientBody>,
    host: Option<&str>,
) -> Result<Option<Response<RespBody>>, ProxyError> {
    let mut ask = Request::new(ClientBody::Empty);
    *ask.uri_mut() = fa.uri.clone();
    let headers = ask.headers_mut();
    for (name, value) in req.headers() {
        if !matches!(*name, header::CONTENT_LENGTH | header::TRANSFER_ENCODING | header::EXPECT) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(
        HeaderName::from_static("x-forwarded-method"),
        HeaderValue::from_str(req.method().as_str()).unwrap_or(HeaderValue::from_static("GET")),
    );
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    if let Ok(v) = HeaderValue::from_str(target) {
        headers.insert(HeaderName::from_static("x-forwarded-uri"), v);
    }
    let mut out = Outcome::default();
    let start = Instant::now();
    let result = Box::pin(to_service(ctx, &fa.route, fa.service.clone(), ask, host, start, &mut out)).await;
    let elapsed = out.answered.unwrap_or_else(Instant::now).saturating_duration_since(start);
    let status = match &result {
        Ok(r) => r.status().as_u16(),
        Err(e) => e.status().as_u16(),
    };
    match &out.server {
        Some(s) => s.stats.record(status, elapsed),
        None => fa.service.unserved.record(status, elapsed),
    }
    let answer = result?;
    if !answer.status().is_success() {
        return Ok(Some(answer));
    }
    // No client may claim these itself: they come from the service, or not at all.
    for name in &fa.copy_headers {
        req.headers_mut().remove(name);
        for v in answer.headers().get_all(name) {
            req.headers_mut().append(name.clone(), v.clone());
        }
    }
    let drain = Limited::new(answer.into_body(), AUTH_BODY_BYTES_MAX).collect();
    let _ = tokio::time::timeout(ctx.body_timeout, drain).await;
    Ok(None)
}

/// Lets a request through a route's Basic authentication: credentials that passed lately at once, others once
/// their hash is verified off the event loop (at most `verifying_max` at a time on the route).
async fn authenticate(auth: &crate::state::RouteAuth, req: &Request<ClientBody>) -> Result<(), ProxyError> {
    use nonstop_guard::basic::Refusal;
    let refuse = |why| ProxyError::Unauthorized { why, challenge: auth.challenge.clone() };
    let value = req.headers().get(header::AUTHORIZATION).ok_or_else(|| refuse(Refusal::Missing))?;
    let (user, password) = nonstop_guard::basic::credentials(value.as_bytes()).map_err(refuse)?;
    if auth.verified.contains(&user, &password) {
        return Ok(());
    }
    let _permit = auth.verifying.acquire().await.map_err(|_| refuse(Refusal::Wrong))?;
    // Another request may have verified the same credentials while this one waited.
    if auth.verified.contains(&user, &password) {
        return Ok(());
    }
    let users = auth.users.clone();
    let (u, p) = (user.clone(), password.clone());
    let passed = tokio::task::spawn_blocking(move || users.verify(&u, &p)).await.unwrap_or(false);
    if !passed {
        return Err(refuse(Refusal::Wrong));
    }
    auth.verified.insert(&user, &password);
    Ok(())
}

/// Answers a request on a route of static files, compressing the file when the route says so and no
/// precompressed sibling was sent.
async fn serve_files(
    route: &RouteEntry,
    files: &nonstop_files::Files,
    req: &Request<ClientBody>,
    public_path: &str,
) -> Result<Response<RespBody>, ProxyError> {
    let r = nonstop_files::Request {
        method: req.method(),
        path: req.uri().path(),
        public_path,
        query: req.uri().query(),
        headers: req.headers(),
    };
    let (mut parts, body) = files.serve(&r).await.map_err(ProxyError::Files)?.into_parts();
    let encoder = match route.compress.as_ref().filter(|_| req.method() == Method::GET) {
        Some(c) => {
            let accept = req.headers().get_all(header::ACCEPT_ENCODING).into_iter().filter_map(|v| v.to_str().ok());
            let coding = nonstop_compress::negotiate(accept, &c.settings.codings);
            compressing(c, coding, parts.status, body.size_hint().exact(), &mut parts.headers)
        }
        None => None,
    };
    Ok(Response::from_parts(parts, Either::Left(Either::Right(Encoded { inner: body, encoder }))))
}

/// A body on its way to the client, compressed when the route says so.
pub struct Encoded<B> {
    inner: B,
    encoder: Option<Box<Compressing>>,
}

/// A static file's body on its way to the client.
pub type StaticBody = Encoded<nonstop_files::FileBody>;

impl<B> Body for Encoded<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match this.encoder.as_mut() {
            Some(c) => c.poll_frame(&mut this.inner, cx),
            None => Pin::new(&mut this.inner).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.encoder {
            Some(c) => c.encoder.is_none(),
            None => self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.encoder {
            Some(_) => SizeHint::default(),
            None => self.inner.size_hint(),
        }
    }
}

/// What a failed try tells the server's adaptive limit.
fn limit_outcome(e: &ProxyError) -> LimitOutcome {
    match e {
        ProxyError::Connect { source, .. } if source.kind() == std::io::ErrorKind::ConnectionRefused => {
            LimitOutcome::Overload
        }
        // No answer in time: the latency is at least this long.
        ProxyError::ResponseTimeout { .. } | ProxyError::ConnectTimeout { .. } => LimitOutcome::Answered,
        _ => LimitOutcome::Failed,
    }
}

const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Whether the process behind `addr` is going away: its port refuses a TCP connection, or accepts one and closes
/// it within moments, unasked. (A process being killed still completes handshakes from its listening socket's
/// backlog until the kernel closes the socket and resets them; a live server keeps a new connection open.)
async fn going_away(addr: std::net::SocketAddr) -> bool {
    match tokio::time::timeout(GOING_AWAY_CONNECT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        Ok(Ok(mut probe)) => {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(GOING_AWAY_CLOSE, tokio::io::AsyncReadExt::read(&mut probe, &mut byte));
            matches!(read.await, Ok(Ok(0)) | Ok(Err(_)))
        }
        Err(_) => false,
    }
}

/// How long [`going_away`] waits for a connection to be refused or accepted.
const GOING_AWAY_CONNECT: Duration = Duration::from_millis(200);
/// How long [`going_away`] waits for an accepted connection to be closed by a dying server.
const GOING_AWAY_CLOSE: Duration = Duration::from_millis(150);

/// Where a queued request's status is served.
const STATUS_PREFIX: &str = "/_nonstop/requests/";

fn json_response(status: StatusCode, v: serde_json::Value) -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(v.to_string()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Persists the request in its route's queue and answers 202 once it is on disk. The body is read within the
/// listener's body deadline (408), holding its bytes of the queue's `body_bytes_in_flight_max` (503) until then.
async fn enqueue(
    ctx: &ConnCtx,
    queue: &str,
    head: http::request::Parts,
    body: ClientBody,
    declared: Option<u64>,
    body_bytes_max: u64,
) -> Result<Response<RespBody>, ProxyError> {
    let Some(q) = ctx.shared.queues.get(queue) else {
        return Err(ProxyError::QueueRefused { queue: queue.to_string(), why: "it is not running".into() });
    };
    let (body, _held) = q.receive(body, declared, body_bytes_max, ctx.body_timeout).await?;
    match q.accept(&head, body).await {
        Ok((_, key)) => {
            let id = q.client_id(key);
            let mut resp =
                json_response(StatusCode::ACCEPTED, json!({ "id": id, "queue": q.name, "status": "queued" }));
            if let Ok(v) = HeaderValue::from_str(&format!("{STATUS_PREFIX}{id}")) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            Ok(resp)
        }
        Err(e) => Err(ProxyError::QueueRefused { queue: queue.to_string(), why: e.to_string() }),
    }
}

/// `GET /_nonstop/requests/QUEUE.KEY`: a queued request's public status.
fn request_status(ctx: &ConnCtx, method: &Method, id: &str) -> Result<Response<RespBody>, ProxyError> {
    if *method != Method::GET && *method != Method::HEAD {
        return Err(ProxyError::MethodNotAllowed(method.to_string()));
    }
    let not_found = || json_response(StatusCode::NOT_FOUND, json!({ "error": format!("no queued request {id:?}") }));
    let Some((name, key)) = id.rsplit_once('.') else { return Ok(not_found()) };
    let Some(q) = ctx.shared.queues.get(name) else { return Ok(not_found()) };
    match q.public_status(key) {
        Ok(Some(v)) => Ok(json_response(StatusCode::OK, v)),
        Ok(None) => Ok(not_found()),
        Err(e) => Err(ProxyError::QueueRefused { queue: name.to_string(), why: e.to_string() }),
    }
}

fn is_length_limit(e: &hyper::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            return true;
        }
        cause = c.source();
    }
    false
}

fn via(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_2 => "2 nonstop",
        Version::HTTP_10 => "1.0 nonstop",
        _ => "1.1 nonstop",
    })
}

/// Headers the proxy adds to a request on its way to servers, after the client's own (which hold none of the
/// same names but `Forwarded` and `Via`, appended to). The proxy's HTTP/1.1 client writes them right after the
/// header map, which then never grows; other senders append them to their copy of the map.
pub type Added = Vec<(HeaderName, HeaderValue)>;

/// The request head as it goes to servers, the headers the proxy adds to it, and the client's body.
fn rewrite_request(
    req: Request<ClientBody>,
    ctx: &ConnCtx,
    upgrade: bool,
    host: Option<&str>,
) -> (http::request::Parts, Added, ClientBody) {
    let (mut parts, body) = req.into_parts();
    let upgrade_value = if upgrade { parts.headers.get(header::UPGRADE).cloned() } else { None };
    let (mut has_host, mut has_xff, mut has_proto, mut has_fwd_host) = (false, false, false, false);
    for name in parts.headers.keys() {
        if name == header::HOST {
            has_host = true;
        } else if name == X_FORWARDED_FOR {
            has_xff = true;
        } else if name == X_FORWARDED_PROTO {
            has_proto = true;
        } else if name == X_FORWARDED_HOST {
            has_fwd_host = true;
        }
    }
    // The authority the request was routed by is the one the server sees (RFC 9112 §3.2.2): an absolute-form
    // target or HTTP/2's `:authority` replaces whatever Host the client also sent, and HTTP/1.1 servers need it
    // as Host.
    if let Some(authority) = parts.uri.authority() {
        let differs = parts.headers.get(header::HOST).is_none_or(|h| h.as_bytes() != authority.as_str().as_bytes());
        if differs {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, v);
                has_host = true;
            }
        }
    }
    // The server gets a length the proxy wrote itself, whatever the client's spelling (leading zeros, a list).
    if let Some(v) = parts.headers.get(header::CONTENT_LENGTH) {
        let several = parts.headers.get_all(header::CONTENT_LENGTH).iter().nth(1).is_some();
        if several || !crate::framing::is_canonical_length(v.as_bytes()) {
            match body.size_hint().exact() {
                Some(n) => {
                    parts.headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
                }
                None => {
                    parts.headers.remove(header::CONTENT_LENGTH);
                }
            }
        }
    }
    let original_host = if has_host { parts.headers.get(header::HOST).cloned() } else { None };
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade_value {
        parts.headers.insert(header::UPGRADE, u);
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let h = &mut parts.headers;
    let mut added = Added::with_capacity(5);
    let xff = if has_xff {
        let mut chain = String::new();
        for prev in h.get_all(X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()) {
            chain.push_str(prev);
            chain.push_str(", ");
        }
        chain.push_str(&ctx.peer_ip);
        h.remove(X_FORWARDED_FOR);
        HeaderValue::from_maybe_shared(Bytes::from(chain)).ok()
    } else {
        Some(ctx.xff.clone())
    };
    if let Some(v) = xff {
        added.push((X_FORWARDED_FOR, v));
    }
    if has_proto {
        h.remove(X_FORWARDED_PROTO);
    }
    added.push((X_FORWARDED_PROTO, HeaderValue::from_static(if ctx.tls { "https" } else { "http" })));
    if has_fwd_host {
        h.remove(X_FORWARDED_HOST);
    }
    if let Some(host) = original_host {
        added.push((X_FORWARDED_HOST, host));
    }
    let mut forwarded = String::with_capacity(ctx.forwarded_for.len() + 8 + host.map_or(0, str::len));
    forwarded.push_str(&ctx.forwarded_for);
    if let Some(host) = host {
        forwarded.push_str(";host=\"");
        forwarded.push_str(host);
        forwarded.push('"');
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(forwarded)) {
        added.push((header::FORWARDED, v));
    }
    added.push((header::VIA, via(parts.version)));
    parts.version = Version::HTTP_11;
    // Servers get the origin form (path and query); an HTTP/1.1 request usually has it already.
    if parts.uri.scheme().is_some() || parts.uri.authority().is_some() {
        if let Some(pq) = parts.uri.path_and_query() {
            if let Ok(uri) = pq.as_str().parse() {
                parts.uri = uri;
            }
        }
    }
    (parts, added, body)
}

/// Whether to compress a server's answer for this client, by the route's settings; when so, its headers say so
/// (Content-Encoding, no Content-Length, a weak ETag). An answer worth compressing gets `Vary: Accept-Encoding`
/// either way, so that caches keep the two apart.
fn compressing(
    c: &crate::state::RouteCompress,
    coding: Option<nonstop_compress::Coding>,
    status: StatusCode,
    length: Option<u64>,
    headers: &mut HeaderMap,
) -> Option<Box<Compressing>> {
    let text = |n: header::HeaderName| headers.get(n).and_then(|v| v.to_str().ok());
    let r = nonstop_compress::Response {
        status: status.as_u16(),
        content_type: text(header::CONTENT_TYPE),
        content_encoding: text(header::CONTENT_ENCODING),
        // The proxy's own client keeps a server's length in the body rather than the header.
        content_length: length.or_else(|| text(header::CONTENT_LENGTH).and_then(|v| v.trim().parse().ok())),
        cache_control: text(header::CACHE_CONTROL),
        content_range: headers.contains_key(header::CONTENT_RANGE),
    };
    if !c.settings.eligible(&r) {
        return None;
    }
    let varies = headers.get_all(header::VARY).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case("accept-encoding")))
    });
    if !varies {
        headers.append(header::VARY, HeaderValue::from_static("accept-encoding"));
    }
    let coding = coding?;
    let permit = c.permit()?;
    let encoder = nonstop_compress::Encoder::new(coding).ok()?;
    headers.remove(header::CONTENT_LENGTH);
    headers.insert(header::CONTENT_ENCODING, HeaderValue::from_static(coding.token()));
    if let Some(etag) = headers.get(header::ETAG).filter(|v| v.as_bytes().starts_with(b"\"")) {
        let mut weak = b"W/".to_vec();
        weak.extend_from_slice(etag.as_bytes());
        if let Ok(v) = HeaderValue::from_bytes(&weak) {
            headers.insert(header::ETAG, v);
        }
    }
    Some(Box::new(Compressing { encoder: Some(encoder), _permit: permit }))
}

/// A body being compressed; `encoder` is `None` once the stream is finished.
pub struct Compressing {
    encoder: Option<nonstop_compress::Encoder>,
    _permit: crate::state::StreamPermit,
}

type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Compressing {
    /// The next frame of the compressed body, from the server's.
    fn poll_frame<B>(&mut self, inner: &mut B, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>>
    where
        B: Body<Data = Bytes> + Unpin,
        B::Error: Into<BodyError>,
    {
        let some = |b: Vec<u8>| Poll::Ready(Some(Ok(Frame::data(Bytes::from(b)))));
        loop {
            let Some(enc) = self.encoder.as_mut() else { return Poll::Ready(None) };
            match Pin::new(&mut *inner).poll_frame(cx) {
                // The server paused: what was compressed so far goes out now rather than wait in the window.
                Poll::Pending if enc.unflushed() => match enc.flush() {
                    Ok(b) if !b.is_empty() => return some(b),
                    Ok(_) => return Poll::Pending,
                    Err(e) => return Poll::Ready(Some(Err(e.into()))),
                },
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    let enc = self.encoder.take().expect("checked above");
                    return match enc.finish() {
                        Ok(b) if !b.is_empty() => some(b),
                        Ok(_) => Poll::Ready(None),
                        Err(e) => Poll::Ready(Some(Err(e.into()))),
                    };
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => match enc.write(&data) {
                        Ok(b) if !b.is_empty() => return some(b),
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    },
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
            }
        }
    }
}

/// A server's response body on its way to the client; the server's in-flight count lasts as long as it does.
pub struct UpstreamBody {
    /// Compressed for the client, when the route says so.
    body: Encoded<UpBody>,
    /// Ends the body cleanly when the server's drain deadline passes (long-lived responses only).
    cutoff: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    _in_flight: InFlight,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(cutoff) = self.cutoff.as_mut() {
            if cutoff.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
