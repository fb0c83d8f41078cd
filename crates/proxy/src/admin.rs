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

use crate::metrics::Escaped;
use crate::pool::MemberView;
use crate::queued::Queue;

fn load(a: &std::sync::atomic::AtomicU64) -> f64 {
    a.load(std::sync::atomic::Ordering::Relaxed) as f64
}
use crate::state::ServiceState;
use crate::upstream::Server;
use crate::Shared;

/// Largest admin request body.
const BODY_BYTES_MAX: usize = 64 * 1024;
/// Longest `wait_ms` a drain call may ask for.
const DRAIN_WAIT_MS_MAX: u64 = 600_000;

type Resp = Response<AdminBody>;

/// An admin response body: a whole JSON document, or JSON lines that follow a deploy as it runs.
pub enum AdminBody {
    Full(Full<Bytes>),
    Lines(tokio::sync::mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for AdminBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            AdminBody::Full(f) => std::pin::Pin::new(f).poll_frame(cx),
            AdminBody::Lines(rx) => rx.poll_recv(cx).map(|line| line.map(|b| Ok(hyper::body::Frame::data(b)))),
        }
    }
}

fn reply(status: StatusCode, body: Value) -> Resp {
    let mut r = Response::new(AdminBody::Full(Full::new(Bytes::from(body.to_string()))));
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
    let own = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => return tracing::error!(error = %e, "cannot read the admin listener's address"),
    };
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = shutdown.wait_for(|&s| s) => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), own, req));
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// The Host, Origin and Content-Type checks of `admin_guard` on one request.
fn guard(req: &Request<Incoming>, own: SocketAddr, token: bool) -> Result<(), crate::admin_guard::Refusal> {
    use hyper::body::Body;
    let one = |name: header::HeaderName| {
        let mut values = req.headers().get_all(name).iter();
        // A value that is not text, or a second one, can match nothing.
        match (values.next(), values.next()) {
            (Some(v), None) => Some(v.to_str().unwrap_or("\u{fffd}")),
            (Some(_), Some(_)) => Some("\u{fffd}"),
            (None, _) => None,
        }
    };
    let asked = crate::admin_guard::Asked {
        method: req.method(),
        host: req.uri().authority().map(|a| a.as_str()).or_else(|| one(header::HOST)),
        origin: one(header::ORIGIN),
        content_type: one(header::CONTENT_TYPE),
        has_body: req.body().size_hint().exact() != Some(0),
    };
    crate::admin_guard::check(&asked, own, token)
}

async fn handle(shared: Arc<Shared>, own: SocketAddr, req: Request<Incoming>) -> Result<Resp, Infallible> {
    // A forge's push webhook: authenticated by its signature over the body, not by the admin token, and sent by
    // a server, not a browser (so the guard's checks do not apply).
    if let Some(name) = req.uri().path().strip_prefix("/hooks/") {
        let name = name.trim_end_matches('/').to_string();
        return Ok(hook_call(&shared, req, &name).await);
    }
    let snap = shared.snapshot.load_full();
    let token = snap.config.admin.as_ref().and_then(|a| a.token.as_ref());
    if let Err(refused) = guard(&req, own, token.is_some()) {
        return Ok(fail(refused.status(), refused.message()));
    }
    if let Some(token) = token {
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
        (Method::GET, ["queues"]) => reply(
            StatusCode::OK,
            json!({ "queues": shared.queues.values().map(|q| queue_json(q)).collect::<Vec<_>>() }),
        ),
        (Method::GET, ["deploy"]) => follow_call(&shared, &query).unwrap_or_else(|AdminError(s, m)| fail(s, m)),
        (Method::POST, ["deploy"]) => deploy_call(&shared, &body, false).unwrap_or_else(|AdminError(s, m)| fail(s, m)),
        (Method::POST, ["rollback"]) => deploy_call(&shared, &body, true).unwrap_or_else(|AdminError(s, m)| fail(s, m)),
        (Method::GET, ["status"]) => {
            let services: Vec<Value> = shared
                .apps
                .deployers
                .values()
                .filter(|d| service_in_query(&query).is_none_or(|s| s == d.service))
                .map(|d| with_limits(&shared, &d.service, d.status()))
                .collect();
            match service_in_query(&query) {
                // A name that is no app service is an error, not an empty list (`status --service typo` exits 1).
                Some(s) if services.is_empty() => {
                    let known: Vec<&str> = shared.apps.deployers.values().map(|d| d.service.as_str()).collect();
                    fail(StatusCode::NOT_FOUND, format!("no app service {s:?} (app services: {})", known.join(", ")))
                }
                _ => reply(StatusCode::OK, json!({ "services": services })),
            }
        }
        (Method::GET, ["logs"]) => logs_call(&shared, &query).await.unwrap_or_else(|AdminError(s, m)| fail(s, m)),
        (Method::GET, ["deploys"]) => {
            let records = shared.apps.history.as_ref().map(|h| h.records(service_in_query(&query))).unwrap_or_default();
            reply(StatusCode::OK, json!({ "deploys": records }))
        }
        (m, ["pipelines", rest @ ..]) => {
            pipelines_call(&shared, m, rest, &body, &query).await.unwrap_or_else(|AdminError(s, m)| fail(s, m))
        }
        (m, ["queues", name, rest @ ..]) => match shared.queues.get(*name) {
            None => fail(StatusCode::NOT_FOUND, format!("no queue {name:?}")),
            Some(q) => queue_call(q, m, rest, &query).await.unwrap_or_else(|AdminError(s, m)| fail(s, m)),
        },
        (m, ["services", name, rest @ ..]) => match snap.services.get(*name) {
            None => fail(StatusCode::NOT_FOUND, format!("no service {name:?}")),
            Some(svc) => service_call(svc, m, rest, &body, &query).await.unwrap_or_else(|AdminError(s, m)| fail(s, m)),
        },
        _ => fail(StatusCode::NOT_FOUND, format!("no admin endpoint {path}; see docs/admin.md")),
    };
    Ok(resp)
}

