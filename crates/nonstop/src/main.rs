//! The `nonstop` binary: parses the command line and hands each subcommand to the crate that owns it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

mod admin_client;
mod alloc;
mod demo;
mod deploy_cli;
mod hosts_cli;
mod pipeline_cli;
mod queue_cli;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: alloc::MiMalloc = alloc::MiMalloc;

/// One binary for web services that never drop a request: a reverse proxy and load balancer with safe retries,
/// a durable request queue, zero-downtime deploys, a load generator, and a sample worker service.
#[derive(Parser)]
#[command(name = "nonstop", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sample worker service: a bounded worker pool and accept queue that overloads the way Tomcat does,
    /// storing orders in SQLite or PostgreSQL.
    App(AppArgs),
    /// Run the reverse proxy and load balancer, from a config file or in quick mode (--listen ... --to ...).
    /// SIGHUP reloads the config; SIGTERM drains and exits.
    Serve(ServeArgs),
    /// Generate HTTP load and account for every request: closed model (--connections, as fast as possible) or
    /// open model (--rate or --stages, latency measured from the scheduled time). Exit status: 0 when every
    /// --threshold holds, 1 when one fails, 2 for bad arguments.
    Load(Box<LoadArgs>),
    /// Inspect and manage durable queues through a running proxy's admin API: list queues, show a request, list
    /// dead letters, replay one, purge them.
    Queue(queue_cli::QueueArgs),
    /// Deploy a new version of an app service through a running proxy, and follow it: rolling (default),
    /// blue-green or canary, rolled back automatically when the new version fails. Exit status 0 when it
    /// succeeded, 1 when it was rolled back or refused.
    Deploy(deploy_cli::DeployArgs),
    /// Return an app service to its previous version (a running deploy is aborted and rolled back instead).
    /// Repeated rollbacks walk back through the history: each goes to the version that the current one replaced
    /// when it first arrived by a deploy (v1, v2, v3: rollback to v2, rollback again to v1).
    Rollback {
        #[command(flatten)]
        admin: deploy_cli::AdminArgs,
        /// Return to this earlier version (one the service ran successfully, with the env it ran with then).
        #[arg(long, value_name = "VERSION")]
        to: Option<String>,
        /// Print the progress as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// List the deploys and rollbacks of the app services (times in UTC), newest last.
    History(deploy_cli::HistoryArgs),
    /// Show the app services' instances (per host and driver), versions, health, and any deploy in progress.
    Status(deploy_cli::StatusArgs),
    /// Print the output logs of an app service's instances, or of one (--instance), through a running proxy;
    /// the logs of instances on SSH hosts are fetched from the hosts.
    Logs(deploy_cli::LogsArgs),
    /// Start a run of a pipeline or job through a running proxy (--follow: stream its log; exit 0 when it
    /// succeeded, 1 otherwise), or cancel one (--cancel N).
    Run(pipeline_cli::RunArgs),
    /// List pipelines and jobs with their last run, the runs of one, or one run's steps and logs (--run N).
    Runs(pipeline_cli::RunsArgs),
    /// Everything in one command: three supervised app instances behind the proxy, under load, through a rolling
    /// deploy, a kill -9, a 3x burst and a broken version that rolls back; prints a verdict and writes an HTML
    /// report. Exit status 0 only if no request failed and every accepted order is stored exactly once.
    Demo(demo::DemoArgs),
    /// Validate a config file and print every error with its line.
    Check {
        /// The TOML config file (`nonstop check FILE` or `nonstop check --config FILE`).
        #[arg(value_name = "FILE", required_unless_present = "config_flag", conflicts_with = "config_flag")]
        config: Option<PathBuf>,
        /// The TOML config file, as `serve --config` takes it.
        #[arg(long = "config", id = "config_flag", value_name = "FILE")]
        config_flag: Option<PathBuf>,
    },
    /// nonstop's SSH key pair for the hosts (keys init).
    Keys(hosts_cli::KeysArgs),
    /// SSH hosts ([hosts.NAME]): pin their keys (trust), and check that nonstop can log in and deploy there
    /// (check). Host keys are always checked against state_dir/ssh/known_hosts; nothing is trusted on first use.
    Hosts(hosts_cli::HostsArgs),
    /// Hash a password for routes[].basic_auth (argon2id, as a PHC string): reads the password from standard input
    /// (one line; from a terminal, without echo) and prints the hash to put in users or in a users_file.
    HashPassword,
    /// Print the config reference (docs/config.md) generated from the key schema.
    #[command(hide = true)]
    ConfigReference,
}

