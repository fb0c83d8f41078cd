//! The nonstop config file: TOML walked against one key schema ([`schema::SCHEMA`]) into a typed, validated
//! [`Config`]. Every error is collected, with its line, before anything is returned.

mod pipeline;
pub mod schema;
mod walk;

pub use pipeline::{
    valid_pipeline_name, Action, Concurrency, Pipeline, PipelineFile, PipelineKind, PostOn, PostStep, ScheduleSpec,
    Secret, SecretSource, Source, Stage, Step, When, TRIGGERS,
};

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use nonstop_guard::IpNet;

pub use walk::{ConfigError, ConfigErrors};
use walk::{Cx, Table};

/// The whole validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listeners: Vec<Listener>,
    pub routes: Vec<Route>,
    pub services: BTreeMap<String, Service>,
    pub queues: BTreeMap<String, Queue>,
    pub admin: Option<Admin>,
    pub access_log: AccessLog,
    pub state_dir: PathBuf,
    /// SSH hosts by name (`[hosts.NAME]`).
    pub hosts: BTreeMap<String, Host>,
    /// Pipelines and jobs by name (`[pipelines.NAME]`, `[jobs.NAME]`: one namespace).
    pub pipelines: BTreeMap<String, Pipeline>,
    /// How servers given by name are resolved (`[resolver]`).
    pub resolver: Resolver,
}

/// How servers given by name are resolved, and how often again (`[resolver]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    /// DNS servers to ask; empty: those of /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    pub interval: Duration,
    pub ttl_min: Duration,
    pub timeout: Duration,
}

/// Whether `s` is a DNS host name (RFC 1123 labels of letters, digits and hyphens), and not an IPv4 address.
pub fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
        // An all-digit last label is an IPv4 address mistyped, not a name.
        && !s.rsplit('.').next().is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
}

/// One SSH host (`[hosts.NAME]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub name: String,
    /// The IP or name, without brackets.
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The private key; `state_dir/ssh/id_ed25519` unless configured.
    pub identity: PathBuf,
    /// The release directory on the host, possibly starting with `~/`.
    pub dir: String,
    pub connect_timeout: Duration,
    pub max_startups: u32,
    pub max_sessions: u32,
}

/// The default SSH port.
pub const SSH_PORT: u16 = 22;

/// Splits `"IP or name:port"` into host and port (22 when absent). IPv6 with a port is bracketed: `[::1]:2222`.
pub fn parse_host_address(raw: &str) -> Result<(String, u16), String> {
    let bad = || format!("{raw:?}: expected \"IP or name:port\", such as \"10.0.0.5:22\" or \"web1.example.com\"");
    let port_of = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0);
    let (host, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (h, tail) = rest.split_once(']').ok_or_else(bad)?;
        let port = match tail {
            "" => SSH_PORT,
            t => port_of(t.strip_prefix(':').ok_or_else(bad)?).ok_or_else(bad)?,
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad());
        }
        (h.to_string(), port)
    } else if raw.parse::<std::net::Ipv6Addr>().is_ok() {
        (raw.to_string(), SSH_PORT)
    } else {
        match raw.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), port_of(p).ok_or_else(bad)?),
            None => (raw.to_string(), SSH_PORT),
        }
    };
    let name_ok = |h: &str| {
        !h.is_empty()
            && h.len() <= 253
            && !h.starts_with('-')
            && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_' || b == b':')
    };
    if !name_ok(&host) {
        return Err(bad());
    }
    Ok((host, port))
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    pub name: String,
    pub listen: SocketAddr,
    pub tls: Option<Tls>,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub header_bytes_max: usize,
    pub header_count_max: usize,
    /// Proxies whose `X-Forwarded-For` names the client (for routes' access lists and rate limits).
    pub trusted_proxies: Vec<IpNet>,
    /// The header that carries each request's id (lower-case), kept when the client sent a sound one, made
    /// otherwise; `None`: no request ids.
    pub request_id_header: Option<String>,
    /// `Strict-Transport-Security` on every answer (TLS listeners only).
    pub hsts: Option<Hsts>,
    /// Answer every request with 308 to the same URL on https (plain listeners only).
    pub redirect_https: bool,
    /// Every connection starts with a PROXY protocol header naming the client (from a load balancer in front).
    pub proxy_protocol: bool,
}

/// HSTS (RFC 6797) as a listener sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hsts {
    pub max_age_s: u64,
    pub subdomains: bool,
    pub preload: bool,
}

impl Hsts {
    /// The header's value.
    pub fn value(&self) -> String {
        let mut v = format!("max-age={}", self.max_age_s);
        if self.subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.preload {
            v.push_str("; preload");
        }
        v
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The default certificate chain (for clients that send no name, or a name no other certificate has).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// More certificates, each chosen for the names it is valid for (SNI).
    pub sni: Vec<CertFiles>,
    /// The oldest TLS version offered.
    pub min_version: TlsVersion,
    /// How often the certificate and key files are checked for a change (then loaded, for new connections);
    /// zero: only on reload (SIGHUP).
    pub watch_interval: Duration,
}

/// A certificate chain and its key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

impl Tls {
    /// Every certificate and key file, the default's first.
    pub fn files(&self) -> Vec<&std::path::Path> {
        let mut out = vec![self.cert.as_path(), self.key.as_path()];
        for c in &self.sni {
            out.push(&c.cert);
            out.push(&c.key);
        }
        out
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The service that serves it; `None` for a route of static files ([`Route::files`]).
    pub service: Option<String>,
    /// Lower-case, without port.
    pub host: Option<String>,
    pub path_prefix: String,
    /// Upper-case method names; `None` matches any method.
    pub methods: Option<BTreeSet<String>>,
    pub body_bytes_max: u64,
    /// The durable queue its requests go through, if any.
    pub queue: Option<String>,
    /// Who may use it, by client address; `None`: everyone.
    pub access: Option<nonstop_guard::AccessList>,
    pub rate_limit: Option<RateLimit>,
    /// The path the server gets, or a redirect.
    pub rewrite: nonstop_rewrite::PathRewrite,
    pub request_headers: nonstop_rewrite::HeaderRules,
    pub response_headers: nonstop_rewrite::HeaderRules,
    pub compress: Option<Compress>,
    /// Static files it serves instead of a service.
    pub files: Option<Files>,
    /// Who may use it, by user name and password.
    pub basic_auth: Option<BasicAuth>,
    /// Who may use it, as another service decides.
    pub forward_auth: Option<ForwardAuth>,
}

/// A route's forward authentication (`[routes.forward_auth]`): each request is first asked of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardAuth {
    pub service: String,
    /// The path (and query) asked, `/` by default.
    pub path: String,
    /// Headers of the service's 2xx answer set on the request the route's server gets (lower-case).
    pub copy_headers: Vec<String>,
}

/// A route's HTTP Basic authentication (`[routes.basic_auth]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasicAuth {
    pub realm: String,
    /// From `users` and `users_file` (a name in both: `users` wins).
    pub users: nonstop_guard::basic::Users,
    /// Credentials remembered after they pass, at most.
    pub verified_max: usize,
    /// Hashes verified at once, at most.
    pub verifying_max: usize,
}

/// A route's static files (`[routes.files]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Files {
    /// An existing directory (relative to where nonstop runs, when relative).
    pub root: PathBuf,
    /// File names tried, in order, for a path that names a directory.
    pub index: Vec<String>,
    /// Answer with a `.zst`, `.br` or `.gz` sibling the client accepts.
    pub precompressed: bool,
    /// Serve names that start with a dot.
    pub hidden: bool,
}

/// A route's response compression (`[routes.compress]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compress {
    pub settings: nonstop_compress::Settings,
    /// Responses compressed at once on the route, at most; past it they go as they are.
    pub streams_max: usize,
}

/// A route's rate limit (`[routes.rate_limit]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    pub rate: nonstop_guard::Rate,
    pub key: RateKey,
    pub keys_max: usize,
}

/// What a rate limit counts requests by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// The client address (see [`Listener::trusted_proxies`]).
    Client,
    /// A header's value (lower-case name); a request without it counts by its client address.
    Header(String),
}

/// A durable request queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    pub name: String,
    /// `None`: the embedded store delivers; `Some(url)`: RabbitMQ holds the queue.
    pub rabbitmq: Option<String>,
    /// The service its requests are delivered to (the service of the routes that use it).
    pub service: String,
    pub path: PathBuf,
    pub length_max: u64,
    pub bytes_max: u64,
    pub batch_max: usize,
    pub concurrency: usize,
    pub attempts_max: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Whether the public status of a request shows the service's answer body.
    pub status_body: bool,
    /// Bytes of request bodies being received at once for this queue, across connections, at most.
    pub body_bytes_in_flight_max: u64,
    /// Statuses of finished (done or failed) requests kept at most; the oldest go first.
    pub finished_keep_max: u64,
    /// How long the status of a finished request is kept.
    pub finished_keep: Duration,
    /// Deliveries happen only while this window is open; `None`: always.
    pub deliver_window: Option<WindowSpec>,
}

/// A delivery window: opens at each fire time of a cron, open for `duration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowSpec {
    pub cron: String,
    pub time_zone: String,
    pub duration: Duration,
}

/// Longest queue name.
pub const QUEUE_NAME_CHARS_MAX: usize = 64;

/// Whether `name` may name a queue: 1 to [`QUEUE_NAME_CHARS_MAX`] ASCII letters, digits, `_` and `-`. It names
/// the store's file (`NAME.redb`) and the broker's queues, so it must not be a path.
pub fn valid_queue_name(name: &str) -> bool {
    (1..=QUEUE_NAME_CHARS_MAX).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub servers: Vec<ServerSpec>,
    /// Servers given by host name: each address the name resolves to is a server, with these settings.
    pub named: Vec<NamedServer>,
    pub balance: Balance,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_idle_max: usize,
    pub protocol: Protocol,
    pub hide_identity: bool,
    pub request_timeout: Duration,
    pub slow_start: Duration,
    pub drain_deadline: Duration,
    pub health: Health,
    pub eject: Eject,
    pub retry: Retry,
    pub admission: Admission,
    /// The supervised instances that serve this service, when the proxy runs them.
    pub app: Option<App>,
}

