//! The HTTP shell of the sample service: routing, the overload gate around each request, and graceful drain.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde_json::json;
use tokio::net::TcpListener;

use crate::gate::{Gate, Rejection};
use crate::orders::{parse_idempotency_key, parse_new_order, Invalid, BODY_BYTES_MAX};
use crate::stall::StallSchedule;
use crate::stats::Stats;
use crate::store::{Created, DbUrl, Store, StoreError, Writer};

/// Everything `nonstop app` is told on its command line, typed.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub listen: SocketAddr,
    pub version: String,
    /// Defaults to `app-PORT` once the port is known.
    pub instance: Option<String>,
    pub db: String,
    pub workers: usize,
    pub accept_queue: usize,
    pub queue_timeout: Duration,
    pub work: Duration,
    pub fail_rate: f64,
    pub stall: StallSchedule,
    pub ready_after: Duration,
    pub drain_timeout: Duration,
}

impl Default for AppConfig {
    fn default() -> AppConfig {
        AppConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            version: "v1".into(),
            instance: None,
            db: "sqlite://nonstop-app.db".into(),
            workers: 16,
            accept_queue: 64,
            queue_timeout: Duration::from_millis(30_000),
            work: Duration::ZERO,
            fail_rate: 0.0,
            stall: StallSchedule { every: Duration::ZERO, stall: Duration::ZERO },
            ready_after: Duration::ZERO,
            drain_timeout: Duration::from_millis(30_000),
        }
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("invalid arguments:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot open the database: {0}")]
    Store(#[from] StoreError),
}

impl AppConfig {
    /// Checks every setting and reports all problems at once.
    pub fn validate(&self) -> Result<DbUrl, AppError> {
        let mut errors = Vec::new();
        if self.workers == 0 {
            errors.push("--workers must be at least 1".to_string());
        }
        if !(0.0..=1.0).contains(&self.fail_rate) || self.fail_rate.is_nan() {
            errors.push(format!("--fail-rate must be between 0 and 1, got {}", self.fail_rate));
        }
        if self.stall.every.is_zero() != self.stall.stall.is_zero() {
            errors.push("--stall-every-ms and --stall-ms go together: set both, or neither".to_string());
        }
        if self.version.is_empty() || HeaderValue::from_str(&self.version).is_err() {
            errors.push(format!("--version must be non-empty visible text, got {:?}", self.version));
        }
        if let Some(i) = &self.instance {
            if i.is_empty() || HeaderValue::from_str(i).is_err() {
                errors.push(format!("--instance must be non-empty visible text, got {i:?}"));
            }
        }
        let db = DbUrl::parse(&self.db).map_err(|e| errors.push(format!("--db: {e}"))).ok();
        match db {
            Some(db) if errors.is_empty() => Ok(db),
            _ => Err(AppError::Invalid(errors)),
        }
    }
}

struct Shared {
    cfg: AppConfig,
    writer: Writer,
    store: Store,
    gate: Gate,
    stats: Stats,
    started: Instant,
    draining: AtomicBool,
    /// Requests being handled now, health and stats included.
    in_flight: AtomicUsize,
}

/// A bound, ready-to-serve instance of the sample service.
pub struct App {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl App {
    /// Validates the config, opens the database (creating the schema) and binds the listener.
    pub async fn bind(cfg: AppConfig) -> Result<App, AppError> {
        let db = cfg.validate()?;
        let listener =
            TcpListener::bind(cfg.listen).await.map_err(|source| AppError::Listen { addr: cfg.listen, source })?;
        let local = listener.local_addr().map_err(|source| AppError::Listen { addr: cfg.listen, source })?;
        let instance = cfg.instance.clone().unwrap_or_else(|| format!("app-{}", local.port()));
        let store = Store::open(db, cfg.workers.min(16)).await?;
        let gate = Gate::new(cfg.workers, cfg.accept_queue, cfg.queue_timeout);
        let writer = Writer { instance, version: cfg.version.clone() };
        let shared = Arc::new(Shared {
            cfg,
            writer,
            store,
            gate,
            stats: Stats::default(),
            started: Instant::now(),
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        });
        Ok(App { listener, shared })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener has an address")
    }

    pub fn instance(&self) -> &str {
        &self.shared.writer.instance
    }

    pub fn version(&self) -> &str {
        &self.shared.writer.version
    }