#[derive(Args)]
struct ServeArgs {
    /// The TOML config file (see docs/config.md).
    #[arg(long, conflicts_with_all = ["listen", "to", "balance", "admin"])]
    config: Option<PathBuf>,
    /// Quick mode: the address to accept clients on.
    #[arg(long, requires = "to")]
    listen: Option<String>,
    /// Quick mode: a server to forward to (repeat for more).
    #[arg(long, requires = "listen")]
    to: Vec<String>,
    /// Quick mode: round_robin, weighted, least_inflight, peak_ewma, or hash=header:NAME|cookie:NAME|client_ip.
    #[arg(long, default_value = "round_robin")]
    balance: String,
    /// Quick mode: the admin API address.
    #[arg(long)]
    admin: Option<String>,
    /// Worker threads [default: the number of cores].
    #[arg(long)]
    threads: Option<usize>,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[arg(long, default_value_t = 30_000)]
    drain_timeout_ms: u64,
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// The URL to load, such as http://127.0.0.1:8080/ (plain HTTP). With --scenario, the base URL that the steps'
    /// paths are relative to.
    url: String,
    /// A scenario file (TOML): weighted flows of steps with templates, captures, checks and think time (see
    /// docs/load.md). Each arrival, or each turn of a connection in the closed model, runs one flow.
    #[arg(long, conflicts_with = "http2")]
    scenario: Option<PathBuf>,
    /// Closed model: this many connections, each sending back to back. In the open model: the most connections
    /// open at once [default: 64 closed, 512 open].
    #[arg(long, short = 'c')]
    connections: Option<usize>,
    /// Open model: a constant arrival rate, requests per second.
    #[arg(long, conflicts_with = "stages")]
    rate: Option<f64>,
    /// Open model: stages such as "10s:100,30s:1000,10s:0" (the rate ramps linearly to each stage's value).
    #[arg(long)]
    stages: Option<String>,
    /// How long to run (closed model, or with --rate).
    #[arg(long, short = 'd', default_value = "10s")]
    duration: String,
    /// Worker threads [default: the number of cores].
    #[arg(long, short = 't')]
    threads: Option<usize>,
    /// A request with no complete response within this time counts as a timeout.
    #[arg(long, default_value = "10s")]
    timeout: String,
    /// HTTP method.
    #[arg(long, short = 'X', default_value = "GET")]
    method: String,
    /// A request header, "Name: value" (repeatable). Values may use {{seq}}, {{uuid}}, {{random_int}}.
    #[arg(long, short = 'H')]
    header: Vec<String>,
    /// The request body; may use {{seq}}, {{uuid}}, {{random_int}}.
    #[arg(long)]
    body: Option<String>,
    /// Open a new connection for every request instead of keeping connections alive.
    #[arg(long, conflicts_with = "http2")]
    no_keepalive: bool,
    /// Speak HTTP/2 with prior knowledge (h2c): one multiplexed connection per worker thread.
    #[arg(long)]
    http2: bool,
    /// Count the values of this response header, overall and per second (e.g. X-Nonstop-Version).
    #[arg(long)]
    track_header: Option<String>,
    /// A pass/fail condition such as "p99<50ms", "failed==0", "rate>=990" (repeatable).
    #[arg(long)]
    threshold: Vec<String>,
    /// Stop the run as soon as a threshold that can be judged mid-run (p99, failed, not_sent, errors, error_rate)
    /// fails; the exit status is then 1.
    #[arg(long, requires = "threshold")]
    abort_on_fail: bool,
    /// Write the full result, with the per-second timeline, as JSON to this file; `-` writes it to stdout (the text
    /// report then goes to stderr, so that stdout is the JSON alone).
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report with charts (no network needed to view it).
    #[arg(long)]
    html: Option<PathBuf>,
    /// The HTML report's title [default: nonstop load URL].
    #[arg(long, value_name = "TEXT")]
    title: Option<String>,
    /// A link at the top of the HTML report, back to the page it belongs to (such as a summary of several runs).
    #[arg(long, value_name = "HREF", requires = "html", conflicts_with = "find_max")]
    back: Option<String>,
    /// Events to mark on the report's charts: a file of JSON lines {"at_ms": MS_SINCE_UNIX_EPOCH, "label": TEXT},
    /// read when the run ends, so that a deploy script may append to it while the load runs. The marks go into
    /// --json too (as seconds into the run).
    #[arg(long, value_name = "FILE", conflicts_with = "find_max")]
    marks: Option<PathBuf>,
    /// Search for the highest rate at which p99 and the error rate stay within --max-p99 and --max-error-rate:
    /// open-model steps of --step each, doubling from --start-rate, then bisecting.
    #[arg(long, conflicts_with_all = ["rate", "stages"])]
    find_max: bool,
    /// With --find-max: the p99 bound.
    #[arg(long, default_value = "100ms")]
    max_p99: String,
    /// With --find-max: the error-rate bound, in percent of requests.
    #[arg(long, default_value_t = 1.0)]
    max_error_rate: f64,
    /// With --find-max: how long each step runs.
    #[arg(long, default_value = "5s")]
    step: String,
    /// With --find-max: the first rate tried.
    #[arg(long, default_value_t = 100.0)]
    start_rate: f64,
    /// With --find-max: never try more than this rate.
    #[arg(long, default_value_t = 1_000_000.0)]
    rate_limit: f64,
}