/// How to run and deploy the instances of a service (`[services.NAME.app]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// How instances run.
    pub driver: AppDriver,
    /// The process driver's command (empty with the docker driver).
    pub command: String,
    pub version: String,
    pub env: Vec<(String, String)>,
    pub dir: Option<PathBuf>,
    /// Inclusive port range.
    pub ports: (u16, u16),
    pub count: u32,
    pub health_path: String,
    pub ready_passes: u32,
    pub ready_interval: Duration,
    pub ready_timeout: Duration,
    pub strategy: Strategy,
    pub max_surge: u32,
    pub max_unavailable: u32,
    /// Rising percentages, the last one 100.
    pub canary_steps: Vec<u32>,
    pub step: Duration,
    pub soak: Duration,
    pub error_rate_margin_percent: u32,
    pub p99_max_percent: u32,
    pub p99_slack: Duration,
    pub analysis_requests_min: u32,
    pub drain_timeout: Duration,
    pub stop_grace: Duration,
    pub restart_backoff_base: Duration,
    pub restart_backoff_max: Duration,
    /// An instance log larger than this is rotated.
    pub log_bytes_max: u64,
    /// Rotated instance logs kept (`.1` to `.N`).
    pub log_files_max: u32,
}

/// How the instances of an app service run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppDriver {
    /// Child processes of the proxy, from `command`.
    Process,
    /// Containers on the local Docker engine.
    Docker(DockerApp),
    /// Processes on SSH hosts, `count` on each.
    Ssh(SshApp),
}

impl AppDriver {
    pub fn as_str(&self) -> &'static str {
        match self {
            AppDriver::Process => "process",
            AppDriver::Docker(_) => "docker",
            AppDriver::Ssh(_) => "ssh",
        }
    }
}

/// The docker driver's part of an app section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerApp {
    /// With `{version}` still in it.
    pub image: String,
    pub args: Vec<String>,
    pub container_port: u16,
    /// `HOST:CONTAINER[:ro]`, both absolute.
    pub volumes: Vec<String>,
    pub labels: Vec<(String, String)>,
    /// Replaced versions whose stopped containers are kept (at least 1).
    pub keep_versions: u32,
    /// `[hosts.NAME]` whose Docker engines run the containers, `count` on each, reached over SSH; empty: the
    /// local engine.
    pub hosts: Vec<String>,
}

/// The ssh driver's part of an app section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshApp {
    /// Names of `[hosts.NAME]` tables, in order; every one runs `count` instances.
    pub hosts: Vec<String>,
    /// The file or directory shipped to each host once per version (`{version}` still in it); `None`: nothing is
    /// shipped and instances run in the host's dir.
    pub release: Option<PathBuf>,
    /// Releases kept on each host (at least 2: the one serving and the one before it).
    pub keep_releases: u32,
}

/// Checks a bind mount: `HOST:CONTAINER` or `HOST:CONTAINER:ro`/`:rw`, both absolute paths.
pub fn check_volume(v: &str) -> Result<(), String> {
    let parts: Vec<&str> = v.split(':').collect();
    let ok = match parts.as_slice() {
        [h, c] => h.starts_with('/') && c.starts_with('/'),
        [h, c, mode] => h.starts_with('/') && c.starts_with('/') && (*mode == "ro" || *mode == "rw"),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{v:?}: expected \"/host/dir:/container/dir\" (absolute paths), optionally with \":ro\""))
    }
}

/// How a deploy moves traffic from the old version to the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Rolling,
    BlueGreen,
    Canary,
}

impl Strategy {
    pub fn parse(s: &str) -> Result<Strategy, String> {
        match s {
            "rolling" => Ok(Strategy::Rolling),
            "blue-green" => Ok(Strategy::BlueGreen),
            "canary" => Ok(Strategy::Canary),
            other => Err(format!("{other:?}: expected \"rolling\", \"blue-green\" or \"canary\"")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Rolling => "rolling",
            Strategy::BlueGreen => "blue-green",
            Strategy::Canary => "canary",
        }
    }
}

/// Checks canary steps: rising percentages from 1 to 100, the last one 100.
pub fn check_canary_steps(steps: &[u32]) -> Result<(), String> {
    if steps.is_empty() {
        return Err("at least one step is required".into());
    }
    if steps.iter().any(|&s| s == 0 || s > 100) {
        return Err(format!("{steps:?}: every step is a percentage from 1 to 100"));
    }
    if steps.windows(2).any(|w| w[0] >= w[1]) {
        return Err(format!("{steps:?}: steps must rise"));
    }
    if steps.last() != Some(&100) {
        return Err(format!("{steps:?}: the last step must be 100"));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSpec {
    pub addr: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    /// Overrides the service's `admission.server_in_flight_max`.
    pub in_flight_max: Option<u32>,
}

/// A server given by host name (`addr = "app.internal:8080"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedServer {
    /// Lower-case.
    pub host: String,
    pub port: u16,
    pub weight: u32,
    pub backup: bool,
    pub in_flight_max: Option<u32>,
}

/// Active health checks of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub enabled: bool,
    /// `None`: a TCP connect check.
    pub path: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// Inclusive range of passing statuses.
    pub expect_status: (u16, u16),
}

/// Passive outlier ejection of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Eject {
    pub enabled: bool,
    pub consecutive_failures: u32,
    pub base: Duration,
    pub max: Duration,
    pub max_percent: u32,
}

/// Retry policy of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    pub attempts_max: u32,
    pub on_status: Vec<u16>,
    pub budget_percent: u32,
    pub budget_min_per_s: u32,
    pub body_bytes_max: u64,
    pub add_idempotency_key: bool,
}

/// Admission control of one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub server_in_flight_max: u32,
    /// Learn each server's concurrency limit (under `server_in_flight_max`) from its latency and overload answers.
    pub adaptive_limit: bool,
    pub queue_length_max: usize,
    pub queue_wait_max: Duration,
    pub overload_wait_max: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    Weighted,
    LeastInflight,
    PeakEwma,
    Hash(HashOn),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// Lower-case header name.
    Header(String),
    Cookie(String),
    ClientIp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    H2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    pub enabled: bool,
    /// `enabled` is written in the config: the log goes to standard output even when that is a terminal (which
    /// otherwise gets no access log).
    pub enabled_explicitly: bool,
    /// `None` is standard output.
    pub path: Option<PathBuf>,
    pub format: LogFormat,
    pub flush_ms: u64,
    pub success_sample_percent: u32,
}

/// The access log's line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    /// nginx's `combined`.
    Combined,
}

/// Largest accepted server weight.
pub const WEIGHT_MAX: u32 = 10_000;

const BALANCES: &str = "round_robin, weighted, least_inflight, peak_ewma or hash";

impl Balance {
    pub fn parse(raw: &str, hash_on: Option<HashOn>) -> Result<Balance, String> {
        Ok(match raw {
            "round_robin" => Balance::RoundRobin,
            "weighted" => Balance::Weighted,
            "least_inflight" => Balance::LeastInflight,
            "peak_ewma" => Balance::PeakEwma,
            "hash" => Balance::Hash(hash_on.ok_or("balance = \"hash\" needs hash_on")?),
            other => return Err(format!("unknown balance {other:?}: expected {BALANCES}")),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Balance::RoundRobin => "round_robin",
            Balance::Weighted => "weighted",
            Balance::LeastInflight => "least_inflight",
            Balance::PeakEwma => "peak_ewma",
            Balance::Hash(_) => "hash",
        }
    }
}

impl HashOn {
    pub fn parse(raw: &str) -> Result<HashOn, String> {
        if raw == "client_ip" {
            return Ok(HashOn::ClientIp);
        }
        match raw.split_once(':') {
            Some(("header", name)) if !name.is_empty() => Ok(HashOn::Header(name.to_ascii_lowercase())),
            Some(("cookie", name)) if !name.is_empty() => Ok(HashOn::Cookie(name.to_string())),
            _ => Err(format!("hash_on {raw:?}: expected \"header:NAME\", \"cookie:NAME\" or \"client_ip\"")),
        }
    }
}

impl Config {
    /// Parses and validates a config file's text, reporting every error with its line.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let root = walk::parse_toml(text)?;
        let cx = Cx::new(text);
        let config = parse_root(&cx, Table::new(&cx, "", String::new(), root.get_ref(), 1));
        cx.finish(config)
    }

    /// The config that quick mode (`nonstop serve --listen ... --to ...`) runs: built as TOML text and parsed
    /// like a file, so that both have the same defaults and checks. Its errors name the flags they come from (`--to "nothing": ...`), not lines of that text.
    pub fn quick(listen: &str, to: &[String], balance: &str, admin: Option<&str>) -> Result<Config, QuickErrors> {
        Config::parse(&quick_toml(listen, to, balance, admin)).map_err(|errors| {
            QuickErrors(errors.0.iter().map(|e| quick_error(e, listen, to, balance, admin)).collect())
        })
    }
}

/// The problems of a quick-mode command line, each naming its flag and value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct QuickErrors(pub Vec<String>);