/// Largest webhook body (GitHub sends at most 25 MB; a push payload is far smaller).
const HOOK_BODY_BYTES_MAX: usize = 5 << 20;

/// POST /hooks/NAME: a push webhook, checked and recorded by the pipelines (401 for a bad signature).
async fn hook_call(shared: &Shared, req: Request<Incoming>, name: &str) -> Resp {
    if req.method() != Method::POST {
        return fail(StatusCode::METHOD_NOT_ALLOWED, format!("/hooks/{name} takes POST (a forge's push webhook)"));
    }
    let Some(p) = &shared.pipelines else {
        return fail(StatusCode::NOT_FOUND, "no pipelines are configured (see docs/pipelines.md)");
    };
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let body = match Limited::new(req.into_body(), HOOK_BODY_BYTES_MAX).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return fail(StatusCode::PAYLOAD_TOO_LARGE, format!("cannot read the webhook body: {e}")),
    };
    let (status, v) = p.hook(name, &headers, &body);
    reply(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), v)
}

fn pipeline_err(e: nonstop_pipeline::PipelineError) -> AdminError {
    err(StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), e.to_string())
}

/// /pipelines...: list, start, history, one run, its logs (stored, or followed as Server-Sent Events), cancel.
async fn pipelines_call(
    shared: &Shared,
    m: Method,
    rest: &[&str],
    body: &Bytes,
    query: &str,
) -> Result<Resp, AdminError> {
    let Some(p) = &shared.pipelines else {
        return Err(err(StatusCode::NOT_FOUND, "no pipelines or jobs are configured (see docs/pipelines.md)"));
    };
    let number = |raw: &str| {
        raw.parse::<u64>().map_err(|_| err(StatusCode::BAD_REQUEST, format!("{raw:?} is not a run number")))
    };
    match (m, rest) {
        (Method::GET, []) => Ok(reply(StatusCode::OK, p.list())),
        (Method::GET, [name, "runs"]) => {
            Ok(reply(StatusCode::OK, json!({ "runs": p.runs(name).map_err(pipeline_err)? })))
        }
        (Method::POST, [name, "runs"]) => {
            let v = if body.is_empty() { json!({}) } else { parse_body(body)? };
            let git_ref = match v.get("ref") {
                None | Some(Value::Null) => None,
                Some(Value::String(r)) if !r.is_empty() && !r.starts_with('-') && !r.contains(char::is_whitespace) => {
                    Some(r.clone())
                }
                Some(_) => return Err(err(StatusCode::BAD_REQUEST, "ref: a branch, tag or commit (a string)")),
            };
            let t = nonstop_pipeline::Trigger { kind: "manual", git_ref, ..Default::default() };
            match p.trigger(name, t).map_err(pipeline_err)? {
                nonstop_pipeline::Triggered::Run(run) | nonstop_pipeline::Triggered::Duplicate(run) => {
                    Ok(reply(StatusCode::ACCEPTED, json!({ "run": run })))
                }
                nonstop_pipeline::Triggered::Skipped(why) => Err(err(StatusCode::CONFLICT, why)),
            }
        }
        (Method::GET, [name, "runs", n]) => {
            Ok(reply(StatusCode::OK, json!(p.run(name, number(n)?).map_err(pipeline_err)?)))
        }
        (Method::POST, [name, "runs", n, "cancel"]) => {
            Ok(reply(StatusCode::OK, json!({ "run": p.cancel(name, number(n)?).map_err(pipeline_err)? })))
        }
        (Method::GET, [name, "runs", n, "log"]) => {
            let n = number(n)?;
            let follow = query.split('&').any(|kv| kv == "follow=1" || kv == "follow=true");
            if !follow {
                return Ok(reply(StatusCode::OK, p.logs(name, n).map_err(pipeline_err)?));
            }
            let (backlog, live) = p.follow(name, n).map_err(pipeline_err)?;
            let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(256);
            let event = |line: &str| {
                if serde_json::from_str::<Value>(line).is_ok_and(|v| v["end"] == json!(true)) {
                    Bytes::from(format!("event: end\ndata: {line}\n\n"))
                } else {
                    Bytes::from(format!("data: {line}\n\n"))
                }
            };
            tokio::spawn(async move {
                for line in &backlog {
                    if tx.send(event(line)).await.is_err() {
                        return;
                    }
                }
                let Some(mut live) = live else { return };
                loop {
                    let line = match live.recv().await {
                        Ok(line) => line,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(k)) => {
                            json!({ "stage": "", "name": "", "line": format!("[nonstop: {k} lines skipped]") })
                                .to_string()
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    };
                    let end = serde_json::from_str::<Value>(&line).is_ok_and(|v| v["end"] == json!(true));
                    if tx.send(event(&line)).await.is_err() || end {
                        return;
                    }
                }
            });
            let mut r = Response::new(AdminBody::Lines(rx));
            r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            Ok(r)
        }
        (m, rest) => Err(err(
            StatusCode::NOT_FOUND,
            format!("no admin endpoint {m} /pipelines/{}; see docs/pipelines.md", rest.join("/")),
        )),
    }
}