#[derive(Args)]
struct AppArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed on stdout).
    #[arg(long, env = "NONSTOP_APP_LISTEN", default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Version reported in responses and in the X-Nonstop-Version header (an image from scripts/image sets it
    /// to the image's version).
    #[arg(long, env = "NONSTOP_APP_VERSION", default_value = "v1")]
    version: String,
    /// Instance name reported in the X-Nonstop-Instance header [default: app-PORT].
    #[arg(long)]
    instance: Option<String>,
    /// Database: sqlite://PATH (several instances may share one file) or postgres://USER@HOST/DB.
    #[arg(long, env = "NONSTOP_APP_DB", default_value = "sqlite://nonstop-app.db")]
    db: String,
    /// Requests that may run at once (Tomcat's maxThreads).
    #[arg(long, default_value_t = 16)]
    workers: usize,
    /// Requests that may wait for a worker; past workers + accept queue, requests get 503 at once
    /// (Tomcat's acceptCount).
    #[arg(long, default_value_t = 64)]
    accept_queue: usize,
    /// A request that waits longer than this for a worker gets 503.
    #[arg(long, default_value_t = 30_000)]
    queue_timeout_ms: u64,
    /// How long each request holds its worker before it is handled.
    #[arg(long, default_value_t = 0)]
    work_ms: u64,
    /// Share of requests (0 to 1) answered with 500 before doing anything.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Every this many milliseconds, all workers stall (use with --stall-ms).
    #[arg(long, default_value_t = 0)]
    stall_every_ms: u64,
    /// How long each stall lasts.
    #[arg(long, default_value_t = 0)]
    stall_ms: u64,
    /// GET /health answers 503 "starting" until this long after start-up.
    #[arg(long, default_value_t = 0)]
    ready_after_ms: u64,
    /// On SIGTERM, how long in-flight requests may take to finish before the process exits anyway.
    #[arg(long, default_value_t = 30_000)]
    drain_timeout_ms: u64,
}

impl AppArgs {
    fn into_config(self) -> nonstop_app::AppConfig {
        let ms = Duration::from_millis;
        nonstop_app::AppConfig {
            listen: self.listen,
            version: self.version,
            instance: self.instance,
            db: self.db,
            workers: self.workers,
            accept_queue: self.accept_queue,
            queue_timeout: ms(self.queue_timeout_ms),
            work: ms(self.work_ms),
            fail_rate: self.fail_rate,
            stall: nonstop_app::StallSchedule { every: ms(self.stall_every_ms), stall: ms(self.stall_ms) },
            ready_after: ms(self.ready_after_ms),
            drain_timeout: ms(self.drain_timeout_ms),
        }
    }
}