impl std::fmt::Display for QuickErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.len();
        writeln!(f, "{n} error{} in the quick-mode flags:", if n == 1 { "" } else { "s" })?;
        for e in &self.0 {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// One error of the quick-mode config, told as the flag it comes from.
fn quick_error(e: &ConfigError, listen: &str, to: &[String], balance: &str, admin: Option<&str>) -> String {
    let flag = |name: &str, value: &str| format!("{name} {value:?}: {}", e.message);
    let path = e.path.as_str();
    if path.starts_with("listeners") {
        flag("--listen", listen)
    } else if let Some(rest) = path.strip_prefix("services.default.servers") {
        let index = rest.strip_prefix('[').and_then(|r| r.split(']').next()).and_then(|i| i.parse::<usize>().ok());
        match index.and_then(|i| to.get(i)) {
            Some(value) => flag("--to", value),
            None => format!("--to: {}", e.message),
        }
    } else if path == "services.default.balance" || path == "services.default.hash_on" {
        flag("--balance", balance)
    } else if path.starts_with("admin") {
        flag("--admin", admin.unwrap_or(""))
    } else if path.is_empty() {
        e.message.clone()
    } else {
        format!("{path}: {}", e.message)
    }
}

/// The TOML text of a quick-mode config.
pub fn quick_toml(listen: &str, to: &[String], balance: &str, admin: Option<&str>) -> String {
    let q = |s: &str| toml_quote(s);
    let mut text = format!("[[listeners]]\nlisten = {}\n\n[[routes]]\nservice = \"default\"\n\n", q(listen));
    let (balance, hash_on) = match balance.split_once('=') {
        Some(("hash", on)) => ("hash", Some(on)),
        _ => (balance, None),
    };
    text.push_str(&format!("[services.default]\nbalance = {}\n", q(balance)));
    if let Some(on) = hash_on {
        text.push_str(&format!("hash_on = {}\n", q(on)));
    }
    let servers: Vec<String> = to.iter().map(|a| format!("{{ addr = {} }}", q(a))).collect();
    text.push_str(&format!("servers = [{}]\n", servers.join(", ")));
    if let Some(admin) = admin {
        text.push_str(&format!("\n[admin]\nlisten = {}\n", q(admin)));
    }
    text
}

fn toml_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn parse_root(cx: &Cx, t: Table<'_, '_>) -> Option<Config> {
    let listeners: Vec<Listener> =
        t.array_of_tables("listeners", "listeners[]").into_iter().filter_map(parse_listener).collect();
    let state_dir = t.string("state_dir").map(PathBuf::from);
    let resolver = t.table_or_empty("resolver", "resolver").and_then(parse_resolver);
    let mut hosts = BTreeMap::new();
    let mut host_names = BTreeSet::new();
    for (name, table) in t.table_of_tables("hosts", "hosts.NAME") {
        host_names.insert(name.clone());
        if let Some(h) = parse_host(name.clone(), table, state_dir.as_deref()) {
            hosts.insert(name, h);
        }
    }
    let mut services = BTreeMap::new();
    let mut service_names = BTreeSet::new();
    let services_line = t.line_of_key("services");
    for (name, table) in t.table_of_tables("services", "services.NAME") {
        service_names.insert(name.clone());
        if let Some(s) = parse_service(cx, name.clone(), table, &host_names) {
            services.insert(name, s);
        }
    }
    let mut queues = BTreeMap::new();
    let mut queue_lines = BTreeMap::new();
    let mut in_flight_lines = BTreeMap::new();
    for (name, table) in t.table_of_tables("queues", "queues.NAME") {
        queue_lines.insert(name.clone(), table.line());
        in_flight_lines.insert(name.clone(), table.line_of_key("body_bytes_in_flight_max"));
        if !valid_queue_name(&name) {
            cx.error(
                table.line(),
                &format!("queues.{name}"),
                format!(
                    "{name:?} is not a queue name: 1 to {QUEUE_NAME_CHARS_MAX} characters of [A-Za-z0-9_-] (it \
                     names the store's file, NAME.redb)"
                ),
            );
        }
        if let Some(q) = parse_queue(name.clone(), table) {
            queues.insert(name, q);
        }
    }
    let queue_names: BTreeSet<String> = queue_lines.keys().cloned().collect();
    let mut routes_of_queue: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut body_max_of_queue: BTreeMap<String, u64> = BTreeMap::new();
    let routes: Vec<Route> = t
        .array_of_tables("routes", "routes[]")
        .into_iter()
        .filter_map(|r| {
            let route = parse_route(r, t.has("services").then_some(&service_names), &queue_names)?;
            if let Some(q) = &route.queue {
                routes_of_queue.entry(q.clone()).or_default().extend(route.service.clone());
                let max = body_max_of_queue.entry(q.clone()).or_default();
                *max = (*max).max(route.body_bytes_max);
            }
            Some(route)
        })
        .collect();
    for (name, line) in &queue_lines {
        let path = format!("queues.{name}");
        match routes_of_queue.get(name).map(|s| s.iter().collect::<Vec<_>>()) {
            None => cx.error(*line, &path, "no route uses this queue (set queue = \"NAME\" on a route)"),
            Some(services) if services.len() > 1 => cx.error(
                *line,
                &path,
                format!("routes of several services use this queue ({:?}); a queue delivers to one service", services),
            ),
            Some(services) => {
                if let Some(q) = queues.get_mut(name) {
                    q.service = services[0].clone();
                }
            }
        }
        let route_max = body_max_of_queue.get(name).copied().unwrap_or(0);
        if let Some(q) = queues.get(name).filter(|q| q.body_bytes_in_flight_max < route_max) {
            cx.error(
                in_flight_lines[name],
                &format!("{path}.body_bytes_in_flight_max"),
                format!(
                    "{} bytes is less than the body_bytes_max of a route using this queue ({route_max} bytes): such \
                     a body could never be received",
                    q.body_bytes_in_flight_max
                ),
            );
        }
    }
    let mut pipelines = BTreeMap::new();
    {
        let parsed: BTreeSet<String> = services.keys().cloned().collect();
        let app_services: BTreeSet<String> =
            services.values().filter(|s| s.app.is_some()).map(|s| s.name.clone()).collect();
        let known = pipeline::Known {
            services: &service_names,
            parsed: &parsed,
            app_services: &app_services,
            host_names: &host_names,
            hosts: &hosts,
        };
        let mut lines = BTreeMap::new();
        for (name, table) in t.table_of_tables("pipelines", "pipelines.NAME") {
            lines.insert(name.clone(), table.line());
            if let Some(p) = pipeline::parse_pipeline(name.clone(), table, &known) {
                pipelines.insert(name, p);
            }
        }
        for (name, table) in t.table_of_tables("jobs", "jobs.NAME") {
            if lines.contains_key(&name) {
                table.invalid_table(format!("{name:?} names a pipeline too: pipelines and jobs share one namespace"));
                continue;
            }
            lines.insert(name.clone(), table.line());
            if let Some(p) = pipeline::parse_job(name.clone(), table, &known) {
                pipelines.insert(name, p);
            }
        }
        for p in pipelines.values() {
            for a in &p.after {
                if !lines.contains_key(a) || a == &p.name {
                    cx.error(
                        lines[&p.name],
                        &format!("pipelines.{}.after", p.name),
                        format!("{a:?} is no other pipeline or job"),
                    );
                }
            }
        }
    }
    let admin = t.table("admin", "admin").map(parse_admin);
    let access_log = parse_access_log(t.table("access_log", "access_log"));
    let root_line = t.line();
    t.finish();

    if !t.has("listeners") {
        cx.error(root_line, "", "no [[listeners]]: at least one listener is required");
    }
    if !t.has("routes") {
        cx.error(root_line, "", "no [[routes]]: at least one route is required");
    }
    if !t.has("services") && (routes.is_empty() || routes.iter().any(|r| r.files.is_none())) {
        cx.error(root_line, "", "no [services.NAME]: at least one service is required");
    } else if t.has("services") && services.is_empty() && cx.ok() {
        cx.error(services_line, "services", "no service defined");
    }
    let mut seen = BTreeMap::new();
    // Port 0 asks the OS for a free port, so it never collides.
    for l in listeners.iter().filter(|l| l.listen.port() != 0) {
        if let Some(prev) = seen.insert(l.listen, &l.name) {
            cx.error(
                root_line,
                "listeners",
                format!("listeners {prev:?} and {:?} both listen on {}", l.name, l.listen),
            );
        }
    }
    let admin = admin.flatten();
    if let Some(a) = &admin {
        if seen.contains_key(&a.listen) {
            cx.error(root_line, "admin.listen", format!("{} is also a client listener", a.listen));
        }
    }
    let mut ports: Vec<(&str, (u16, u16))> =
        services.values().filter_map(|s| Some((s.name.as_str(), s.app.as_ref()?.ports))).collect();
    ports.sort_by_key(|p| p.1);
    for w in ports.windows(2) {
        if w[1].1 .0 <= w[0].1 .1 {
            cx.error(
                services_line,
                &format!("services.{}.app.ports", w[1].0),
                format!("overlaps the ports of service {:?}", w[0].0),
            );
        }
    }
    Some(Config {
        listeners,
        routes,
        services,
        queues,
        admin,
        access_log: access_log?,
        state_dir: state_dir?,
        hosts,
        pipelines,
        resolver: resolver?,
    })
}

fn parse_resolver(t: Table<'_, '_>) -> Option<Resolver> {
    let nameservers = t.strings("nameservers").and_then(|list| {
        let mut out = Vec::new();
        for n in list {
            let parsed = n.parse::<SocketAddr>().ok().or_else(|| n.parse::<std::net::IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)));
            match parsed {
                Some(a) => out.push(a),
                None => {
                    t.invalid("nameservers", format!("{n:?} is not an IP address (with an optional port), such as \"10.0.0.2\" or \"127.0.0.1:5353\""));
                    return None;
                }
            }
        }
        Some(out)
    });
    let interval = t.ms_in("interval_ms", 1000, 86_400_000);
    let ttl_min = t.ms_in("ttl_min_ms", 100, 3_600_000);
    let timeout = t.ms_in("timeout_ms", 100, 60_000);
    t.finish();
    Some(Resolver { nameservers: nameservers?, interval: interval?, ttl_min: ttl_min?, timeout: timeout? })
}