/// Adds each instance's learned concurrency limit (and why it last moved) to a deployer's status.
fn with_limits(shared: &Shared, service: &str, mut status: Value) -> Value {
    let snap = shared.snapshot.load();
    let Some(svc) = snap.services.get(service) else { return status };
    let members = svc.pool.members();
    for i in status["instances"].as_array_mut().into_iter().flatten() {
        let addr = i["addr"].as_str().unwrap_or("").to_string();
        if let Some((limit, v)) = members.iter().find(|m| m.server.addr.to_string() == addr).and_then(|m| m.limit) {
            i["limit"] = json!({ "current": limit, "why": v.why.as_str() });
        }
    }
    status
}

/// Instances by version and state, restarts, deploys by result, and whether a deploy runs.
fn deploy_metrics(shared: &Shared, out: &mut String) {
    if shared.apps.deployers.is_empty() {
        return;
    }
    let mut instances = String::new();
    let mut restarts = String::new();
    let mut running = String::new();
    for d in shared.apps.deployers.values() {
        let s = d.status();
        let svc = Escaped(&d.service);
        let mut by: std::collections::BTreeMap<(String, String), u64> = std::collections::BTreeMap::new();
        for i in s["instances"].as_array().into_iter().flatten() {
            let key = (i["version"].as_str().unwrap_or("").to_string(), i["state"].as_str().unwrap_or("").to_string());
            *by.entry(key).or_default() += 1;
            let _ = writeln!(
                restarts,
                "nonstop_app_restarts_total{{service=\"{svc}\",instance=\"{}\"}} {}",
                Escaped(&i["id"]),
                i["restarts"]
            );
        }
        for ((version, state), n) in by {
            let _ = writeln!(
                instances,
                "nonstop_app_instances{{service=\"{svc}\",version=\"{}\",state=\"{}\"}} {n}",
                Escaped(version),
                Escaped(state)
            );
        }
        let _ = writeln!(running, "nonstop_deploy_running{{service=\"{svc}\"}} {}", u8::from(!s["deploy"].is_null()));
    }
    let _ = writeln!(
        out,
        "# HELP nonstop_app_instances App instances the proxy runs.\n# TYPE nonstop_app_instances gauge\n{instances}"
    );
    let _ = writeln!(out, "# HELP nonstop_app_restarts_total Restarts after crashes.\n# TYPE nonstop_app_restarts_total counter\n{restarts}");
    let _ = writeln!(out, "# HELP nonstop_deploy_running 1 while a deploy or rollback runs.\n# TYPE nonstop_deploy_running gauge\n{running}");
    let mut results: std::collections::BTreeMap<(String, String), u64> = std::collections::BTreeMap::new();
    for r in shared.apps.history.as_ref().map(|h| h.records(None)).unwrap_or_default() {
        *results.entry((r.service, r.result)).or_default() += 1;
    }
    let _ = writeln!(
        out,
        "# HELP nonstop_deploys_total Finished deploys and rollbacks by result.\n# TYPE nonstop_deploys_total counter"
    );
    for ((svc, result), n) in results {
        let (svc, result) = (Escaped(svc), Escaped(result));
        let _ = writeln!(out, "nonstop_deploys_total{{service=\"{svc}\",result=\"{result}\"}} {n}");
    }
}

