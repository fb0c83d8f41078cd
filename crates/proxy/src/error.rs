//! Proxy errors, classified where they happen: which side failed, whether a retry on another server is safe, and
//! the status and message the client gets.

use http::StatusCode;

/// Which side of the proxy a failure belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client sent something we refuse.
    Downstream,
    /// A server failed or could not be reached.
    Upstream,
    /// Nothing could be tried (no route, no server).
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for {method} {host}{path}")]
    NoRoute { method: String, host: String, path: String },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request head is larger than the listener's header_bytes_max of {0} bytes")]
    HeadTooLarge(usize),
    #[error("method {0} is not allowed on this route")]
    MethodNotAllowed(String),
    #[error("client address {client} is {why} on this route")]
    Forbidden { client: std::net::IpAddr, why: String },
    #[error("rate limit of {rate} exceeded for this {key}; retry after {retry_after_s} s")]
    RateLimited { rate: String, key: &'static str, retry_after_s: u64 },
    #[error("request body is larger than the route's body_bytes_max of {0} bytes")]
    BodyTooLarge(u64),
    #[error("no server of service {0:?} is available")]
    NoServer(String),
    #[error("reading the request body failed: {0}")]
    ClientBody(std::io::Error),
    #[error("the request body did not arrive within {ms} ms")]
    ClientBodyTimeout { ms: u128 },
    #[error("service {service:?} is overloaded: {why}; retry later")]
    Shed { service: String, why: String },
    #[error("no server of service {service:?} became ready within {waited_ms} ms (the request waited in the queue)")]
    QueueTimeout { service: String, waited_ms: u128 },
    #[error("no server of service {service:?} could take the request (it waited {waited_ms} ms in the queue); last error: {last}")]
    NoServerLeft { service: String, waited_ms: u128, last: Box<ProxyError> },
    #[error("queue {queue:?} cannot take the request: {why}; retry later")]
    QueueRefused { queue: String, why: String },
    #[error("request deadline of {ms} ms passed before a server answered")]
    Deadline { ms: u128 },
    #[error("connect to {addr} failed: {source}")]
    Connect { addr: std::net::SocketAddr, source: std::io::Error },
    #[error("connect timeout: {addr} did not accept a connection within {ms} ms")]
    ConnectTimeout { addr: std::net::SocketAddr, ms: u128 },
    #[error("response timeout: {addr} sent no response head within {ms} ms")]
    ResponseTimeout { addr: std::net::SocketAddr, ms: u128 },
    /// The server failed the exchange. `sent` is false when hyper hands the request back unsent.
    #[error("server {addr} failed: {source}")]
    Upstream { addr: std::net::SocketAddr, sent: bool, source: hyper::Error },
    /// The server failed the exchange on the proxy's own HTTP/1.1 client. `sent` is false when nothing of the
    /// request was written.
    #[error("server {addr} failed: {source}")]
    /// `stale`: a reused connection closed with no response byte (see [`ProxyError::server_gone`]). `dropped`: a
    /// fresh connection did so.
    UpstreamIo { addr: std::net::SocketAddr, sent: bool, stale: bool, dropped: bool, source: std::io::Error },
    #[error("HTTP handshake with {addr} failed: {source}")]
    Handshake { addr: std::net::SocketAddr, source: hyper::Error },
    #[error("{why}")]
    Unauthorized { why: nonstop_guard::basic::Refusal, challenge: http::HeaderValue },
    /// A route of static files has no file for the request (or could not read it).
    #[error("{0}")]
    Files(nonstop_files::Error),
}

impl ProxyError {
    pub fn side(&self) -> Side {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::HeadTooLarge(_)
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::Forbidden { .. }
            | ProxyError::RateLimited { .. }
            | ProxyError::Unauthorized { .. }
            | ProxyError::BodyTooLarge(_)
            | ProxyError::ClientBody(_)
            | ProxyError::ClientBodyTimeout { .. } => Side::Downstream,
            ProxyError::NoRoute { .. }
            | ProxyError::NoServer(_)
            | ProxyError::Shed { .. }
            | ProxyError::QueueTimeout { .. }
            | ProxyError::NoServerLeft { .. }
            | ProxyError::QueueRefused { .. }
            | ProxyError::Deadline { .. }
            | ProxyError::Files(nonstop_files::Error::Io { .. }) => Side::Internal,
            ProxyError::Files(_) => Side::Downstream,
            _ => Side::Upstream,
        }
    }

    /// True when the request provably never reached a server, so any method may be sent to another one.
    pub fn never_reached_server(&self) -> bool {
        match self {
            ProxyError::Connect { .. } | ProxyError::ConnectTimeout { .. } | ProxyError::Handshake { .. } => true,
            ProxyError::Upstream { sent, .. } | ProxyError::UpstreamIo { sent, .. } => !sent,
            _ => false,
        }
    }

    /// True when the server likely went away rather than failed the request: it never got it, or a reused
    /// connection closed before one byte of answer. A request safe to repeat is retried without counting the try,
    /// and may wait for a server to come back.
    pub fn server_gone(&self) -> bool {
        self.never_reached_server() || matches!(self, ProxyError::UpstreamIo { stale: true, .. })
    }

    /// A fresh connection closed with no answer: either the server died (then its port refuses connections), or
    /// the server dropped this request (a request that kills servers must not be retried on every one).
    pub fn dropped(&self) -> bool {
        matches!(self, ProxyError::UpstreamIo { dropped: true, .. })
    }

    /// True when the server is to blame (a connect error, a timeout, a broken exchange): passive health counts it.
    pub fn server_failed(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. }
                | ProxyError::ConnectTimeout { .. }
                | ProxyError::ResponseTimeout { .. }
                | ProxyError::Upstream { .. }
                | ProxyError::UpstreamIo { .. }
                | ProxyError::Handshake { .. }
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::Files(e) => e.status(),
            ProxyError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::HeadTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::NoServer(_)
            | ProxyError::Shed { .. }
            | ProxyError::QueueTimeout { .. }
            | ProxyError::NoServerLeft { .. }
            | ProxyError::QueueRefused { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::ClientBody(_) | ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::ClientBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ConnectTimeout { .. } | ProxyError::ResponseTimeout { .. } | ProxyError::Deadline { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::Connect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamIo { .. }
            | ProxyError::Handshake { .. } => StatusCode::BAD_GATEWAY,
        }
    }
}