/// Whether `name` may name a host: 1 to 64 ASCII letters, digits, `_`, `-` and `.` (it is printed and typed on
/// command lines).
pub fn valid_host_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

fn parse_host(name: String, t: Table<'_, '_>, state_dir: Option<&std::path::Path>) -> Option<Host> {
    if !valid_host_name(&name) {
        t.invalid_table(format!("{name:?} is not a host name: 1 to 64 characters of [A-Za-z0-9_.-]"));
    }
    if !t.has("address") {
        t.required("address");
    }
    let address = t.string("address").and_then(|a| parse_host_address(&a).map_err(|e| t.invalid("address", e)).ok());
    let user = t.string("user").and_then(|u| {
        let ok = !u.is_empty() && u.len() <= 32 && u.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
        if ok {
            Some(u)
        } else {
            t.invalid("user", format!("{u:?} is not a user name (letters, digits, '_', '-', '.')"));
            None
        }
    });
    let identity = t.string("identity").map(PathBuf::from);
    if identity.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
        t.invalid("identity", "must not be empty");
    }
    let dir = t.string("dir").and_then(|d| {
        if d.is_empty() || d.chars().any(|c| c.is_control()) {
            t.invalid("dir", format!("{d:?} is not a directory path"));
            None
        } else {
            Some(d)
        }
    });
    let connect_timeout = t.ms_in("connect_timeout_ms", 1, 600_000);
    let max_startups = t.int_in("max_startups", 1, 10_000);
    let max_sessions = t.int_in("max_sessions", 1, 10_000);
    t.finish();
    let (host, port) = address?;
    let identity = match identity {
        Some(p) => p,
        None => state_dir?.join("ssh").join("id_ed25519"),
    };
    Some(Host {
        name,
        host,
        port,
        user: user?,
        identity,
        dir: dir?,
        connect_timeout: connect_timeout?,
        max_startups: max_startups? as u32,
        max_sessions: max_sessions? as u32,
    })
}

fn parse_listener(t: Table<'_, '_>) -> Option<Listener> {
    let listen = t.addr("listen");
    if listen.is_none() && !t.has("listen") {
        t.required("listen");
    }
    let tls = t.table("tls", "listeners[].tls").map(|tls| {
        let cert = tls.string("cert").map(PathBuf::from);
        let key = tls.string("key").map(PathBuf::from);
        for (name, v) in [("cert", &cert), ("key", &key)] {
            if v.is_none() && !tls.has(name) {
                tls.required(name);
            }
        }
        let mut sni = Vec::new();
        let mut sni_ok = true;
        for c in tls.array_of_tables("sni", "listeners[].tls.sni[]") {
            let (cert, key) = (c.string("cert").map(PathBuf::from), c.string("key").map(PathBuf::from));
            for (name, v) in [("cert", &cert), ("key", &key)] {
                if v.is_none() && !c.has(name) {
                    c.required(name);
                }
            }
            c.finish();
            match (cert, key) {
                (Some(cert), Some(key)) => sni.push(CertFiles { cert, key }),
                _ => sni_ok = false,
            }
        }
        let min_version = tls.string("min_version").and_then(|v| match v.as_str() {
            "1.2" => Some(TlsVersion::V1_2),
            "1.3" => Some(TlsVersion::V1_3),
            _ => {
                tls.invalid("min_version", format!("{v:?}: the oldest TLS version is \"1.2\" or \"1.3\""));
                None
            }
        });
        let watch_interval = tls.ms_in("watch_interval_ms", 0, 3_600_000);
        tls.finish();
        if !sni_ok {
            return None;
        }
        Some(Tls { cert: cert?, key: key?, sni, min_version: min_version?, watch_interval: watch_interval? })
    });
    let hsts_max_age_s = t.int_in("hsts_max_age_s", 0, 10 * 365 * 86_400);
    let hsts_subdomains = t.bool("hsts_subdomains");
    let hsts_preload = t.bool("hsts_preload");
    let redirect_https = t.bool("redirect_https");
    let proxy_protocol = t.bool("proxy_protocol");
    if t.has("tls") && redirect_https == Some(true) {
        t.invalid("redirect_https", "a TLS listener cannot redirect to itself: set it on the plain HTTP listener");
    }
    if !t.has("tls") && hsts_max_age_s.is_some_and(|n| n > 0) {
        t.invalid("hsts_max_age_s", "HSTS is only for a TLS listener (browsers ignore it over plain HTTP)");
    }
    let name = t.string("name");
    let max_connections = t.int_in("max_connections", 1, 1_000_000);
    let header_read_timeout = t.ms_in("header_read_timeout_ms", 1, 3_600_000);
    let header_bytes_max = t.int_in("header_bytes_max", 1024, 16 * 1024 * 1024);
    let header_count_max = t.int_in("header_count_max", 1, 10_000);
    let trusted_proxies = nets(&t, "trusted_proxies");
    let request_id_header = t.string("request_id_header").and_then(|h| {
        if h.is_empty() {
            return Some(None);
        }
        let lower = h.to_ascii_lowercase();
        if !nonstop_rewrite::is_token(&h) || nonstop_rewrite::RESERVED_HEADERS.contains(&lower.as_str()) {
            t.invalid("request_id_header", format!("{h:?} is not a header name a request id can go in"));
            return None;
        }
        Some(Some(lower))
    });
    t.finish();
    let listen = listen?;
    Some(Listener {
        name: name.unwrap_or_else(|| listen.to_string()),
        listen,
        tls: match tls {
            None => None,
            Some(tls) => Some(tls?),
        },
        max_connections: max_connections? as usize,
        header_read_timeout: header_read_timeout?,
        header_bytes_max: header_bytes_max? as usize,
        header_count_max: header_count_max? as usize,
        trusted_proxies: trusted_proxies?,
        request_id_header: request_id_header?,
        hsts: match hsts_max_age_s? {
            0 => None,
            max_age_s => Some(Hsts { max_age_s, subdomains: hsts_subdomains?, preload: hsts_preload? }),
        },
        redirect_https: redirect_https?,
        proxy_protocol: proxy_protocol?,
    })
}

fn parse_compress(t: Table<'_, '_>) -> Option<Compress> {
    let codings = t.strings("codings").and_then(|cs| {
        let mut out = Vec::new();
        for c in cs {
            match nonstop_compress::Coding::from_token(&c) {
                Some(k) if !out.contains(&k) => out.push(k),
                Some(_) => {}
                None => {
                    t.invalid("codings", format!("{c:?} is not a coding nonstop makes (zstd, br, gzip)"));
                    return None;
                }
            }
        }
        if out.is_empty() {
            t.invalid("codings", "at least one coding is needed (zstd, br, gzip)");
            return None;
        }
        Some(out)
    });
    let types = t.strings("types").and_then(|ts| {
        let mut bad = false;
        let out: Vec<String> = ts
            .iter()
            .map(|ty| {
                let lower = ty.trim().to_ascii_lowercase();
                let ok = matches!(lower.split_once('/'), Some((a, b)) if nonstop_rewrite::is_token(a) && (b == "*" || nonstop_rewrite::is_token(b)));
                if !ok {
                    t.invalid("types", format!("{ty:?} is not a media type such as \"text/html\" or \"text/*\""));
                    bad = true;
                }
                lower
            })
            .collect();
        (!bad).then_some(out)
    });
    let bytes_min = t.int_in("bytes_min", 0, u64::MAX / 2);
    let streams_max = t.int_in("streams_max", 1, 1_000_000);
    t.finish();
    let types = types?;
    let types =
        if types.is_empty() { nonstop_compress::DEFAULT_TYPES.iter().map(|s| s.to_string()).collect() } else { types };
    Some(Compress {
        settings: nonstop_compress::Settings { codings: codings?, types, bytes_min: bytes_min? },
        streams_max: streams_max? as usize,
    })
}

/// Bytes of compiled program a rewrite's regex may take at most.
const REGEX_BYTES_MAX: usize = 1 << 20;

/// A route's path rewriting: `None` when it has none (or it is bad, then with errors reported).
fn parse_path_rewrite(t: &Table<'_, '_>, path_prefix: Option<&str>) -> Option<nonstop_rewrite::PathRewrite> {
    use nonstop_rewrite::{Prefix, Rule, REDIRECT_STATUSES};
    let strip = t.bool("strip_prefix");
    let replace = t.string("replace_prefix");
    let mut ok = true;
    let rules: Vec<Rule> = t
        .array_of_tables("rewrite", "routes[].rewrite[]")
        .into_iter()
        .filter_map(|r| {
            let re = r.string("match").and_then(|m| {
                match nonstop_rewrite::regex::RegexBuilder::new(&m).size_limit(REGEX_BYTES_MAX).build() {
                    Ok(re) => Some(re),
                    Err(e) => {
                        let e = e.to_string();
                        let last = e.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim();
                        r.invalid("match", format!("{m:?} is not a regex: {}", last.trim_start_matches("error: ")));
                        None
                    }
                }
            });
            if re.is_none() && !r.has("match") {
                r.required("match");
            }
            let redirect = r.int_in("redirect", 300, 399).and_then(|s| {
                let s = s as u16;
                if REDIRECT_STATUSES.contains(&s) {
                    Some(s)
                } else {
                    r.invalid("redirect", format!("{s} is not a redirect status (one of 301, 302, 303, 307, 308)"));
                    None
                }
            });
            let bad_redirect = r.has("redirect") && redirect.is_none();
            let to = r.string("to").and_then(|to| {
                let absolute = to.starts_with("http://") || to.starts_with("https://");
                if to.starts_with('/') || (absolute && r.has("redirect")) {
                    Some(to)
                } else if absolute {
                    r.invalid("to", format!("{to:?}: only a redirect may go to another site; a rewrite is a path"));
                    None
                } else {
                    r.invalid("to", format!("{to:?} must start with / (or, for a redirect, http:// or https://)"));
                    None
                }
            });
            if to.is_none() && !r.has("to") {
                r.required("to");
            }
            r.finish();
            match (re, to, bad_redirect) {
                (Some(re), Some(to), false) => Some(Rule { re, to, redirect }),
                _ => {
                    ok = false;
                    None
                }
            }
        })
        .collect();
    let prefix = match (strip, replace) {
        (Some(true), Some(_)) => {
            t.invalid("replace_prefix", "give strip_prefix or replace_prefix, not both");
            return None;
        }
        (Some(true), None) => Prefix::Strip(path_prefix?.to_string()),
        (_, Some(with)) if !with.starts_with('/') => {
            t.invalid("replace_prefix", format!("{with:?} must start with /"));
            return None;
        }
        (_, Some(with)) => Prefix::Replace(path_prefix?.to_string(), with),
        _ => Prefix::Keep,
    };
    ok.then_some(nonstop_rewrite::PathRewrite { rules, prefix })
}