/// A write to a closed pipe (`nonstop ... | head`) ends the process quietly with status 0, as ripgrep does,
/// instead of the panic that `println!` raises on EPIPE. SIGPIPE itself stays ignored (Rust's default): the proxy
/// and the load tool write to sockets whose peers may close them, and must see EPIPE there, not die of a signal.
fn exit_quietly_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if is_broken_pipe_panic(message) {
            std::process::exit(0);
        }
        default(info);
    }));
}

/// Whether a panic is the standard library's on a failed `print!` to a closed pipe.
fn is_broken_pipe_panic(message: &str) -> bool {
    message.starts_with("failed printing to std") && message.contains(&format!("(os error {})", libc::EPIPE))
}

fn main() -> ExitCode {
    exit_quietly_on_broken_pipe();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::App(args) => run_app(args),
        Command::Serve(args) => run_serve(args),
        Command::Load(args) => return run_load(*args),
        Command::Queue(args) => return queue_cli::run(args),
        Command::Deploy(args) => return deploy_cli::deploy(args),
        Command::Rollback { admin, to, json } => return deploy_cli::rollback(admin, to, json),
        Command::History(args) => return deploy_cli::history(args),
        Command::Status(args) => return deploy_cli::status(args),
        Command::Logs(args) => return deploy_cli::logs(args),
        Command::Run(args) => return pipeline_cli::run(args),
        Command::Runs(args) => return pipeline_cli::runs(args),
        Command::Demo(args) => return demo::run(args),
        Command::Check { config, config_flag } => {
            return check(&config.or(config_flag).expect("clap requires one of them"))
        }
        Command::Keys(args) => hosts_cli::keys(args),
        Command::Hosts(args) => return hosts_cli::hosts(args),
        Command::HashPassword => hash_password(),
        Command::ConfigReference => {
            print!("{}", nonstop_config::schema::reference_markdown());
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nonstop: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `nonstop hash-password`: one line of standard input (not echoed when it is a terminal) to an argon2id hash.
fn hash_password() -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    let stdin = std::io::stdin();
    let terminal = stdin.is_terminal();
    let mut saved = None;
    if terminal {
        eprint!("password: ");
        std::io::stderr().flush()?;
        // Echo off while the password is typed, back on after, whatever happens.
        let mut t = std::mem::MaybeUninit::<libc::termios>::uninit();
        // SAFETY: tcgetattr fills `t` for fd 0 or fails; it is read only on success.
        if unsafe { libc::tcgetattr(0, t.as_mut_ptr()) } == 0 {
            let t = unsafe { t.assume_init() };
            let mut quiet = t;
            quiet.c_lflag &= !libc::ECHO;
            // SAFETY: `quiet` is a valid termios taken from this terminal.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &quiet) };
            saved = Some(t);
        }
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = saved {
        // SAFETY: restores the settings read above.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        eprintln!();
    }
    read?;
    let password = line.strip_suffix('\n').map(|l| l.strip_suffix('\r').unwrap_or(l)).unwrap_or(&line);
    anyhow::ensure!(!password.is_empty(), "no password on standard input (one line is read)");
    let hash = nonstop_guard::basic::hash_password(password.as_bytes()).map_err(anyhow::Error::msg)?;
    println!("{hash}");
    Ok(())
}

fn runtime(threads: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n.max(1));
    }
    builder.enable_all().build().context("cannot start the async runtime")
}

fn run_app(args: AppArgs) -> anyhow::Result<()> {
    runtime(None)?.block_on(async {
        let app = nonstop_app::App::bind(args.into_config()).await?;
        // The one line on stdout: tools and tests read the chosen address from it.
        println!(
            "nonstop app listening on http://{} (version {}, instance {}, db {}, pid {})",
            app.local_addr(),
            app.version(),
            app.instance(),
            app.db_kind(),
            std::process::id()
        );
        app.serve(terminate()).await;
        Ok(())
    })
}