    pub fn db_kind(&self) -> &'static str {
        self.shared.store.url().kind()
    }

    /// Serves until `shutdown` resolves, then drains: stops accepting, reports not ready, lets in-flight
    /// requests finish (bounded by the drain timeout) and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let App { listener, shared } = self;
        let graceful = GracefulShutdown::new();
        let builder = auto::Builder::new(TokioExecutor::new());
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut shutdown => break,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning or dying.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let shared = shared.clone();
            let service = service_fn(move |req| handle(shared.clone(), req));
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }

        shared.draining.store(true, Ordering::SeqCst);
        drop(listener);
        let deadline = Instant::now() + shared.cfg.drain_timeout;
        tracing::info!(in_flight = shared.in_flight.load(Ordering::SeqCst), "draining");
        while shared.in_flight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
        if tokio::time::timeout(left, graceful.shutdown()).await.is_err() {
            tracing::warn!(in_flight = shared.in_flight.load(Ordering::SeqCst), "drain timeout: closing anyway");
        }
        tracing::info!("drained");
    }
}

struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

type Body = Full<Bytes>;

async fn handle(sh: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    sh.in_flight.fetch_add(1, Ordering::SeqCst);
    let _guard = InFlight(&sh.in_flight);
    let mut resp = route(&sh, req).await;
    let headers = resp.headers_mut();
    headers.insert("x-nonstop-version", HeaderValue::from_str(&sh.writer.version).expect("validated"));
    headers.insert("x-nonstop-instance", HeaderValue::from_str(&sh.writer.instance).expect("validated"));
    if sh.draining.load(Ordering::SeqCst) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    sh.stats.record_status(resp.status().as_u16());
    Ok(resp)
}

fn json_response(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json_response(status, json!({ "error": message.into() }))
}

fn invalid(status: StatusCode, e: Invalid) -> Response<Body> {
    json_response(status, json!({ "error": e.to_string(), "field": e.field }))
}

fn retry_later(message: impl Into<String>) -> Response<Body> {
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, message);
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut resp = error(StatusCode::METHOD_NOT_ALLOWED, format!("method not allowed here; allowed: {allow}"));
    resp.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

async fn route(sh: &Shared, req: Request<Incoming>) -> Response<Body> {
    // Health and stats bypass the worker pool (an operator must see an overloaded server), but not stalls.
    match req.uri().path() {
        "/health" | "/stats" if req.method() != Method::GET => return method_not_allowed("GET"),
        "/health" => {
            tokio::time::sleep(sh.cfg.stall.remaining(sh.started.elapsed())).await;
            return health(sh);
        }
        "/stats" => return stats(sh),
        _ => {}
    }

    let _ticket = match sh.gate.enter().await {
        Ok(ticket) => ticket,
        Err(Rejection::QueueFull) => {
            Stats::bump(&sh.stats.rejected_queue_full);
            return retry_later(format!(
                "overloaded: all {} workers busy and the accept queue of {} is full",
                sh.cfg.workers, sh.cfg.accept_queue
            ));
        }
        Err(Rejection::QueueTimeout) => {
            Stats::bump(&sh.stats.rejected_queue_timeout);
            return retry_later(format!(
                "queue timeout: waited {} ms in the accept queue without getting a worker",
                sh.gate.queue_timeout().as_millis()
            ));
        }
    };
    Stats::bump(&sh.stats.ran);
    tokio::time::sleep(sh.cfg.stall.remaining(sh.started.elapsed())).await;
    if !sh.cfg.work.is_zero() {
        tokio::time::sleep(sh.cfg.work).await;
    }
    if sh.cfg.fail_rate > 0.0 && fastrand::f64() < sh.cfg.fail_rate {
        Stats::bump(&sh.stats.injected_failures);
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("injected failure (--fail-rate {})", sh.cfg.fail_rate),
        );
    }

    let path = req.uri().path().to_string();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/") => json_response(
            StatusCode::OK,
            json!({ "version": sh.writer.version, "instance": sh.writer.instance, "pid": std::process::id() }),
        ),
        (_, "/") => method_not_allowed("GET"),
        (Method::POST, "/orders") => create_order(sh, req).await,
        (_, "/orders") => method_not_allowed("POST"),
        (Method::GET, "/orders/count") => match sh.store.count().await {
            Ok(n) => json_response(StatusCode::OK, json!({ "count": n })),
            Err(e) => store_error(e),
        },
        (Method::GET, p) if p.starts_with("/orders/") => get_order(sh, &p["/orders/".len()..]).await,
        (_, p) if p.starts_with("/orders/") => method_not_allowed("GET"),
        (_, p) => {
            error(StatusCode::NOT_FOUND, format!("no route for {p}; try GET /, POST /orders, GET /orders/{{id}}"))
        }
    }
}