/// `[routes.request_headers]` or `[routes.response_headers]`; `None` when any entry is bad (each reported).
fn parse_header_rules(t: Option<Table<'_, '_>>) -> Option<nonstop_rewrite::HeaderRules> {
    use nonstop_rewrite::{is_token, Template, RESERVED_HEADERS};
    let Some(t) = t else { return Some(Default::default()) };
    let name_ok = |key: &str, n: &str| {
        let lower = n.to_ascii_lowercase();
        if !is_token(n) {
            t.invalid(key, format!("{n:?} is not a header name"));
            None
        } else if RESERVED_HEADERS.contains(&lower.as_str()) {
            t.invalid(key, format!("{n}: the proxy owns this header (it frames the message or the connection)"));
            None
        } else {
            Some(lower)
        }
    };
    let mut ok = true;
    let mut values = |key: &str| -> Vec<(String, Template)> {
        let mut out = Vec::new();
        for (n, v) in t.string_map(key).unwrap_or_default() {
            let name = name_ok(key, &n);
            let value = Template::parse(&v).map_err(|e| t.invalid(key, format!("{n}: {e}"))).ok();
            match (name, value) {
                (Some(n), Some(v)) => out.push((n, v)),
                _ => ok = false,
            }
        }
        out
    };
    let set = values("set");
    let add = values("add");
    let mut remove = Vec::new();
    for n in t.strings("remove").unwrap_or_default() {
        match name_ok("remove", &n) {
            Some(n) => remove.push(n),
            None => ok = false,
        }
    }
    t.finish();
    ok.then_some(nonstop_rewrite::HeaderRules { remove, set, add })
}

/// A list of addresses and CIDR networks; every bad one is reported.
fn nets(t: &Table<'_, '_>, key: &str) -> Option<Vec<IpNet>> {
    let mut bad = Vec::new();
    let out: Vec<IpNet> =
        t.strings(key)?.iter().filter_map(|s| nonstop_guard::parse_net(s).map_err(|e| bad.push(e)).ok()).collect();
    for e in &bad {
        t.invalid(key, e.clone());
    }
    bad.is_empty().then_some(out)
}

fn parse_access(t: Table<'_, '_>) -> Option<nonstop_guard::AccessList> {
    let allow = nets(&t, "allow");
    let deny = nets(&t, "deny");
    t.finish();
    let (allow, deny) = (allow?, deny?);
    if allow.is_empty() && deny.is_empty() {
        t.invalid_table("neither allow nor deny lists an address: remove [access] or list some");
        return None;
    }
    Some(nonstop_guard::AccessList { allow, deny })
}

/// The most requests per second (or per minute) a rate limit may allow a key.
const RATE_MAX: u64 = 1_000_000;

fn parse_rate_limit(t: Table<'_, '_>) -> Option<RateLimit> {
    // No defaults: each is `None` when absent (or bad, then reported).
    let per_s = t.int_in("requests_per_s", 1, RATE_MAX);
    let per_min = t.int_in("requests_per_min", 1, RATE_MAX);
    let (has_s, has_min) = (t.has("requests_per_s"), t.has("requests_per_min"));
    let burst = t.int_in("burst", 1, RATE_MAX);
    let key = t.string("key").and_then(|k| match k.as_str() {
        "client" => Some(RateKey::Client),
        _ => match k.strip_prefix("header:").map(str::trim) {
            Some(name) if nonstop_rewrite::is_token(name) => Some(RateKey::Header(name.to_ascii_lowercase())),
            _ => {
                t.invalid(
                    "key",
                    format!("{k:?}: expected \"client\" or \"header:NAME\" (such as \"header:X-Api-Key\")"),
                );
                None
            }
        },
    });
    let keys_max = t.int_in("keys_max", 1, 100_000_000);
    t.finish();
    let interval = match (has_s, has_min) {
        (true, true) => {
            t.invalid("requests_per_min", "give requests_per_s or requests_per_min, not both");
            return None;
        }
        (false, false) => {
            t.invalid_table("requests_per_s (or requests_per_min) is required");
            return None;
        }
        (true, false) => Duration::from_secs(1) / per_s? as u32,
        (false, true) => Duration::from_secs(60) / per_min? as u32,
    };
    // By default a second's worth may come at once (at least one request).
    let burst = match burst {
        Some(b) => b as u32,
        None if t.has("burst") => return None,
        None => (Duration::from_secs(1).as_nanos() / interval.as_nanos().max(1)).max(1) as u32,
    };
    Some(RateLimit { rate: nonstop_guard::Rate { interval, burst }, key: key?, keys_max: keys_max? as usize })
}

/// `services` are the names of the defined services, `None` when there is no services section at all.
fn parse_route(t: Table<'_, '_>, services: Option<&BTreeSet<String>>, queues: &BTreeSet<String>) -> Option<Route> {
    let service = t.string("service");
    let files = t.has("files").then(|| t.table("files", "routes[].files").and_then(parse_files));
    match (t.has("service"), t.has("files")) {
        (false, false) => t.required("service"),
        (true, true) => t.invalid("files", "a route sends to a service or serves files, not both"),
        _ => {}
    }
    if let (Some(name), Some(known)) = (&service, services) {
        if !known.contains(name) {
            let defined: Vec<&str> = known.iter().map(String::as_str).collect();
            t.invalid("service", format!("no service named {name:?} (defined: {})", defined.join(", ")));
        }
    }
    let host = t.string("host").map(|h| h.to_ascii_lowercase());
    let path_prefix = t.string("path_prefix").and_then(|p| {
        if p.starts_with('/') {
            Some(p)
        } else {
            t.invalid("path_prefix", format!("{p:?} must start with /"));
            None
        }
    });
    let methods = t.strings("methods").and_then(|ms| {
        let mut out = BTreeSet::new();
        let mut bad = Vec::new();
        for m in ms {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                bad.push(format!("{m:?}"));
            }
            out.insert(m.to_ascii_uppercase());
        }
        if !bad.is_empty() {
            let what = if bad.len() == 1 { "is not an HTTP method" } else { "are not HTTP methods" };
            t.invalid("methods", format!("{} {what}", bad.join(", ")));
            return None;
        }
        Some(out)
    });
    let body_bytes_max = t.int_in("body_bytes_max", 0, u64::MAX / 2);
    let queue = t.string("queue");
    if queue.is_some() && t.has("files") {
        t.invalid("queue", "a route of static files has no service to deliver queued requests to");
    }
    if let Some(q) = &queue {
        if !queues.contains(q) {
            let defined: Vec<&str> = queues.iter().map(String::as_str).collect();
            t.invalid("queue", format!("no queue named {q:?} (defined: {})", defined.join(", ")));
        }
    }
    let access = t.has("access").then(|| t.table("access", "routes[].access").and_then(parse_access));
    let rate_limit =
        t.has("rate_limit").then(|| t.table("rate_limit", "routes[].rate_limit").and_then(parse_rate_limit));
    let rewrite = parse_path_rewrite(&t, path_prefix.as_deref());
    let header_table = |key: &str, section: &'static str| t.has(key).then(|| t.table(key, section)).flatten();
    let request_headers = parse_header_rules(header_table("request_headers", "routes[].request_headers"));
    let response_headers = parse_header_rules(header_table("response_headers", "routes[].response_headers"));
    let compress = header_table("compress", "routes[].compress").map(parse_compress);
    let basic_auth = header_table("basic_auth", "routes[].basic_auth").map(parse_basic_auth);
    let forward_auth = header_table("forward_auth", "routes[].forward_auth").map(|f| parse_forward_auth(f, services));
    t.finish();
    let files = match files {
        Some(f) => Some(f?),
        None => None,
    };
    if files.is_none() {
        service.as_ref()?;
    }
    let basic_auth = match basic_auth {
        Some(b) => Some(b?),
        None => None,
    };
    let forward_auth = match forward_auth {
        Some(f) => Some(f?),
        None => None,
    };
    Some(Route {
        service,
        files,
        basic_auth,
        forward_auth,
        host,
        path_prefix: path_prefix?,
        methods,
        body_bytes_max: body_bytes_max?,
        queue,
        access: match access {
            Some(a) => Some(a?),
            None => None,
        },
        rate_limit: match rate_limit {
            Some(r) => Some(r?),
            None => None,
        },
        rewrite: rewrite?,
        request_headers: request_headers?,
        response_headers: response_headers?,
        compress: match compress {
            Some(c) => Some(c?),
            None => None,
        },
    })
}