fn service_in_query(query: &str) -> Option<&str> {
    query.split('&').find_map(|kv| kv.strip_prefix("service="))
}

/// The deployer a call names, or the only one.
fn deployer_for(shared: &Shared, v: &Value) -> Result<Arc<nonstop_deploy::Deployer>, AdminError> {
    let all = &shared.apps.deployers;
    let names = || all.keys().cloned().collect::<Vec<_>>().join(", ");
    match v.get("service") {
        Some(Value::String(name)) => all.get(name).cloned().ok_or_else(|| {
            err(StatusCode::NOT_FOUND, format!("no app service {name:?} (services with an app section: {})", names()))
        }),
        None | Some(Value::Null) if all.len() == 1 => Ok(all.values().next().expect("one").clone()),
        None | Some(Value::Null) if all.is_empty() => {
            Err(err(StatusCode::CONFLICT, "no service has an app section: there is nothing to deploy"))
        }
        None | Some(Value::Null) => {
            Err(err(StatusCode::BAD_REQUEST, format!("several app services ({}): name one with \"service\"", names())))
        }
        Some(_) => Err(err(StatusCode::BAD_REQUEST, "service: must be a string")),
    }
}

/// Log bytes per instance a `GET /logs` returns by default, and at most.
const LOG_BYTES_DEFAULT: u64 = 64 * 1024;
const LOG_BYTES_MAX: u64 = 4 << 20;

/// GET /logs?service=S&instance=ID&bytes_max=N: the tail of the output of one instance, or of each current one
/// (fetched over SSH for instances on hosts).
async fn logs_call(shared: &Shared, query: &str) -> Result<Resp, AdminError> {
    let param = |k: &str| query.split('&').find_map(|kv| kv.strip_prefix(&format!("{k}=")[..]));
    let d = deployer_for(shared, &json!({ "service": service_in_query(query) }))?;
    let instance = match param("instance") {
        None => None,
        Some(raw) => Some(raw.parse::<u64>().map_err(|_| {
            err(StatusCode::BAD_REQUEST, format!("instance: {raw:?} is not an instance id (see nonstop status)"))
        })?),
    };
    let bytes_max = match param("bytes_max") {
        None => LOG_BYTES_DEFAULT,
        Some(raw) => raw.parse::<u64>().ok().filter(|&n| (1..=LOG_BYTES_MAX).contains(&n)).ok_or_else(|| {
            err(
                StatusCode::BAD_REQUEST,
                format!("bytes_max: {raw:?} is not a number of bytes from 1 to {LOG_BYTES_MAX}"),
            )
        })?,
    };
    match d.logs(instance, bytes_max).await {
        Ok(text) => Ok(reply(StatusCode::OK, json!({ "service": d.service, "text": text }))),
        Err(e) => Err(err(StatusCode::NOT_FOUND, e.to_string())),
    }
}

/// POST /deploy and POST /rollback: start, then follow the deploy as JSON lines until it is done.
fn deploy_call(shared: &Shared, body: &Bytes, rollback: bool) -> Result<Resp, AdminError> {
    use nonstop_deploy::DeployError;
    let v = parse_body(body)?;
    let d = deployer_for(shared, &v)?;
    let started = if rollback {
        match v.get("to") {
            None | Some(Value::Null) => d.rollback(),
            Some(Value::String(to)) => d.rollback_to(to),
            Some(_) => return Err(err(StatusCode::BAD_REQUEST, "to: must be a version string")),
        }
    } else {
        let version = v
            .get("version")
            .and_then(Value::as_str)
            .ok_or_else(|| err(StatusCode::BAD_REQUEST, "version: required (a string such as \"v2\")"))?
            .to_string();
        let strategy = match v.get("strategy") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(
                nonstop_config::Strategy::parse(s)
                    .map_err(|e| err(StatusCode::BAD_REQUEST, format!("strategy: {e}")))?,
            ),
            Some(_) => return Err(err(StatusCode::BAD_REQUEST, "strategy: must be a string")),
        };
        let steps = match v.get("steps") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| err(StatusCode::BAD_REQUEST, "steps: must be an array of percentages"))?,
            ),
            Some(_) => return Err(err(StatusCode::BAD_REQUEST, "steps: must be an array of percentages")),
        };
        let env = match v.get("env") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| err(StatusCode::BAD_REQUEST, "env: values must be strings"))?,
            Some(_) => return Err(err(StatusCode::BAD_REQUEST, "env: must be an object of strings")),
        };
        d.deploy(nonstop_deploy::DeployRequest { version, strategy, steps, env })
    };
    let events = started.map_err(|e| match e {
        DeployError::Invalid(_) => err(StatusCode::BAD_REQUEST, e.to_string()),
        DeployError::ShuttingDown => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        DeployError::RollbackTo(nonstop_deploy::history::RollbackToError::Unknown { .. }) => {
            err(StatusCode::NOT_FOUND, e.to_string())
        }
        DeployError::RollbackTo(_) => err(StatusCode::CONFLICT, e.to_string()),
        DeployError::Busy { .. } | DeployError::SameVersion(..) | DeployError::NoPrevious(_) => {
            err(StatusCode::CONFLICT, e.to_string())
        }
    })?;
    Ok(progress_stream(Vec::new(), events))
}

