//! The `nonstop` binary: parses the command line and hands each subcommand to the crate that owns it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

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
    /// Validate a config file and print every error with its line.
    Check {
        /// The TOML config file.
        #[arg(long)]
        config: PathBuf,
    },
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

#[derive(Args)]
struct AppArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// Version reported in responses and in the X-Nonstop-Version header.
    #[arg(long, default_value = "v1")]
    version: String,
    /// Instance name reported in the X-Nonstop-Instance header [default: app-PORT].
    #[arg(long)]
    instance: Option<String>,
    /// Database: sqlite://PATH (several instances may share one file) or postgres://USER@HOST/DB.
    #[arg(long, default_value = "sqlite://nonstop-app.db")]
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::App(args) => run_app(args),
        Command::Serve(args) => run_serve(args),
        Command::Check { config } => return check(&config),
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

fn check(path: &std::path::Path) -> ExitCode {
    match nonstop_proxy::ConfigSource::File(path.to_path_buf()).load() {
        Ok(_) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
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
        (None, Some(listen)) => nonstop_proxy::ConfigSource::Fixed(
            nonstop_config::Config::quick(listen, &args.to, &args.balance, args.admin.as_deref())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
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
        loop {
            tokio::select! {
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