fn parse_forward_auth(t: Table<'_, '_>, services: Option<&BTreeSet<String>>) -> Option<ForwardAuth> {
    let service = t.string("service");
    if service.is_none() && !t.has("service") {
        t.required("service");
    }
    if let (Some(name), Some(known)) = (&service, services) {
        if !known.contains(name) {
            let defined: Vec<&str> = known.iter().map(String::as_str).collect();
            t.invalid("service", format!("no service named {name:?} (defined: {})", defined.join(", ")));
        }
    }
    let path = t.string("path").and_then(|p| {
        if p.starts_with('/') && p.bytes().all(|b| b.is_ascii_graphic() && b != b'#') {
            Some(p)
        } else {
            t.invalid("path", format!("{p:?} is not a path that starts with /"));
            None
        }
    });
    let copy_headers = t.strings("copy_headers").and_then(|names| {
        let mut out = Vec::new();
        for n in names {
            let lower = n.to_ascii_lowercase();
            if !nonstop_rewrite::is_token(&n) || nonstop_rewrite::RESERVED_HEADERS.contains(&lower.as_str()) {
                t.invalid("copy_headers", format!("{n:?} is not a header name a rule may set"));
                return None;
            }
            out.push(lower);
        }
        Some(out)
    });
    t.finish();
    Some(ForwardAuth { service: service?, path: path?, copy_headers: copy_headers? })
}

fn parse_basic_auth(t: Table<'_, '_>) -> Option<BasicAuth> {
    use nonstop_guard::basic::{is_user_name, parse_htpasswd, Hash, Users, USER_RULE};
    let realm = t.string("realm").and_then(|r| {
        if r.is_empty() || r.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
            t.invalid(
                "realm",
                format!("{r:?}: a realm is a non-empty text without quotes, backslashes or control characters"),
            );
            return None;
        }
        Some(r)
    });
    let mut users = Users::default();
    let mut ok = true;
    if t.has("users_file") {
        match t.string("users_file") {
            Some(path) => match std::fs::read_to_string(&path) {
                Ok(text) => match parse_htpasswd(&text) {
                    Ok(list) => list.into_iter().for_each(|(u, h)| {
                        users.insert(u, h);
                    }),
                    Err(errors) => {
                        ok = false;
                        for (line, e) in errors {
                            t.invalid("users_file", format!("{path} line {line}: {e}"));
                        }
                    }
                },
                Err(e) => {
                    ok = false;
                    t.invalid("users_file", format!("cannot read {path}: {e}"));
                }
            },
            None => ok = false,
        }
    }
    for (user, hash) in t.string_map("users").unwrap_or_default() {
        if !is_user_name(&user) {
            ok = false;
            t.invalid("users", format!("{user:?} is not a user name ({USER_RULE})"));
            continue;
        }
        match Hash::parse(&hash) {
            Ok(h) => {
                users.insert(user, h);
            }
            Err(e) => {
                ok = false;
                t.invalid("users", format!("{user}: {e}"));
            }
        }
    }
    if ok && users.is_empty() {
        t.invalid_table("no users: set users = { NAME = \"HASH\" } or users_file = \"PATH\" (an htpasswd file)");
        ok = false;
    }
    let verified_max = t.int_in("verified_max", 1, 10_000_000);
    let verifying_max = t.int_in("verifying_max", 1, 1024);
    t.finish();
    if !ok {
        return None;
    }
    Some(BasicAuth {
        realm: realm?,
        users,
        verified_max: verified_max? as usize,
        verifying_max: verifying_max? as usize,
    })
}

/// The most index file names a route of files may try.
const INDEX_NAMES_MAX: usize = 16;

fn parse_files(t: Table<'_, '_>) -> Option<Files> {
    let root = t.string("root").map(PathBuf::from).and_then(|root| match std::fs::metadata(&root) {
        Ok(m) if m.is_dir() => Some(root),
        Ok(_) => {
            t.invalid("root", format!("{} is not a directory", root.display()));
            None
        }
        Err(e) => {
            t.invalid("root", format!("cannot use {} as the root of static files: {e}", root.display()));
            None
        }
    });
    if !t.has("root") {
        t.required("root");
    }
    let index = t.strings("index").and_then(|names| {
        let bad: Vec<String> = names
            .iter()
            .filter(|n| n.is_empty() || n.contains('/') || n.contains('\\') || n.as_str() == "." || n.as_str() == "..")
            .map(|n| format!("{n:?}"))
            .collect();
        if !bad.is_empty() {
            t.invalid("index", format!("{} must be a file name, without a slash", bad.join(", ")));
            return None;
        }
        if names.len() > INDEX_NAMES_MAX {
            t.invalid("index", format!("{} names; at most {INDEX_NAMES_MAX}", names.len()));
            return None;
        }
        Some(names)
    });
    let precompressed = t.bool("precompressed");
    let hidden = t.bool("hidden");
    t.finish();
    Some(Files { root: root?, index: index?, precompressed: precompressed?, hidden: hidden? })
}

fn parse_service(cx: &Cx, name: String, t: Table<'_, '_>, hosts: &BTreeSet<String>) -> Option<Service> {
    let mut servers = Vec::new();
    let mut addrs = BTreeSet::new();
    let tables = t.array_of_tables("servers", "services.NAME.servers[]");
    let app = t.table("app", "services.NAME.app").map(|a| parse_app(a, hosts));
    if app.is_some() && t.has("servers") {
        t.invalid("servers", "a service with an app section has no servers list: its instances are the servers");
    }
    if tables.is_empty() && !t.has("servers") && app.is_none() {
        t.required("servers");
    }
    let mut named: Vec<NamedServer> = Vec::new();
    for s in tables {
        let mut host_port = None;
        let addr = s.string("addr").and_then(|raw| match raw.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                let port = raw.rsplit_once(':').and_then(|(h, p)| Some((h, p.parse::<u16>().ok().filter(|&p| p > 0)?)));
                match port {
                    Some((h, p)) if is_dns_name(h) => host_port = Some((h.to_ascii_lowercase(), p)),
                    _ => s.invalid(
                        "addr",
                        format!(
                            "{raw:?} is not an IP address with a port, such as \"127.0.0.1:8080\", nor a host name \
                             with a port, such as \"app.internal:8080\""
                        ),
                    ),
                }
                None
            }
        });
        if addr.is_none() && !s.has("addr") {
            s.required("addr");
        }
        let weight = s.int_in("weight", 0, u64::from(WEIGHT_MAX));
        let backup = s.bool("backup");
        let in_flight_max = s.has("in_flight_max").then(|| s.int_in("in_flight_max", 1, 1_000_000));
        let line = s.line();
        s.finish();
        if let (Some(addr), Some(weight), Some(backup), None | Some(Some(_))) = (addr, weight, backup, in_flight_max) {
            if !addrs.insert(addr) {
                cx.error(line, &format!("services.{name}.servers"), format!("server {addr} is listed twice"));
            }
            let in_flight_max = in_flight_max.flatten().map(|n| n as u32);
            servers.push(ServerSpec { addr, weight: weight as u32, backup, in_flight_max });
        }
        if let (Some((host, port)), Some(weight), Some(backup), None | Some(Some(_))) =
            (host_port, weight, backup, in_flight_max)
        {
            if named.iter().any(|n| n.host == host && n.port == port) {
                cx.error(line, &format!("services.{name}.servers"), format!("server {host}:{port} is listed twice"));
            }
            let in_flight_max = in_flight_max.flatten().map(|n| n as u32);
            named.push(NamedServer { host, port, weight: weight as u32, backup, in_flight_max });
        }
    }
    if t.has("servers") && servers.is_empty() && named.is_empty() && cx.ok() {
        t.invalid("servers", "at least one server is required".to_string());
    }
    if !(servers.is_empty() && named.is_empty()) && servers.iter().all(|s| s.backup) && named.iter().all(|s| s.backup) {
        t.invalid("servers", "every server is a backup: at least one must be a primary".to_string());
    }
    let hash_on = t.string("hash_on").and_then(|raw| HashOn::parse(&raw).map_err(|e| t.invalid("hash_on", e)).ok());
    let balance_raw = t.string("balance");
    let balance = balance_raw.and_then(|raw| {
        let had_hash_on = t.has("hash_on");
        match Balance::parse(&raw, hash_on.clone()) {
            Ok(b) => Some(b),
            Err(_) if raw == "hash" && had_hash_on => None, // hash_on itself was reported
            Err(e) => {
                t.invalid("balance", e);
                None
            }
        }
    });
    if t.has("hash_on") && !matches!(balance, Some(Balance::Hash(_)) | None) {
        t.invalid("hash_on", "only applies with balance = \"hash\"".to_string());
    }
    let connect_timeout = t.ms_in("connect_timeout_ms", 1, 600_000);
    let response_timeout = t.ms_in("response_timeout_ms", 1, 86_400_000);
    let pool_idle_timeout = t.ms_in("pool_idle_timeout_ms", 1, 86_400_000);
    let pool_idle_max = t.int_in("pool_idle_max", 0, 100_000);
    let protocol = t.string("protocol").and_then(|p| match p.as_str() {
        "http1" => Some(Protocol::Http1),
        "h2" => Some(Protocol::H2),
        other => {
            t.invalid("protocol", format!("{other:?}: expected \"http1\" or \"h2\""));
            None
        }
    });
    let hide_identity = t.bool("hide_identity");
    let request_timeout = t.ms_in("request_timeout_ms", 1, 86_400_000);
    let slow_start = t.ms_in("slow_start_ms", 0, 3_600_000);
    let drain_deadline = t.ms_in("drain_deadline_ms", 0, 86_400_000);
    let health = t.table_or_empty("health", "services.NAME.health").and_then(parse_health);
    let eject = t.table_or_empty("eject", "services.NAME.eject").and_then(parse_eject);
    let retry = t.table_or_empty("retry", "services.NAME.retry").and_then(parse_retry);
    let admission = t.table_or_empty("admission", "services.NAME.admission").and_then(parse_admission);
    if let (Some(a), Some(deadline)) = (&admission, request_timeout) {
        if a.queue_wait_max > deadline {
            t.invalid(
                "request_timeout_ms",
                format!(
                    "{} ms is shorter than admission.queue_wait_ms_max ({} ms): a request could not wait that long",
                    deadline.as_millis(),
                    a.queue_wait_max.as_millis()
                ),
            );
        }
    }
    t.finish();
    let app = match app {
        None => None,
        Some(a) => Some(a?),
    };
    let mut health = health?;
    if let (Some(a), None) = (&app, &health.path) {
        // Instances the proxy runs are checked on their readiness path unless told otherwise.
        health.path = Some(a.health_path.clone());
    }
    Some(Service {
        name,
        servers,
        named,
        balance: balance?,
        connect_timeout: connect_timeout?,
        response_timeout: response_timeout?,
        pool_idle_timeout: pool_idle_timeout?,
        pool_idle_max: pool_idle_max? as usize,
        protocol: protocol?,
        hide_identity: hide_identity?,
        request_timeout: request_timeout?,
        slow_start: slow_start?,
        drain_deadline: drain_deadline?,
        health,
        eject: eject?,
        retry: retry?,
        admission: admission?,
        app,
    })
}