/// GET /deploy?service=NAME: follows the deploy or rollback that is running (`nonstop deploy --follow`): its
/// progress so far, then the rest as it happens, to its end.
fn follow_call(shared: &Shared, query: &str) -> Result<Resp, AdminError> {
    let d = deployer_for(shared, &json!({ "service": service_in_query(query) }))?;
    let (so_far, events) = d.follow().ok_or_else(|| {
        err(StatusCode::NOT_FOUND, format!("no deploy or rollback of {:?} is running (see nonstop history)", d.service))
    })?;
    Ok(progress_stream(so_far, events))
}

/// A deploy's progress as NDJSON: `first`, then each line of `events`, until the one that says `done`.
fn progress_stream(first: Vec<String>, mut events: tokio::sync::broadcast::Receiver<String>) -> Resp {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let is_done = |line: &str| serde_json::from_str::<Value>(line).is_ok_and(|v| v["done"] == json!(true));
        for line in first {
            let done = is_done(&line);
            if tx.send(Bytes::from(line + "\n")).await.is_err() || done {
                return;
            }
        }
        loop {
            let line = match events.recv().await {
                Ok(line) => line,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    json!({ "step": "lagged", "message": format!("{n} progress lines skipped") }).to_string()
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            };
            let done = is_done(&line);
            if tx.send(Bytes::from(line + "\n")).await.is_err() || done {
                return;
            }
        }
    });
    let mut r = Response::new(AdminBody::Lines(rx));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-ndjson"));
    r
}

fn server_json(s: &Server, health: Option<&MemberView>) -> Value {
    let statuses: serde_json::Map<String, Value> =
        s.stats.statuses().into_iter().map(|(code, n)| (code.to_string(), n.into())).collect();
    let state = match health {
        _ if s.draining() => "draining",
        Some(h) if !h.up => "down",
        Some(h) if h.ejected_ms.is_some() => "ejected",
        _ => "active",
    };
    json!({
        "addr": s.addr.to_string(),
        "weight": s.weight(),
        "state": state,
        "backup": health.is_some_and(|h| h.backup),
        "healthy": health.is_none_or(|h| h.up),
        "ejected_ms": health.and_then(|h| h.ejected_ms),
        "slow_start": health.map_or(1.0, |h| h.ramp),
        "in_flight": s.in_flight(),
        "in_flight_max": health.map(|h| h.in_flight_max),
        "awaiting_head": s.pending(),
        "limit": health.and_then(|h| h.limit.as_ref()).map(|(limit, v)| json!({
            "current": limit,
            "learned": v.limit,
            "enforced": v.enforced,
            "why": v.why.as_str(),
            "since_ms": v.changed_at.elapsed().as_millis() as u64,
            "unloaded_latency_ms": v.baseline.map(|d| d.as_secs_f64() * 1000.0),
        })),
        "requests": s.stats.total(),
        "status": statuses,
        "pool_idle": s.pool_idle(),
        "connects": s.connects.load(std::sync::atomic::Ordering::Relaxed),
        "latency_ewma_ms": s.latency_ns() / 1e6,
    })
}

fn service_json(svc: &ServiceState) -> Value {
    let c = &svc.pool.counters;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    json!({
        "name": svc.name,
        "balance": svc.config.balance.name(),
        "servers": svc.pool.members().iter().map(|m| server_json(&m.server, Some(m))).collect::<Vec<_>>(),
        "unserved": svc.unserved.total(),
        "queue": {
            "length": svc.pool.queued(),
            "queued_total": n(&c.queued),
            "shed_total": n(&c.shed),
            "timeouts_total": n(&c.queue_timeouts),
            "wait_max_ms": n(&c.queue_wait_max_us) as f64 / 1000.0,
        },
        "retries_total": n(&c.retries),
        "retry_budget_exhausted_total": n(&c.budget_exhausted),
        "ejections_total": n(&c.ejections),
    })
}