fn health(sh: &Shared) -> Response<Body> {
    let base = json!({ "version": sh.writer.version, "instance": sh.writer.instance });
    let with = |status: &str| {
        let mut v = base.clone();
        v["status"] = status.into();
        v
    };
    if sh.draining.load(Ordering::SeqCst) {
        json_response(StatusCode::SERVICE_UNAVAILABLE, with("draining"))
    } else if sh.started.elapsed() < sh.cfg.ready_after {
        json_response(StatusCode::SERVICE_UNAVAILABLE, with("starting"))
    } else {
        json_response(StatusCode::OK, with("ready"))
    }
}

fn stats(sh: &Shared) -> Response<Body> {
    let (running, waiting) = sh.gate.occupancy();
    json_response(
        StatusCode::OK,
        json!({
            "version": sh.writer.version,
            "instance": sh.writer.instance,
            "pid": std::process::id(),
            "db": sh.store.url().kind(),
            "uptime_ms": sh.started.elapsed().as_millis() as u64,
            "draining": sh.draining.load(Ordering::SeqCst),
            "workers": sh.cfg.workers,
            "accept_queue": sh.cfg.accept_queue,
            "queue_timeout_ms": sh.cfg.queue_timeout.as_millis() as u64,
            "running": running,
            "waiting": waiting,
            "requests": sh.stats.to_json(),
        }),
    )
}

fn store_error(e: StoreError) -> Response<Body> {
    tracing::warn!(error = %e, "database call failed");
    if e.retryable() {
        retry_later(e.to_string())
    } else {
        error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
    }
}

async fn create_order(sh: &Shared, req: Request<Incoming>) -> Response<Body> {
    let key = match req.headers().get("idempotency-key").map(|v| parse_idempotency_key(v.as_bytes())) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(e)) => return invalid(StatusCode::BAD_REQUEST, e),
    };
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_BYTES_MAX as u64) {
        return too_large();
    }
    let body = match Limited::new(req.into_body(), BODY_BYTES_MAX).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => return too_large(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("could not read the request body: {e}")),
    };
    let order = match parse_new_order(&body) {
        Ok(o) => o,
        Err(e) => return invalid(StatusCode::BAD_REQUEST, e),
    };
    match sh.store.create(order, key.clone(), &sh.writer).await {
        Ok(Created::New(o)) => {
            Stats::bump(&sh.stats.orders_created);
            created(&o, false)
        }
        Ok(Created::Replayed(o)) => {
            Stats::bump(&sh.stats.orders_replayed);
            created(&o, true)
        }
        Ok(Created::KeyConflict(first)) => json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({
                "error": format!(
                    "Idempotency-Key {:?} was already used for order {} with a different body",
                    key.unwrap_or_default(), first.id
                ),
                "field": "Idempotency-Key",
            }),
        ),
        Err(e) => store_error(e),
    }
}

fn too_large() -> Response<Body> {
    error(StatusCode::PAYLOAD_TOO_LARGE, format!("request body is larger than {BODY_BYTES_MAX} bytes"))
}

fn created(o: &crate::orders::Order, replayed: bool) -> Response<Body> {
    let mut resp = json_response(StatusCode::CREATED, serde_json::to_value(o).expect("order serialises"));
    let location = HeaderValue::from_str(&format!("/orders/{}", o.id)).expect("digits are a valid header");
    resp.headers_mut().insert(header::LOCATION, location);
    if replayed {
        resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp
}

async fn get_order(sh: &Shared, raw_id: &str) -> Response<Body> {
    let Ok(id) = raw_id.parse::<i64>() else {
        return error(StatusCode::NOT_FOUND, format!("no order {raw_id:?}: order ids are integers"));
    };
    match sh.store.get(id).await {
        Ok(Some(o)) => json_response(StatusCode::OK, serde_json::to_value(o).expect("order serialises")),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no order {id}")),
        Err(e) => store_error(e),
    }
}