fn parse_app(t: Table<'_, '_>, hosts: &BTreeSet<String>) -> Option<App> {
    let driver = t.string("driver").and_then(|d| match d.as_str() {
        "process" | "docker" | "ssh" => Some(d),
        other => {
            t.invalid("driver", format!("{other:?}: expected \"process\", \"docker\" or \"ssh\""));
            None
        }
    });
    let docker_only = ["image", "args", "container_port", "volumes", "labels", "keep_versions"];
    let ssh_only = ["release", "keep_releases"];
    if driver.as_deref() != Some("ssh") {
        for k in ssh_only {
            if t.has(k) {
                t.invalid(k, "only the ssh driver takes this key (set driver = \"ssh\")");
            }
        }
        if driver.as_deref() != Some("docker") && t.has("hosts") {
            t.invalid("hosts", "only the ssh and docker drivers take this key");
        }
    }
    let (command, driver) = match driver.as_deref() {
        Some("docker") => {
            for k in ["command", "dir"] {
                if t.has(k) {
                    t.invalid(k, "the docker driver runs image with args; command and dir are the process driver's");
                }
            }
            (Some(String::new()), parse_docker(&t, hosts).map(AppDriver::Docker))
        }
        Some("ssh") => {
            for k in docker_only.iter().chain(&["dir"]) {
                if t.has(k) {
                    t.invalid(k, "not an ssh driver key: instances run command in the release directory on each host");
                }
            }
            let command = t.string("command");
            if command.is_none() && !t.has("command") {
                t.required("command");
            }
            if command.as_deref().is_some_and(|c| c.trim().is_empty()) {
                t.invalid("command", "must not be empty");
            }
            (command, parse_ssh(&t, hosts).map(AppDriver::Ssh))
        }
        d => {
            for k in docker_only {
                if t.has(k) {
                    t.invalid(k, "only the docker driver takes this key (set driver = \"docker\")");
                }
            }
            let command = t.string("command");
            if command.is_none() && !t.has("command") {
                t.required("command");
            }
            if command.as_deref().is_some_and(|c| c.trim().is_empty()) {
                t.invalid("command", "must not be empty");
            }
            (command, d.map(|_| AppDriver::Process))
        }
    };
    let version = t.string("version").and_then(|v| match check_version(&v) {
        Ok(()) => Some(v),
        Err(e) => {
            t.invalid("version", e);
            None
        }
    });
    let env = t.string_map("env");
    let dir = t.string("dir").map(PathBuf::from);
    if !t.has("ports") {
        t.required("ports");
    }
    let ports = t.string("ports").and_then(|raw| {
        let parsed =
            raw.split_once('-').and_then(|(a, b)| Some((a.trim().parse::<u16>().ok()?, b.trim().parse::<u16>().ok()?)));
        match parsed {
            Some((a, b)) if a > 0 && a <= b => Some((a, b)),
            _ => {
                t.invalid("ports", format!("{raw:?}: expected a range such as \"9101-9120\""));
                None
            }
        }
    });
    let count = t.int_in("count", 1, 1000);
    let health_path = t.string("health_path").and_then(|p| {
        if p.starts_with('/') {
            Some(p)
        } else {
            t.invalid("health_path", format!("{p:?} must start with /"));
            None
        }
    });
    let ready_passes = t.int_in("ready_passes", 1, 100);
    let ready_interval = t.ms_in("ready_interval_ms", 10, 60_000);
    let ready_timeout = t.ms_in("ready_timeout_ms", 100, 3_600_000);
    let strategy = t.string("strategy").and_then(|s| Strategy::parse(&s).map_err(|e| t.invalid("strategy", e)).ok());
    let max_surge = t.int_in("max_surge", 0, 1000);
    let max_unavailable = t.int_in("max_unavailable", 0, 1000);
    if max_surge == Some(0) && max_unavailable == Some(0) {
        t.invalid("max_surge", "max_surge and max_unavailable are both 0: a rolling deploy could never move");
    }
    let canary_steps = t.ints_in("canary_steps", 1, 100).and_then(|steps| {
        let steps: Vec<u32> = steps.into_iter().map(|s| s as u32).collect();
        check_canary_steps(&steps).map_err(|e| t.invalid("canary_steps", e)).ok().map(|_| steps)
    });
    let step = t.ms_in("step_ms", 100, 3_600_000);
    let soak = t.ms_in("soak_ms", 0, 86_400_000);
    let error_rate_margin_percent = t.int_in("error_rate_margin_percent", 0, 100);
    let p99_max_percent = t.int_in("p99_max_percent", 100, 100_000);
    let p99_slack = t.ms_in("p99_slack_ms", 0, 3_600_000);
    let analysis_requests_min = t.int_in("analysis_requests_min", 1, 1_000_000);
    let drain_timeout = t.ms_in("drain_timeout_ms", 0, 86_400_000);
    let stop_grace = t.ms_in("stop_grace_ms", 0, 3_600_000);
    let restart_backoff_base = t.ms_in("restart_backoff_base_ms", 1, 3_600_000);
    let restart_backoff_max = t.ms_in("restart_backoff_max_ms", 1, 86_400_000);
    let log_bytes_max = t.int_in("log_bytes_max", 1024, 1 << 40);
    let log_files_max = t.int_in("log_files_max", 0, 1000);
    if let (Some((a, b)), Some(count), Some(surge)) = (ports, count, max_surge) {
        let need = count + surge.max(count);
        if u64::from(b - a) + 1 < need {
            t.invalid(
                "ports",
                format!("{a}-{b} holds {} ports; {need} are needed (count {count}, and as many again for a blue-green or canary deploy)", b - a + 1),
            );
        }
    }
    t.finish();
    Some(App {
        driver: driver?,
        command: command?,
        version: version?,
        env: env?,
        dir,
        ports: ports?,
        count: count? as u32,
        health_path: health_path?,
        ready_passes: ready_passes? as u32,
        ready_interval: ready_interval?,
        ready_timeout: ready_timeout?,
        strategy: strategy?,
        max_surge: max_surge? as u32,
        max_unavailable: max_unavailable? as u32,
        canary_steps: canary_steps?,
        step: step?,
        soak: soak?,
        error_rate_margin_percent: error_rate_margin_percent? as u32,
        p99_max_percent: p99_max_percent? as u32,
        p99_slack: p99_slack?,
        analysis_requests_min: analysis_requests_min? as u32,
        drain_timeout: drain_timeout?,
        stop_grace: stop_grace?,
        restart_backoff_base: restart_backoff_base?,
        restart_backoff_max: restart_backoff_max?,
        log_bytes_max: log_bytes_max?,
        log_files_max: log_files_max? as u32,
    })
}

/// The ssh driver's keys of an app section; every host named must be a `[hosts.NAME]`.
fn parse_ssh(t: &Table<'_, '_>, known: &BTreeSet<String>) -> Option<SshApp> {
    if !t.has("hosts") {
        t.required("hosts");
    }
    let hosts = parse_host_list(t, known);
    let release = t.string("release").and_then(|r| {
        if r.is_empty() || r.chars().any(|c| c.is_control()) {
            t.invalid("release", format!("{r:?} is not a path"));
            None
        } else {
            Some(PathBuf::from(r))
        }
    });
    let keep_releases = t.int_in("keep_releases", 2, 100);
    Some(SshApp { hosts: hosts?, release, keep_releases: keep_releases? as u32 })
}

/// The `hosts` list of an app section: names of `[hosts.NAME]` tables, each once.
fn parse_host_list(t: &Table<'_, '_>, known: &BTreeSet<String>) -> Option<Vec<String>> {
    t.strings("hosts").and_then(|hs| {
        let mut problems = Vec::new();
        if hs.is_empty() {
            problems.push("names no host".to_string());
        }
        let mut seen = BTreeSet::new();
        for h in &hs {
            if !known.contains(h) {
                let defined: Vec<&str> = known.iter().map(String::as_str).collect();
                problems.push(format!(
                    "{h:?} is not a [hosts.NAME] table (defined: {})",
                    if defined.is_empty() { "none".to_string() } else { defined.join(", ") }
                ));
            }
            if !seen.insert(h) {
                problems.push(format!("{h:?} is named twice (count is per host)"));
            }
        }
        if problems.is_empty() {
            Some(hs)
        } else {
            t.invalid("hosts", problems.join("; "));
            None
        }
    })
}