/// Builds the run from the flags; every problem is reported, and means exit status 2.
fn load_config(
    a: &LoadArgs,
) -> Result<(nonstop_load::RunConfig, Vec<nonstop_load::Threshold>, nonstop_load::report::RunInfo), Vec<String>> {
    let mut errors = Vec::new();
    let dur = |flag: &str, raw: &str, errors: &mut Vec<String>| {
        nonstop_load::parse_duration(raw).or_else(|| {
            errors.push(format!("--{flag} {raw:?}: expected a duration such as 500ms, 10s or 2m"));
            None
        })
    };
    let duration = dur("duration", &a.duration, &mut errors);
    let timeout = dur("timeout", &a.timeout, &mut errors);
    let uri: Option<http::Uri> = a.url.parse().map_err(|e| errors.push(format!("URL {:?}: {e}", a.url))).ok();
    let target = uri.as_ref().and_then(|u| {
        if u.scheme_str() != Some("http") {
            errors.push(format!("URL {:?}: only http:// targets are supported", a.url));
            return None;
        }
        let authority = u.authority()?.to_string();
        let port = u.port_u16().unwrap_or(80);
        let host = u.host()?.trim_start_matches('[').trim_end_matches(']');
        let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host, port)).ok().and_then(|mut it| it.next());
        if addr.is_none() {
            errors.push(format!("URL {:?}: cannot resolve {host}", a.url));
        }
        Some((addr?, authority, u.path_and_query().map_or("/".to_string(), |p| p.to_string())))
    });
    let method: Option<http::Method> =
        a.method.parse().map_err(|_| errors.push(format!("--method {:?} is not an HTTP method", a.method))).ok();
    let mut headers = Vec::new();
    for h in &a.header {
        match h.split_once(':').map(|(k, v)| (http::HeaderName::from_bytes(k.trim().as_bytes()), v.trim())) {
            Some((Ok(name), value)) => headers.push((name, value.to_string())),
            _ => errors.push(format!("--header {h:?}: expected \"Name: value\"")),
        }
    }
    let track_header = a.track_header.as_ref().and_then(|h| {
        http::HeaderName::from_bytes(h.as_bytes())
            .map_err(|_| errors.push(format!("--track-header {h:?} is not a header name")))
            .ok()
    });
    let thresholds: Vec<_> = a
        .threshold
        .iter()
        .filter_map(|t| nonstop_load::Threshold::parse(t).map_err(|e| errors.push(e.to_string())).ok())
        .collect();
    let stages = a
        .stages
        .as_ref()
        .and_then(|s| nonstop_load::parse_stages(s).map_err(|e| errors.push(format!("--stages: {e}"))).ok());
    if a.connections == Some(0) {
        errors.push("--connections must be at least 1".into());
    }
    if a.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        errors.push("--rate must be a positive number of requests per second".into());
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let (duration, timeout, (addr, authority, path)) =
        (duration.expect("checked"), timeout.expect("checked"), target.expect("checked"));
    let (model, info) = match (a.rate, stages) {
        (Some(rate), _) => (
            nonstop_load::Model::Open {
                schedule: nonstop_load::Schedule::constant(rate, duration),
                connections: a.connections.unwrap_or(512),
            },
            nonstop_load::report::RunInfo {
                model: "open",
                scenario: a.scenario.is_some(),
                target_rate: Some(rate),
                duration_s: duration.as_secs_f64(),
            },
        ),
        (None, Some(stages)) => {
            let schedule = nonstop_load::Schedule::stages(&stages);
            let secs = schedule.duration().as_secs_f64();
            let mean = schedule.total() as f64 / secs.max(1e-9);
            (
                nonstop_load::Model::Open { schedule, connections: a.connections.unwrap_or(512) },
                nonstop_load::report::RunInfo {
                    model: "open",
                    scenario: a.scenario.is_some(),
                    target_rate: Some(mean),
                    duration_s: secs,
                },
            )
        }
        (None, None) => (
            nonstop_load::Model::Closed { connections: a.connections.unwrap_or(64), duration },
            nonstop_load::report::RunInfo {
                model: "closed",
                scenario: a.scenario.is_some(),
                target_rate: None,
                duration_s: duration.as_secs_f64(),
            },
        ),
    };
    let threads = a.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let target =
        nonstop_load::Target { addr, authority, path, method: method.expect("checked"), headers, body: a.body.clone() };
    let scenario = match &a.scenario {
        None => None,
        Some(path) => match std::fs::read_to_string(path) {
            Err(e) => return Err(vec![format!("--scenario {}: {e}", path.display())]),
            Ok(text) => match nonstop_load::scenario::Scenario::parse(&text) {
                Ok(s) => Some(std::sync::Arc::new(s)),
                Err(e) => return Err(vec![format!("--scenario {}: {e}", path.display())]),
            },
        },
    };
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    Ok((
        nonstop_load::RunConfig {
            target,
            model,
            threads,
            timeout,
            keep_alive: !a.no_keepalive,
            track_header,
            progress,
            http2: a.http2,
            scenario,
            abort_on: if a.abort_on_fail { thresholds.clone() } else { Vec::new() },
        },
        thresholds,
        info,
    ))
}