fn member_json(svc: &ServiceState, s: &Server) -> Value {
    let members = svc.pool.members();
    server_json(s, members.iter().find(|m| m.server.addr == s.addr))
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
            let backup = match v.get("backup") {
                None => false,
                Some(b) => b.as_bool().ok_or_else(|| err(StatusCode::BAD_REQUEST, "backup: must be true or false"))?,
            };
            let slow_start = match v.get("slow_start") {
                None => true,
                Some(b) => {
                    b.as_bool().ok_or_else(|| err(StatusCode::BAD_REQUEST, "slow_start: must be true or false"))?
                }
            };
            let s = svc
                .pool
                .add_server(addr, weight_of(&v, 1)?, backup, !slow_start)
                .map_err(|e| err(StatusCode::CONFLICT, e.to_string()))?;
            reply(StatusCode::CREATED, member_json(svc, &s))
        }
        (Method::GET, ["servers", a]) => {
            let s = svc.find(addr_of(a)?).ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no server {a}")))?;
            reply(StatusCode::OK, member_json(svc, &s))
        }
        (Method::PUT, ["servers", a]) => {
            let addr = addr_of(a)?;
            let v = parse_body(body)?;
            let current = svc.find(addr).ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no server {a}")))?;
            svc.pool
                .set_weight(addr, weight_of(&v, current.weight())?)
                .map_err(|e| err(StatusCode::BAD_REQUEST, e.to_string()))?;
            reply(StatusCode::OK, member_json(svc, &current))
        }
        (Method::DELETE, ["servers", a]) => {
            let s = svc.pool.remove_server(addr_of(a)?).map_err(|e| err(StatusCode::NOT_FOUND, e.to_string()))?;
            reply(StatusCode::OK, server_json(&s, None))
        }
        (Method::POST, ["servers", a, action @ ("drain" | "undrain")]) => {
            let s = svc.find(addr_of(a)?).ok_or_else(|| err(StatusCode::NOT_FOUND, format!("no server {a}")))?;
            s.set_draining(*action == "drain", svc.config.drain_deadline);
            let deadline = Instant::now() + Duration::from_millis(wait_ms(query));
            while *action == "drain" && s.in_flight() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut v = member_json(svc, &s);
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

fn queue_json(q: &Queue) -> Value {
    let c = &q.counters;
    let s = &q.store.counts;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let oldest = q.store.oldest_queued_ms().ok().flatten();
    let (store, depth) = match &q.rabbit {
        None => ("embedded", n(&s.depth)),
        // The broker's ready messages, or this node's unfinished requests, whichever is more.
        Some(r) => ("rabbitmq", n(&r.depth).max(n(&s.depth))),
    };
    json!({
        "name": q.name,
        "service": q.service,
        "store": store,
        "broker_connected": q.rabbit.as_ref().map(|r| r.connected.load(std::sync::atomic::Ordering::Relaxed)),
        "depth": depth,
        "bytes": n(&s.bytes),
        "dead_letters": n(&s.dead),
        "delivering": q.delivering_count(),
        "oldest_age_ms": oldest.map(|o| crate::queued::now_ms().saturating_sub(o)),
        "accepted_total": n(&c.accepted),
        "refused_total": n(&c.refused),
        "deliveries_total": n(&c.deliveries),
        "retries_total": n(&c.retries),
        "done_total": n(&c.done),
        "failed_total": n(&c.failed),
        "dead_total": n(&c.dead),
        "commits_total": n(&s.commits),
        "committed_ops_total": n(&s.committed_ops),
        "batch_max": n(&s.batch_max_seen),
        "deliver_window": q.window.as_ref().map(|w| {
            let now = crate::queued::now_ms();
            json!({
                "schedule": w.cron().resolved(),
                "time_zone": w.cron().zone(),
                "duration_ms": w.duration_ms(),
                "open": w.is_open(now),
                "next_open_ms": w.next_open_ms(now),
                "closes_at_ms": w.closes_at_ms(now),
            })
        }),
    })
}

/// The number of the request an admin id names: its number (`QUEUE.N` or `N`, as the dead list shows it), or the
/// id its client got (`QUEUE.KEY` or `KEY`, KEY being 32 hex digits), looked up by key. An unknown key is a 404, and
/// anything else a 400, each naming the id.
fn number_of(q: &Queue, raw: &str) -> Result<u64, AdminError> {
    let rest = raw.strip_prefix(&format!("{}.", q.name)).unwrap_or(raw);
    if let Some(key) = nonstop_queue::Key::parse(&rest.to_ascii_lowercase()) {
        return match q.store.number(key) {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Err(missing(q, raw)),
            Err(e) => Err(err(StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
        };
    }
    match rest.parse() {
        Ok(n) if rest.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(err(
            StatusCode::BAD_REQUEST,
            format!(
                "{raw:?} is not a request id of queue {name:?}: give its number ({name}.42, as the dead list shows \
                 it) or the id its client got ({name}.KEY, KEY being 32 hex digits)",
                name = q.name
            ),
        )),
    }
}

fn missing(q: &Queue, id: &str) -> AdminError {
    err(StatusCode::NOT_FOUND, format!("no request {id:?} in queue {:?}", q.name))
}

fn limit_of(query: &str) -> usize {
    query.split('&').find_map(|kv| kv.strip_prefix("limit=")).and_then(|v| v.parse().ok()).unwrap_or(100).min(10_000)
}

async fn queue_call(q: &Queue, m: Method, rest: &[&str], query: &str) -> Result<Resp, AdminError> {
    let store_err = |e: nonstop_queue::StoreError| match e {
        nonstop_queue::StoreError::Missing(_) => err(StatusCode::NOT_FOUND, e.to_string()),
        nonstop_queue::StoreError::NotDead(_) => err(StatusCode::CONFLICT, e.to_string()),
        e => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    Ok(match (m, rest) {
        (Method::GET, []) => reply(StatusCode::OK, queue_json(q)),
        (Method::GET, ["requests", id]) => {
            let n = number_of(q, id)?;
            match q.status_json(n).map_err(store_err)? {
                Some(v) => reply(StatusCode::OK, v),
                None => return Err(missing(q, id)),
            }
        }
        (Method::GET, [list @ ("dead" | "failed")]) => {
            let dead = if *list == "dead" { q.store.dead(limit_of(query)) } else { q.store.failed(limit_of(query)) }
                .map_err(store_err)?;
            let items: Vec<Value> = dead
                .iter()
                .map(|(n, s)| {
                    let mut v = crate::queued::status_json(&q.public_id(*n), &q.name, s, false);
                    v["key"] = q.key_id(*n).into();
                    v
                })
                .collect();
            reply(StatusCode::OK, json!({ "queue": q.name, *list: items }))
        }
        // A dead letter or a failed request (the service answered a 4xx for good), sent again from the start.
        (Method::POST, ["dead" | "failed", id, "replay"]) => {
            let n = number_of(q, id)?;
            q.replay(n).await.map_err(|e| match e {
                nonstop_queue::StoreError::Missing(_) => missing(q, id),
                nonstop_queue::StoreError::NotDead(_) => err(
                    StatusCode::CONFLICT,
                    format!("request {id:?} of queue {:?} is neither a dead letter nor failed", q.name),
                ),
                e => store_err(e),
            })?;
            reply(StatusCode::OK, json!({ "id": q.public_id(n), "key": q.key_id(n), "status": "queued" }))
        }
        (Method::POST, ["purge"]) => {
            let purged = q.purge().await.map_err(store_err)?;
            reply(StatusCode::OK, json!({ "queue": q.name, "purged": purged }))
        }
        (_, rest) => {
            return Err(err(StatusCode::NOT_FOUND, format!("no admin endpoint /queues/{}/{}", q.name, rest.join("/"))))
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
                .map(|s| {
                    (
                        format!("service=\"{}\",server=\"{}\"", Escaped(&svc.name), Escaped(s.addr)),
                        Some(s),
                        svc.as_ref(),
                    )
                })
                .collect();
            rows.push((format!("service=\"{}\",server=\"none\"", Escaped(&svc.name)), None, svc.as_ref()));
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
    shared.files.render_requests(&mut out, "service=\"none\",server=\"files\"");
    out.push_str("# HELP nonstop_request_duration_seconds Time from request to response head.\n");
    out.push_str("# TYPE nonstop_request_duration_seconds histogram\n");
    for (labels, server, svc) in &all {
        match server {
            Some(s) => s.stats.render_latency(&mut out, labels),
            None => svc.unserved.render_latency(&mut out, labels),
        }
    }
    let gauges: [Gauge; 5] = [
        ("nonstop_in_flight_requests", "gauge", "Requests in flight on a server.", |s| f64::from(s.in_flight())),
        (
            "nonstop_server_limit",
            "gauge",
            "A server's concurrency limit in force (with admission.adaptive_limit; the ceiling when it is off).",
            |s| f64::from(s.limit()),
        ),
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
    type PoolSeries = (&'static str, &'static str, &'static str, fn(&crate::pool::Pool) -> f64);
    let pool_series: [PoolSeries; 8] = [
        ("nonstop_queue_length", "gauge", "Requests waiting in a service's admission queue.", |p| p.queued() as f64),
        ("nonstop_queued_total", "counter", "Requests that waited in the admission queue.", |p| {
            p.counters.queued.load(std::sync::atomic::Ordering::Relaxed) as f64
        }),
        ("nonstop_shed_total", "counter", "Requests answered 503 at once by load shedding.", |p| {
            p.counters.shed.load(std::sync::atomic::Ordering::Relaxed) as f64
        }),
        (
            "nonstop_queue_timeouts_total",
            "counter",
            "Requests that waited the longest allowed time and got 503.",
            |p| p.counters.queue_timeouts.load(std::sync::atomic::Ordering::Relaxed) as f64,
        ),
        ("nonstop_queue_wait_seconds_total", "counter", "Total time requests spent in the admission queue.", |p| {
            p.counters.queue_wait_us.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e6
        }),
        ("nonstop_retries_total", "counter", "Tries after the first.", |p| {
            p.counters.retries.load(std::sync::atomic::Ordering::Relaxed) as f64
        }),
        ("nonstop_retry_budget_exhausted_total", "counter", "Retries refused by the retry budget.", |p| {
            p.counters.budget_exhausted.load(std::sync::atomic::Ordering::Relaxed) as f64
        }),
        ("nonstop_ejections_total", "counter", "Passive outlier ejections.", |p| {
            p.counters.ejections.load(std::sync::atomic::Ordering::Relaxed) as f64
        }),
    ];
    for (name, kind, help, value) in pool_series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for svc in &services {
            let _ = writeln!(out, "{name}{{service=\"{}\"}} {}", Escaped(&svc.name), value(&svc.pool));
        }
    }
    let _ =
        writeln!(out, "# HELP nonstop_server_healthy Whether a server is up by active health checks and not ejected.");
    let _ = writeln!(out, "# TYPE nonstop_server_healthy gauge");
    for svc in &services {
        for m in svc.pool.members() {
            let ok = m.up && m.ejected_ms.is_none();
            let _ = writeln!(
                out,
                "nonstop_server_healthy{{service=\"{}\",server=\"{}\"}} {}",
                Escaped(&svc.name),
                Escaped(m.server.addr),
                u8::from(ok)
            );
        }
    }
    type QueueSeries = (&'static str, &'static str, &'static str, fn(&Queue) -> f64);
    let queue_series: [QueueSeries; 9] = [
        ("nonstop_durable_queue_depth", "gauge", "Requests waiting for delivery.", |q| load(&q.store.counts.depth)),
        ("nonstop_durable_queue_oldest_age_seconds", "gauge", "Age of the oldest request waiting for delivery.", |q| {
            q.store
                .oldest_queued_ms()
                .ok()
                .flatten()
                .map_or(0.0, |o| crate::queued::now_ms().saturating_sub(o) as f64 / 1000.0)
        }),
        ("nonstop_durable_queue_deliveries_total", "counter", "Delivery attempts.", |q| load(&q.counters.deliveries)),
        ("nonstop_durable_queue_retries_total", "counter", "Delivery attempts after the first.", |q| {
            load(&q.counters.retries)
        }),
        ("nonstop_durable_queue_dead_letters", "gauge", "Dead letters kept.", |q| load(&q.store.counts.dead)),
        ("nonstop_durable_queue_dead_total", "counter", "Requests that became dead letters.", |q| {
            load(&q.counters.dead)
        }),
        ("nonstop_durable_queue_accepted_total", "counter", "Requests persisted and answered 202.", |q| {
            load(&q.counters.accepted)
        }),
        ("nonstop_durable_queue_commits_total", "counter", "Store commits (each one fsync).", |q| {
            load(&q.store.counts.commits)
        }),
        (
            "nonstop_durable_queue_committed_ops_total",
            "counter",
            "Store operations written by those commits (divide by commits for the mean batch size).",
            |q| load(&q.store.counts.committed_ops),
        ),
    ];
    for (name, kind, help, value) in queue_series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for q in shared.queues.values() {
            let _ = writeln!(out, "{name}{{queue=\"{}\"}} {}", Escaped(&q.name), value(q));
        }
    }
    deploy_metrics(shared, &mut out);
    let mut r = Response::new(AdminBody::Full(Full::new(Bytes::from(out))));
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
    r
}