/// The docker driver's keys of an app section.
fn parse_docker(t: &Table<'_, '_>, known: &BTreeSet<String>) -> Option<DockerApp> {
    let image = t.string("image");
    if image.is_none() && !t.has("image") {
        t.required("image");
    }
    let image = image.and_then(|i| {
        // The image reference once {version} is filled: Docker's own check does the rest at the first start.
        let sample = i.replace("{version}", "v1");
        if sample.is_empty() || sample.chars().any(|c| c.is_whitespace() || c.is_control()) || sample.starts_with('-') {
            t.invalid("image", format!("{i:?} is not an image reference such as \"nonstop-app:{{version}}\""));
            None
        } else {
            Some(i)
        }
    });
    let args = t.strings("args");
    let container_port = t.int_in("container_port", 1, 65535);
    let volumes = t.strings("volumes").and_then(|vs| {
        let bad: Vec<String> = vs.iter().filter_map(|v| check_volume(v).err()).collect();
        if bad.is_empty() {
            Some(vs)
        } else {
            t.invalid("volumes", bad.join("; "));
            None
        }
    });
    let labels = t.string_map("labels");
    let keep_versions = t.int_in("keep_versions", 1, 100);
    let hosts = if t.has("hosts") { parse_host_list(t, known) } else { Some(Vec::new()) };
    Some(DockerApp {
        hosts: hosts?,
        labels: labels?,
        image: image?,
        args: args?,
        container_port: container_port? as u16,
        volumes: volumes?,
        keep_versions: keep_versions? as u32,
    })
}

/// A version label: 1 to 64 characters of letters, digits, '.', '-', '_' and '+'.
pub fn check_version(v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > 64 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+".contains(&b)) {
        return Err(format!("{v:?}: a version is 1 to 64 letters, digits, '.', '-', '_' or '+'"));
    }
    Ok(())
}

fn parse_health(t: Table<'_, '_>) -> Option<Health> {
    let enabled = t.bool("enabled");
    let path = t.string("path");
    let path_ok = match &path {
        Some(p) if !p.starts_with('/') => {
            t.invalid("path", format!("{p:?} must start with /"));
            false
        }
        _ => true,
    };
    let interval = t.ms_in("interval_ms", 10, 3_600_000);
    let timeout = t.ms_in("timeout_ms", 1, 600_000);
    let rise = t.int_in("rise", 1, 100);
    let fall = t.int_in("fall", 1, 100);
    let expect_status = t.string("expect_status").and_then(|raw| {
        let parsed = match raw.split_once('-') {
            Some((a, b)) => a.trim().parse::<u16>().ok().zip(b.trim().parse::<u16>().ok()),
            None => raw.trim().parse::<u16>().ok().map(|s| (s, s)),
        };
        match parsed {
            Some((a, b)) if (100..=599).contains(&a) && (a..=599).contains(&b) => Some((a, b)),
            _ => {
                t.invalid(
                    "expect_status",
                    format!("{raw:?}: expected a status such as \"200\" or a range such as \"200-399\""),
                );
                None
            }
        }
    });
    t.finish();
    if !path_ok {
        return None;
    }
    Some(Health {
        enabled: enabled?,
        path,
        interval: interval?,
        timeout: timeout?,
        rise: rise? as u32,
        fall: fall? as u32,
        expect_status: expect_status?,
    })
}

fn parse_eject(t: Table<'_, '_>) -> Option<Eject> {
    let enabled = t.bool("enabled");
    let consecutive_failures = t.int_in("consecutive_failures", 1, 10_000);
    let base = t.ms_in("base_ms", 1, 3_600_000);
    let max = t.ms_in("max_ms", 1, 86_400_000);
    let max_percent = t.int_in("max_percent", 0, 100);
    if let (Some(b), Some(m)) = (base, max) {
        if m < b {
            t.invalid("max_ms", format!("{} ms is shorter than base_ms ({} ms)", m.as_millis(), b.as_millis()));
        }
    }
    t.finish();
    Some(Eject {
        enabled: enabled?,
        consecutive_failures: consecutive_failures? as u32,
        base: base?,
        max: max?,
        max_percent: max_percent? as u32,
    })
}

fn parse_retry(t: Table<'_, '_>) -> Option<Retry> {
    let attempts_max = t.int_in("attempts_max", 1, 20);
    let on_status = t.ints_in("on_status", 100, 599);
    let budget_percent = t.int_in("budget_percent", 0, 1000);
    let budget_min_per_s = t.int_in("budget_min_per_s", 0, 1_000_000);
    let body_bytes_max = t.int_in("body_bytes_max", 0, 64 * 1024 * 1024);
    let add_idempotency_key = t.bool("add_idempotency_key");
    t.finish();
    Some(Retry {
        attempts_max: attempts_max? as u32,
        on_status: on_status?.into_iter().map(|s| s as u16).collect(),
        budget_percent: budget_percent? as u32,
        budget_min_per_s: budget_min_per_s? as u32,
        body_bytes_max: body_bytes_max?,
        add_idempotency_key: add_idempotency_key?,
    })
}

fn parse_admission(t: Table<'_, '_>) -> Option<Admission> {
    let server_in_flight_max = t.int_in("server_in_flight_max", 1, 1_000_000);
    let adaptive_limit = t.bool("adaptive_limit");
    let queue_length_max = t.int_in("queue_length_max", 0, 10_000_000);
    let queue_wait_max = t.ms_in("queue_wait_ms_max", 0, 3_600_000);
    let overload_wait_max = t.ms_in("overload_wait_ms_max", 0, 3_600_000);
    t.finish();
    Some(Admission {
        server_in_flight_max: server_in_flight_max? as u32,
        adaptive_limit: adaptive_limit?,
        queue_length_max: queue_length_max? as usize,
        queue_wait_max: queue_wait_max?,
        overload_wait_max: overload_wait_max?,
    })
}

fn parse_queue(name: String, t: Table<'_, '_>) -> Option<Queue> {
    let store = t.string("store");
    if let Some(s) = &store {
        if s != "embedded" && s != "rabbitmq" {
            t.invalid("store", format!("{s:?}: expected \"embedded\" or \"rabbitmq\""));
        }
    }
    let url = t.string("rabbitmq_url");
    let path = t.string("path").map(PathBuf::from);
    let length_max = t.int_in("length_max", 1, 1 << 40);
    let bytes_max = t.int_in("bytes_max", 1, 1 << 50);
    let batch_max = t.int_in("batch_max", 1, 1_000_000);
    let concurrency = t.int_in("concurrency", 1, 100_000);
    let attempts_max = t.int_in("attempts_max", 1, 1000);
    let backoff_base = t.ms_in("backoff_base_ms", 1, 86_400_000);
    let backoff_max = t.ms_in("backoff_max_ms", 1, 86_400_000);
    let status_body = t.bool("status_body");
    let body_bytes_in_flight_max = t.int_in("body_bytes_in_flight_max", 1, 1 << 40);
    let finished_keep_max = t.int_in("finished_keep_max", 0, 1 << 40);
    let finished_keep = t.ms_in("finished_keep_ms", 0, 100 * 365 * 86_400_000);
    let deliver_window = if t.has("deliver_window") {
        t.table("deliver_window", "queues.NAME.deliver_window").and_then(|w| {
            if !w.has("schedule") {
                w.required("schedule");
            }
            if !w.has("duration_ms") {
                w.required("duration_ms");
            }
            let cron = w.string("schedule");
            let tz = w.string("time_zone");
            let duration = w.ms_in("duration_ms", 1000, 366 * 86_400_000);
            w.finish();
            let (cron, tz) = (cron?, tz?);
            if let Err(e) = nonstop_schedule::Cron::parse(&cron, &name, &tz) {
                w.invalid(if e.to_string().contains("zone") { "time_zone" } else { "schedule" }, e.to_string());
                return None;
            }
            Some(Some(WindowSpec { cron, time_zone: tz, duration: duration? }))
        })
    } else {
        Some(None)
    };
    t.finish();
    let rabbitmq = match store.as_deref() {
        Some("embedded") => None,
        Some("rabbitmq") => Some(url?),
        _ => return None,
    };
    Some(Queue {
        name,
        rabbitmq,
        service: String::new(),
        path: path?,
        length_max: length_max?,
        bytes_max: bytes_max?,
        batch_max: batch_max? as usize,
        concurrency: concurrency? as usize,
        attempts_max: attempts_max? as u32,
        backoff_base: backoff_base?,
        backoff_max: backoff_max?,
        status_body: status_body?,
        body_bytes_in_flight_max: body_bytes_in_flight_max?,
        finished_keep_max: finished_keep_max?,
        deliver_window: deliver_window?,
        finished_keep: finished_keep?,
    })
}

fn parse_admin(t: Table<'_, '_>) -> Option<Admin> {
    let listen = t.addr("listen");
    let token = t.string("token");
    if let (Some(addr), None) = (listen, &token) {
        if !addr.ip().is_loopback() {
            t.invalid("listen", format!("{addr} is not a loopback address, so admin.token is required"));
        }
    }
    if token.as_deref() == Some("") {
        t.invalid("token", "must not be empty".to_string());
    }
    t.finish();
    Some(Admin { listen: listen?, token })
}

fn parse_access_log(t: Option<Table<'_, '_>>) -> Option<AccessLog> {
    let Some(t) = t else {
        return Some(AccessLog {
            enabled: true,
            enabled_explicitly: false,
            path: None,
            format: LogFormat::Json,
            flush_ms: 1000,
            success_sample_percent: 100,
        });
    };
    let enabled_explicitly = t.has("enabled");
    let enabled = t.bool("enabled");
    let path = t.string("path");
    let format = match t.string("format").as_deref() {
        None | Some("json") => Some(LogFormat::Json),
        Some("combined") => Some(LogFormat::Combined),
        Some(other) => {
            t.invalid("format", format!("{other:?}: expected \"json\" or \"combined\""));
            None
        }
    };
    let flush_ms = t.int_in("flush_ms", 1, 60_000);
    let success_sample_percent = t.int_in("success_sample_percent", 0, 100);
    t.finish();
    Some(AccessLog {
        enabled: enabled?,
        enabled_explicitly,
        path: path.filter(|p| p != "-").map(PathBuf::from),
        format: format?,
        flush_ms: flush_ms?,
        success_sample_percent: success_sample_percent? as u32,
    })
}

#[cfg(test)]
mod tests;
