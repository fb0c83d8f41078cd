//! The admin API, on its own listener: pool state, server changes, drain, reload, and Prometheus metrics.

use std::convert::Infallible;
use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::state::ServiceState;
use crate::upstream::Server;
use crate::Shared;

/// Largest admin request body.
const BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest `wait_ms` a drain call may ask for.
const DRAIN_WAIT_MS_MAX: u64 = 600_000;

type Resp = Response<Full<Bytes>>;

fn reply(status: StatusCode, body: Value) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn fail(status: StatusCode, message: impl Into<String>) -> Resp {
    reply(status, json!({ "error": message.into() }))
}

/// A refused admin call: the status and the message naming the problem.
struct AdminError(StatusCode, String);

fn err(status: StatusCode, message: impl Into<String>) -> AdminError {
    AdminError(status, message.into())
}

pub async fn serve(shared: Arc<Shared>, socket: std::net::TcpListener, mut shutdown: watch::Receiver<bool>) {
    let listener = match tokio::net::TcpListener::from_std(socket) {
        Ok(l) => l,
        Err(e) => return tracing::error!(error = %e, "cannot register the admin listener"),
    };
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = shutdown.wait_for(|&s| s) => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), req));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Resp, Infallible> {
    let snap = shared.snapshot.load_full();
    if let Some(token) = snap.config.admin.as_ref().and_then(|a| a.token.as_ref()) {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
        if given != Some(format!("Bearer {token}").as_str()) {
            return Ok(fail(StatusCode::UNAUTHORIZED, "missing or wrong bearer token"));
        }
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or_default().to_string();
    let body = match Limited::new(req.into_body(), BODY_BYTES_MAX).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(fail(StatusCode::PAYLOAD_TOO_LARGE, format!("cannot read body: {e}"))),
    };
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let resp = match (method, parts.as_slice()) {
        (Method::GET, ["health"]) => reply(StatusCode::OK, json!({ "status": "ok" })),
        (Method::GET, ["metrics"]) => metrics(&shared),
        (Method::POST, ["config", "reload"]) => match shared.reload() {
            Ok(()) => reply(StatusCode::OK, json!({ "reloaded": true })),
            Err(e) => fail(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
        },
        (Method::GET, ["services"]) => {
            let mut names: Vec<&String> = snap.services.keys().collect();
            names.sort();
            reply(
                StatusCode::OK,
                json!({ "services": names.iter().map(|n| service_json(&snap.services[*n])).collect::<Vec<_>>() }),
            )
        }
        (m, ["services", name, rest @ ..]) => match snap.services.get(*name) {
            None => fail(StatusCode::NOT_FOUND, format!("no service {name:?}")),
            Some(svc) => service_call(svc, m, rest, &body, &query).await.unwrap_or_else(|AdminError(s, m)| fail(s, m)),
        },
        _ => fail(StatusCode::NOT_FOUND, format!("no admin endpoint {path}; see docs/admin.md")),
    };
    Ok(resp)
}

fn server_json(s: &Server) -> Value {
    let statuses: serde_json::Map<String, Value> =
        s.stats.statuses().into_iter().map(|(code, n)| (code.to_string(), n.into())).collect();
    json!({
        "addr": s.addr.to_string(),
        "weight": s.weight(),
        "state": if s.draining() { "draining" } else { "active" },
        "in_flight": s.in_flight(),
        "requests": s.stats.total(),
        "status": statuses,
        "pool_idle": s.pool_idle(),
        "connects": s.connects.load(std::sync::atomic::Ordering::Relaxed),
        "latency_ewma_ms": s.latency_ns() / 1e6,
    })
}

fn service_json(svc: &ServiceState) -> Value {
    json!({
        "name": svc.name,
        "balance": svc.config.balance.name(),
        "servers": svc.servers().iter().map(|s| server_json(s)).collect::<Vec<_>>(),
        "unserved": svc.unserved.total(),
    })
}

fn parse_body(body: &Bytes) -> Result<Value, AdminError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body).map_err(|e| err(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}")))
}

fn addr_of(raw: &str) -> Result<SocketAddr, AdminError> {
    raw.parse().map_err(|_| err(StatusCode::BAD_REQUEST, format!("{raw:?} is not an address like 127.0.0.1:9101")))
}

fn weight_of(v: &Value, default: u32) -> Result<u32, AdminError> {
    match v.get("weight") {
        None => Ok(default),
        Some(w) => w
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())
            .ok_or_else(|| err(StatusCode::BAD_REQUEST, "weight: must be a non-negative integer")),
    }
}