/// `print!` of the load report: to stderr when `--json -` takes stdout.
macro_rules! say {
    ($args:expr, $($t:tt)*) => {
        if json_to_stdout(&$args) { eprint!($($t)*) } else { print!($($t)*) }
    };
}

/// `println!` of the load report: to stderr when `--json -` takes stdout.
macro_rules! sayln {
    ($args:expr, $($t:tt)*) => {
        if json_to_stdout(&$args) { eprintln!($($t)*) } else { println!($($t)*) }
    };
}

/// `--json -`: the JSON document is stdout.
fn json_to_stdout(args: &LoadArgs) -> bool {
    args.json.as_deref() == Some(std::path::Path::new("-"))
}

/// Writes the load's JSON document to `path`, or to stdout for `-`; exit status 2 when it cannot be written.
fn write_json(path: &std::path::Path, doc: &serde_json::Value) -> Result<(), ExitCode> {
    let text = serde_json::to_string_pretty(doc).expect("JSON");
    if path == std::path::Path::new("-") {
        println!("{text}");
        return Ok(());
    }
    std::fs::write(path, text).map_err(|e| {
        eprintln!("nonstop load: cannot write {}: {e}", path.display());
        ExitCode::from(2)
    })
}

fn run_load(args: LoadArgs) -> ExitCode {
    if args.find_max {
        return find_max(args);
    }
    let (cfg, thresholds, info) = match load_config(&args) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("nonstop load: invalid arguments:\n  {}", errors.join("\n  "));
            return ExitCode::from(2);
        }
    };
    // The marks file must be there and readable before the run (it is read again, whole, when the run ends).
    let read_marks = |path: &std::path::Path, start_unix_ms: u64| {
        let read = std::fs::read_to_string(path).map_err(|e| vec![e.to_string()]);
        read.and_then(|text| nonstop_load::html::parse_marks(&text, start_unix_ms)).map_err(|errors| {
            eprintln!("nonstop load: --marks {}:\n  {}", path.display(), errors.join("\n  "));
            ExitCode::from(2)
        })
    };
    if let Some(path) = &args.marks {
        if let Err(code) = read_marks(path, 0) {
            return code;
        }
    }
    let nonstop_load::RunResult { summary, aborted_by, start_unix_ms } = nonstop_load::run(cfg);
    say!(args, "{}", nonstop_load::report::text(&summary, &info));
    if let Some(t) = &aborted_by {
        sayln!(args, "ABORTED: threshold {t} failed mid-run (--abort-on-fail)");
    }
    let rate = nonstop_load::report::achieved_rate(&summary, &info);
    let verdicts = nonstop_load::threshold::judge(&thresholds, &summary, rate);
    let mut failed = false;
    for t in &thresholds {
        let measured = t.measure(&summary, rate);
        let holds = t.holds(measured);
        failed |= !holds;
        sayln!(args, "threshold {}: {} (measured {measured:.2})", t.text(), if holds { "ok" } else { "FAILED" });
    }
    let marks = match &args.marks {
        None => Vec::new(),
        Some(path) => match read_marks(path, start_unix_ms) {
            Ok(marks) => marks,
            Err(code) => return code,
        },
    };
    if let Some(path) = &args.json {
        let mut doc = nonstop_load::report::json(&summary, &info, &verdicts);
        doc["start_unix_ms"] = start_unix_ms.into();
        doc["marks"] = marks.iter().map(|m| serde_json::json!({ "at_s": m.at_s, "label": m.label })).collect();
        if let Err(code) = write_json(path, &doc) {
            return code;
        }
    }
    if let Some(path) = &args.html {
        let title = args.title.clone().unwrap_or_else(|| format!("nonstop load {}", args.url));
        let decor = nonstop_load::html::Decor { back: args.back.as_deref().map(|b| (b, "back")), marks: &marks };
        if let Err(e) = std::fs::write(path, nonstop_load::html::page_with(&summary, &info, &title, &verdicts, &decor))
        {
            eprintln!("nonstop load: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if failed || aborted_by.is_some() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn find_max(args: LoadArgs) -> ExitCode {
    let bad = |e: String| {
        eprintln!("nonstop load: invalid arguments:\n  {e}");
        ExitCode::from(2)
    };
    let Some(max_p99) = nonstop_load::parse_duration(&args.max_p99) else {
        return bad(format!("--max-p99 {:?}: expected a duration such as 100ms", args.max_p99));
    };
    let Some(step) = nonstop_load::parse_duration(&args.step).filter(|d| !d.is_zero()) else {
        return bad(format!("--step {:?}: expected a duration such as 5s", args.step));
    };
    if !(args.start_rate >= 1.0 && args.rate_limit >= args.start_rate) {
        return bad("--start-rate must be at least 1 and at most --rate-limit".into());
    }
    let (base, thresholds, info) =
        match load_config(&LoadArgs { rate: Some(args.start_rate), duration: args.step.clone(), ..args.clone() }) {
            Ok(c) => c,
            Err(errors) => return bad(errors.join("\n  ")),
        };
    let mut search = nonstop_load::find_max::Search::new(args.start_rate, args.rate_limit);
    let mut steps = Vec::new();
    // The run of the highest rate that passed, for --html.
    let mut best_run: Option<(f64, nonstop_load::Summary, Vec<nonstop_load::threshold::Verdict>)> = None;
    sayln!(
        args,
        "find-max: p99 <= {} ms and errors <= {}%, {} s per step",
        max_p99.as_millis(),
        args.max_error_rate,
        step.as_secs_f64()
    );
    while let Some(rate) = search.rate() {
        let mut cfg = base.clone();
        cfg.progress = false;
        cfg.abort_on.clear();
        cfg.model = nonstop_load::Model::Open {
            schedule: nonstop_load::Schedule::constant(rate, step),
            connections: args.connections.unwrap_or(512),
        };
        let s = nonstop_load::run(cfg).summary;
        let c = &s.counts;
        let error_rate = 100.0 * c.failed() as f64 / c.total().max(1) as f64;
        let p99 = s.corrected_ms[2];
        let step_info =
            nonstop_load::report::RunInfo { target_rate: Some(rate), duration_s: step.as_secs_f64(), ..info.clone() };
        let verdicts =
            nonstop_load::threshold::judge(&thresholds, &s, nonstop_load::report::achieved_rate(&s, &step_info));
        let passed = nonstop_load::report::valid(&s)
            && p99 <= max_p99.as_secs_f64() * 1000.0
            && error_rate <= args.max_error_rate
            && verdicts.iter().all(|v| v.held);
        sayln!(
            args,
            "  {rate:>9.0}/s: p99 {p99:>9.2} ms, errors {error_rate:>6.2}%, not sent {:>6} -> {}",
            c.not_sent,
            if passed { "pass" } else { "fail" }
        );
        for v in verdicts.iter().filter(|v| !v.held) {
            sayln!(args, "             threshold {}: FAILED (measured {:.2})", v.threshold, v.measured);
        }
        let judged: Vec<_> = verdicts
            .iter()
            .map(|v| serde_json::json!({ "threshold": v.threshold, "measured": v.measured, "held": v.held }))
            .collect();
        steps.push(serde_json::json!({ "rate": rate, "p99_ms": p99, "error_rate": error_rate, "not_sent": c.not_sent, "thresholds": judged, "passed": passed }));
        if passed && best_run.as_ref().is_none_or(|b| b.0 < rate) {
            best_run = Some((rate, s.clone(), verdicts));
        }
        search.record(passed);
    }
    let best = search.best();
    match best {
        Some(r) => sayln!(args, "max rate: {r:.0} requests/s"),
        None => sayln!(args, "max rate: none (even the lowest rate tried failed its bounds)"),
    }
    if let Some(path) = &args.json {
        let doc = serde_json::json!({ "find_max": { "rate": best, "max_p99_ms": max_p99.as_secs_f64() * 1000.0, "max_error_rate": args.max_error_rate, "steps": steps } });
        if let Err(code) = write_json(path, &doc) {
            return code;
        }
    }
    if let Some(path) = &args.html {
        let rows: Vec<(f64, f64, f64, bool)> = steps
            .iter()
            .map(|s| {
                let f = |k: &str| s[k].as_f64().unwrap_or(0.0);
                (f("rate"), f("p99_ms"), f("error_rate"), s["passed"] == true)
            })
            .collect();
        let page = nonstop_load::html::find_max_page(
            &args.title.clone().unwrap_or_else(|| format!("nonstop load --find-max {}", args.url)),
            best,
            &rows,
            best_run.as_ref().map(|(rate, s, v)| {
                (
                    s,
                    nonstop_load::report::RunInfo {
                        target_rate: Some(*rate),
                        duration_s: step.as_secs_f64(),
                        ..info.clone()
                    },
                    v.as_slice(),
                )
            }),
        );
        if let Err(e) = std::fs::write(path, page) {
            eprintln!("nonstop load: cannot write {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    if best.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match nonstop_proxy::ConfigSource::File(path.to_path_buf()).load() {
        Ok(config) => {
            let problems = nonstop_proxy::check(&config);
            if problems.is_empty() {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            } else {
                let n = problems.len();
                eprintln!("{}: {n} error{} that serve would stop at:", path.display(), if n == 1 { "" } else { "s" });
                for p in problems {
                    eprintln!("  {p}");
                }
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprint!("{}: {e}", path.display());
            ExitCode::from(1)
        }
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    let source = match (&args.config, &args.listen) {
        (Some(path), _) => nonstop_proxy::ConfigSource::File(path.clone()),
        (None, Some(listen)) => nonstop_proxy::ConfigSource::Fixed(Box::new(
            nonstop_config::Config::quick(listen, &args.to, &args.balance, args.admin.as_deref())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )),
        (None, None) => anyhow::bail!("give --config FILE, or quick mode: --listen ADDR --to ADDR [--to ADDR ...]"),
    };
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let opts = nonstop_proxy::Options { threads, drain_timeout: Duration::from_millis(args.drain_timeout_ms) };
    let proxy = nonstop_proxy::Proxy::start(source, opts).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listen: Vec<String> = proxy.listen_addrs().iter().map(|a| format!("http://{a}")).collect();
    let admin = proxy.admin_addr().map_or(String::from("none"), |a| format!("http://{a}"));
    // The one line on stdout: tools and tests read the addresses from it.
    println!(
        "nonstop serve listening on {} (admin {admin}, threads {threads}, pid {})",
        listen.join(" "),
        std::process::id()
    );
    runtime(Some(1))?.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    proxy.reopen_access_log();
                    tracing::info!("SIGUSR1: access log reopened");
                }
                _ = hup.recv() => match proxy.reload() {
                    Ok(()) => tracing::info!("SIGHUP: config reloaded"),
                    Err(e) => tracing::error!("SIGHUP: reload rejected, the running config stays: {e}"),
                },
                () = terminate() => break,
            }
        }
        anyhow::Ok(())
    })?;
    proxy.shutdown();
    Ok(())
}

/// Resolves on the first SIGTERM or SIGINT.
async fn terminate() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("can install a SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("can install a SIGINT handler");
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining"),
        _ = int.recv() => tracing::info!("SIGINT: draining"),
    }
}

/// `nonstop queue ...`: one call to the admin API; prints its JSON. Exit status 0 on 2xx, 1 otherwise.
#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
