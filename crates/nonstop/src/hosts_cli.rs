//! `nonstop keys init`, `nonstop hosts trust` and `nonstop hosts check`: the command line of `nonstop-hosts`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use nonstop_config::Config;

#[derive(Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    action: KeysAction,
}

#[derive(Subcommand)]
enum KeysAction {
    /// Make nonstop's ed25519 key pair in state_dir/ssh/ (private key 0600 in a 0700 directory) and print the
    /// public key as one authorized_keys line. Refuses to replace an existing key unless --force.
    Init {
        /// The config file whose state_dir to use [default: ./nonstop-state].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Replace an existing key pair (every host then needs the new public key).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Args)]
pub struct HostsArgs {
    /// The config file with the [hosts.NAME] sections.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    action: HostsAction,
}

#[derive(Subcommand)]
enum HostsAction {
    /// Connect to a host, print its key's type and SHA256 fingerprint, and pin it in state_dir/ssh/known_hosts
    /// (replacing a key pinned before). Compare the fingerprint with `ssh-keygen -lf` on the host's key first.
    Trust {
        /// The host (a [hosts.NAME] of the config).
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        name: Option<String>,
        /// Every configured host.
        #[arg(long)]
        all: bool,
    },
    /// Log in to every configured host at once and report: reachable, host key, user, release directory
    /// writable, Docker engine. Exit status 1 when any host fails, 0 otherwise.
    Check,
}

fn load(path: &Path) -> anyhow::Result<Config> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Config::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")
}

pub fn keys(args: KeysArgs) -> anyhow::Result<()> {
    let KeysAction::Init { config, force } = args.action;
    let state_dir = match &config {
        Some(path) => load(path)?.state_dir,
        None => PathBuf::from("./nonstop-state"),
    };
    let dir = nonstop_hosts::ssh_dir(&state_dir);
    let made = nonstop_hosts::keys::init(&dir, force, &nonstop_hosts::keys::default_comment())?;
    eprintln!(
        "nonstop: made {} (and .pub); add this line to ~/.ssh/authorized_keys of the user on every host:",
        made.private_path.display()
    );
    println!("{}", made.public_line);
    Ok(())
}

pub fn hosts(args: HostsArgs) -> ExitCode {
    match run_hosts(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nonstop: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_hosts(args: HostsArgs) -> anyhow::Result<ExitCode> {
    let path = args.config.context("--config FILE is required: the hosts are its [hosts.NAME] sections")?;
    let config = load(&path)?;
    if config.hosts.is_empty() {
        anyhow::bail!("{}: no [hosts.NAME] section", path.display());
    }
    let known_path = nonstop_hosts::known_hosts_path(&config.state_dir);
    match args.action {
        HostsAction::Trust { name, all } => {
            let hosts: Vec<_> = match (name, all) {
                (Some(n), _) => vec![config
                    .hosts
                    .get(&n)
                    .with_context(|| {
                        let names: Vec<&str> = config.hosts.keys().map(String::as_str).collect();
                        format!("no host {n:?} in {} (hosts: {})", path.display(), names.join(", "))
                    })?
                    .clone()],
                (None, _) => config.hosts.values().cloned().collect(),
            };
            let mut failed = 0;
            runtime()?.block_on(async {
                for h in &hosts {
                    match nonstop_hosts::trust(h, &known_path).await {
                        Ok(t) => {
                            let what = match &t.before {
                                nonstop_hosts::KeyStatus::Pinned => "already pinned".to_string(),
                                nonstop_hosts::KeyStatus::Unknown => format!("pinned in {}", known_path.display()),
                                nonstop_hosts::KeyStatus::Changed { pinned } => {
                                    format!("pinned in {}, replacing {}", known_path.display(), pinned.join(", "))
                                }
                            };
                            println!(
                                "{} ({}:{}): {} {} {what}",
                                h.name, h.host, h.port, t.key.algorithm, t.key.fingerprint
                            );
                        }
                        Err(e) => {
                            failed += 1;
                            println!("{} ({}:{}): FAILED: {e}", h.name, h.host, h.port);
                        }
                    }
                }
            });
            Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        HostsAction::Check => {
            let known = nonstop_hosts::load_known(&known_path)?;
            let hosts: Vec<_> = config.hosts.values().cloned().collect();
            let probes = runtime()?.block_on(nonstop_hosts::check_all(&hosts, known));
            let failed = probes.iter().filter(|p| nonstop_hosts::failure(p).is_some()).count();
            for p in &probes {
                print!("{}", nonstop_hosts::report(p));
            }
            println!("{} of {} hosts ok", probes.len() - failed, probes.len());
            Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
    }
}