fn wait_ms(query: &str) -> u64 {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix("wait_ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(DRAIN_WAIT_MS_MAX)
}

async fn service_call(
    svc: &ServiceState,
    m: Method,
    rest: &[&str],
    body: &Bytes,
    query: &str,
) -> Result<Resp, AdminError> {
    Ok(match (m, rest) {
        (Method::GET, []) => reply(StatusCode::OK, service_json(svc)),
        (Method::POST, ["servers"]) => {
            let v = parse_body(body)?;
            let raw =
                v.get("addr").and_then(Value::as_str).ok_or_else(|| err(StatusCode::BAD_REQUEST, "addr: required"))?;
            let addr = addr_of(raw)?;
            let s = svc.add_server(addr, weight_of(&v, 1)?).map_err(|e| err(StatusCode::CONFLICT, e.to_string()))?;
            reply(StatusCode::CREATED, server_json(&s))
        }
        (Method::GET, ["servers", a]) => {
            let s = svc.find(addr_of(a)?).ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no server {a}")))?;
            reply(StatusCode::OK, server_json(&s))
        }
        (Method::PUT, ["servers", a]) => {
            let addr = addr_of(a)?;
            let v = parse_body(body)?;
            let current = svc.find(addr).ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no server {a}")))?;
            svc.set_weight(addr, weight_of(&v, current.weight())?)
                .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
            reply(StatusCode::OK, server_json(&current))
        }
        (Method::DELETE, ["servers", a]) => {
            let s = svc.remove_server(addr_of(a)?).map_err(|e| err(StatusCode::NOT_FOUND, e.to_string()))?;
            reply(StatusCode::OK, server_json(&s))
        }
        (Method::POST, ["servers", a, action @ ("drain" | "undrain")]) => {
            let s = svc.find(addr_of(a)?).ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no server {a}")))?;
            s.set_draining(*action == "drain");
            let deadline = Instant::now() + Duration::from_millis(wait_ms(query));
            while *action == "drain" && s.in_flight() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut v = server_json(&s);
            v["drained"] = (s.draining() && s.in_flight() == 0).into();
            reply(StatusCode::OK, v)
        }
        (_, rest) => {
            return Err(err(
                StatusCode::NOT_FOUND,
                format!("no admin endpoint /services/{}/{}", svc.name, rest.join("/")),
            ))
        }
    })
}

/// A per-server series: name, Prometheus type, help text, and how to read it.
type Gauge = (&'static str, &'static str, &'static str, fn(&Server) -> f64);

fn metrics(shared: &Shared) -> Resp {
    let snap = shared.snapshot.load_full();
    let mut services: Vec<_> = snap.services.values().collect();
    services.sort_by(|a, b| a.name.cmp(&b.name));
    let all: Vec<(String, Option<Arc<Server>>, &ServiceState)> = services
        .iter()
        .flat_map(|svc| {
            let servers = svc.servers();
            let mut rows: Vec<(String, Option<Arc<Server>>, &ServiceState)> = servers
                .into_iter()
                .map(|s| (format!("service=\"{}\",server=\"{}\"", svc.name, s.addr), Some(s), svc.as_ref()))
                .collect();
            rows.push((format!("service=\"{}\",server=\"none\"", svc.name), None, svc.as_ref()));
            rows
        })
        .collect();
    let mut out = String::new();
    out.push_str("# HELP nonstop_requests_total Requests answered, by service, server and status.\n");
    out.push_str("# TYPE nonstop_requests_total counter\n");
    for (labels, server, svc) in &all {
        match server {
            Some(s) => s.stats.render_requests(&mut out, labels),
            None => svc.unserved.render_requests(&mut out, labels),
        }
    }
    shared.unrouted.render_requests(&mut out, "service=\"none\",server=\"none\"");
    out.push_str("# HELP nonstop_request_duration_seconds Time from request to response head.\n");
    out.push_str("# TYPE nonstop_request_duration_seconds histogram\n");
    for (labels, server, svc) in &all {
        match server {
            Some(s) => s.stats.render_latency(&mut out, labels),
            None => svc.unserved.render_latency(&mut out, labels),
        }
    }
    let gauges: [Gauge; 4] = [
        ("nonstop_in_flight_requests", "gauge", "Requests in flight on a server.", |s| f64::from(s.in_flight())),
        ("nonstop_pool_idle_connections", "gauge", "Idle pooled connections to a server.", |s| s.pool_idle() as f64),
        ("nonstop_server_weight", "gauge", "A server's weight.", |s| f64::from(s.weight())),
        ("nonstop_upstream_connects_total", "counter", "Connections opened to a server.", |s| {
            s.connects.load(std::sync::atomic::Ordering::Relaxed) as f64
        }),
    ];
    for (name, kind, help, value) in gauges {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, server, _) in &all {
            if let Some(s) = server {
                let _ = writeln!(out, "{name}{{{labels}}} {}", value(s));
            }
        }
    }
    let mut r = Response::new(Full::new(Bytes::from(out)));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}
