//! Forwarding one request: route, choose a server, rewrite headers, send over the server's pool, and stream the
//! response back. WebSocket and other upgrades are bridged byte for byte.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full, Limited};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use nonstop_config::{Balance, HashOn};
use serde_json::json;

use crate::balance::hash_key;
use crate::error::ProxyError;
use crate::state::{RouteMatch, ServiceState, Snapshot};
use crate::upstream::{InFlight, Server, UpBody};
use crate::Shared;

pub type RespBody = Either<UpstreamBody, Full<Bytes>>;

/// Per client connection.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub listener: String,
    pub peer: SocketAddr,
    pub tls: bool,
    /// Cleared when a request head is complete (see [`crate::io::TrackedIo`]).
    pub head_pending: Arc<AtomicBool>,
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
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// The request's host without port, lower-case: from the URI (HTTP/2, absolute form) or the Host header.
fn request_host(req: &Request<Incoming>) -> Option<String> {
    let host = match req.uri().host() {
        Some(h) => h.to_string(),
        None => {
            req.headers().get(header::HOST)?.to_str().ok()?.parse::<http::uri::Authority>().ok()?.host().to_string()
        }
    };
    Some(host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase())
}

fn hash_of(req: &Request<Incoming>, on: &HashOn, peer: SocketAddr) -> Option<u64> {
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

fn error_response(e: &ProxyError) -> Response<RespBody> {
    let body = json!({ "error": e.to_string() }).to_string();
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if e.status() == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let ProxyError::MethodNotAllowed(_) = e {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// Serves one client request.
pub async fn handle(ctx: Arc<ConnCtx>, req: Request<Incoming>) -> Result<Response<RespBody>, Infallible> {
    let start = Instant::now();
    ctx.head_pending.store(false, Ordering::Relaxed);
    let snap = ctx.shared.snapshot.load_full();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let host = request_host(&req);
    let outcome = forward(&ctx, &snap, req, host.as_deref(), start).await;
    let (resp, service, server, error) = match outcome {
        Ok((resp, service, server)) => (resp, Some(service), Some(server), None),
        Err((e, service, server)) => {
            let resp = error_response(&e);
            (resp, service, server, Some(e))
        }
    };
    let status = resp.status().as_u16();
    let elapsed = start.elapsed();
    match (&server, &service) {
        (Some(s), _) => s.stats.record(status, elapsed),
        (None, Some(svc)) => svc.unserved.record(status, elapsed),
        (None, None) => ctx.shared.unrouted.record(status, elapsed),
    }
    if let Some(log) = &ctx.shared.access_log {
        log.write(&json!({
            "ts_ms": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            "listener": ctx.listener,
            "client": ctx.peer.to_string(),
            "method": method.as_str(),
            "host": host,
            "path": path,
            "status": status,
            "service": service.as_ref().map(|s| s.name.as_str()),
            "server": server.as_ref().map(|s| s.addr.to_string()),
            "duration_ms": elapsed.as_secs_f64() * 1000.0,
            "error": error.as_ref().map(|e| e.to_string()),
        }));
    }
    Ok(resp)
}

type Failed = (ProxyError, Option<Arc<ServiceState>>, Option<Arc<Server>>);

async fn forward(
    ctx: &ConnCtx,
    snap: &Snapshot,
    mut req: Request<Incoming>,
    host: Option<&str>,
    start: Instant,
) -> Result<(Response<RespBody>, Arc<ServiceState>, Arc<Server>), Failed> {
    let route = match snap.route(host, req.uri().path(), req.method()) {
        RouteMatch::Found(r) => r,
        RouteMatch::MethodNotAllowed => {
            return Err((ProxyError::MethodNotAllowed(req.method().to_string()), None, None));
        }
        RouteMatch::NotFound => {
            let e = ProxyError::NoRoute {
                method: req.method().to_string(),
                host: host.unwrap_or_default().to_string(),
                path: req.uri().path().to_string(),
            };
            return Err((e, None, None));
        }
    };
    let service = route.service.clone();
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > route.body_bytes_max) {
        return Err((ProxyError::BodyTooLarge(route.body_bytes_max), Some(service), None));
    }
    let key = match &service.config.balance {
        Balance::Hash(on) => hash_of(&req, on, ctx.peer),
        _ => None,
    };
    let Some(server) = service.pick(key) else {
        return Err((ProxyError::NoServer(service.name.clone()), Some(service), None));
    };

    let upgrade = is_upgrade(&req);
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let client_version = req.version();
    let upstream_req = rewrite_request(req, ctx, upgrade, route.body_bytes_max, host);
    let in_flight = server.begin();
    let sent = server.send(upstream_req, &service.settings, service.config.response_timeout, upgrade).await;
    let mut resp = match sent {
        Ok(ok) => ok,
        Err(e) => {
            let e = match e {
                ProxyError::Upstream { ref source, .. } if is_length_limit(source) => {
                    ProxyError::BodyTooLarge(route.body_bytes_max)
                }
                ProxyError::BodyTooLarge(_) => ProxyError::BodyTooLarge(route.body_bytes_max),
                e => e,
            };
            return Err((e, Some(service), Some(server)));
        }
    };
    server.observe_latency(Instant::now(), start.elapsed());

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let _in_flight = in_flight;
                if let (Ok(client), Ok(upstream)) = (client_upgrade.await, upstream_upgrade.await) {
                    let mut client = TokioIo::new(client);
                    let mut upstream = TokioIo::new(upstream);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                }
            });
            let (parts, _) = resp.into_parts();
            let mut out = Response::from_parts(parts, Either::Right(Full::new(Bytes::new())));
            out.headers_mut().append(header::VIA, HeaderValue::from_static("1.1 nonstop"));
            return Ok((out, service, server));
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
    let body = UpstreamBody { inner: body, _in_flight: in_flight };
    Ok((Response::from_parts(parts, Either::Left(body)), service, server))
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

fn rewrite_request(
    req: Request<Incoming>,
    ctx: &ConnCtx,
    upgrade: bool,
    body_bytes_max: u64,
    host: Option<&str>,
) -> Request<Limited<Incoming>> {
    let (mut parts, body) = req.into_parts();
    let upgrade_value = if upgrade { parts.headers.get(header::UPGRADE).cloned() } else { None };
    // HTTP/2 carries the authority in the URI; HTTP/1.1 servers need it as Host.
    if !parts.headers.contains_key(header::HOST) {
        if let Some(authority) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
    }
    let original_host = parts.headers.get(header::HOST).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(u) = upgrade_value {
        parts.headers.insert(header::UPGRADE, u);
        parts.headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let ip = ctx.peer.ip();
    let ip_text = ip.to_string();
    let xff = match parts.headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip_text}"),
        None => ip_text.clone(),
    };
    let proto = if ctx.tls { "https" } else { "http" };
    let h = &mut parts.headers;
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert("x-forwarded-proto", HeaderValue::from_static(if ctx.tls { "https" } else { "http" }));
    if let Some(host) = original_host {
        h.insert("x-forwarded-host", host);
    }
    let node = if ip.is_ipv6() { format!("\"[{ip_text}]\"") } else { ip_text };
    let mut forwarded = format!("for={node};proto={proto}");
    if let Some(host) = host {
        forwarded.push_str(&format!(";host=\"{host}\""));
    }
    if let Ok(v) = HeaderValue::from_str(&forwarded) {
        h.append(header::FORWARDED, v);
    }
    h.append(header::VIA, via(parts.version));
    parts.version = Version::HTTP_11;
    if let Some(pq) = parts.uri.path_and_query() {
        if let Ok(uri) = pq.as_str().parse() {
            parts.uri = uri;
        }
    }
    Request::from_parts(parts, Limited::new(body, body_bytes_max.min(usize::MAX as u64) as usize))
}

/// A server's response body on its way to the client; the server's in-flight count lasts as long as it does.
pub struct UpstreamBody {
    inner: UpBody,
    _in_flight: InFlight,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
