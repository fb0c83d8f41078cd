//! `nonstop keys init`, `nonstop hosts trust` and `nonstop hosts check` against real sshd hosts, each in a network
//! namespace the test creates (see `nonstop_testkit::sshd`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nonstop_testkit::sshd::{keygen_fingerprint, SshHost, SSHD_PORT};
use nonstop_testkit::{Proc, TempDir};
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn nonstop(args: &[&str]) -> Output {
    Command::new(bin()).args(args).env("RUST_LOG", "warn").output().expect("run nonstop")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A config with `hosts` (name, host) and state_dir in `dir`; each host's release directory is in `dir` too.
fn write_config(dir: &TempDir, hosts: &[(&str, &SshHost)], connect_timeout_ms: u64) -> String {
    let d = dir.path().display();
    let mut t = format!(
        "state_dir = \"{d}/state\"\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"app\"\n\
         [services.app]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n"
    );
    for (name, h) in hosts {
        t.push_str(&format!(
            "\n[hosts.{name}]\naddress = \"{}:{SSHD_PORT}\"\nuser = \"root\"\ndir = \"{d}/releases/{name}\"\n\
             connect_timeout_ms = {connect_timeout_ms}\n",
            h.ip
        ));
    }
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, t).expect("write config");
    path.display().to_string()
}

/// `keys init` with the config's state_dir; its public line.
fn keys_init(config: &str) -> String {
    let out = nonstop(&["keys", "init", "--config", config]);
    assert!(out.status.success(), "keys init: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The head line of one host's report.
fn head<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(&format!("{name} (")))
        .unwrap_or_else(|| panic!("no line for host {name} in:\n{report}"))
}

#[test]
fn keys_init_makes_an_owner_only_key_pair_and_refuses_to_overwrite_it() {
    let dir = TempDir::new("keys");
    let config = write_config(&dir, &[], 1000);
    let line = keys_init(&config);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert!(line.starts_with("ssh-ed25519 AAAA"), "{line}");
    assert!(line.ends_with(&format!(" nonstop@{}", hostname.trim())), "{line}");
    assert_eq!(line.split(' ').count(), 3, "one authorized_keys line: {line}");
    let ssh = dir.path().join("state/ssh");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&ssh), 0o700);
    assert_eq!(mode(&ssh.join("id_ed25519")), 0o600);
    let private = std::fs::read_to_string(ssh.join("id_ed25519")).unwrap();
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"), "{private}");
    // OpenSSH itself reads the key back and derives the same public key.
    let derived =
        nonstop_testkit::sshd::run("ssh-keygen", &["-y", "-f", &ssh.join("id_ed25519").display().to_string()]);
    assert_eq!(derived.split(' ').take(2).collect::<Vec<_>>(), line.split(' ').take(2).collect::<Vec<_>>());

    let again = nonstop(&["keys", "init", "--config", &config]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(text(&again).contains(&ssh.join("id_ed25519").display().to_string()), "{}", text(&again));
    assert_eq!(std::fs::read_to_string(ssh.join("id_ed25519")).unwrap(), private, "the key is untouched");
    let forced = nonstop(&["keys", "init", "--config", &config, "--force"]);
    assert!(forced.status.success(), "{}", text(&forced));
    assert_ne!(std::fs::read_to_string(ssh.join("id_ed25519")).unwrap(), private, "--force replaces it");
}

#[test]
fn an_unknown_host_is_refused_until_trusted_then_checked_and_a_changed_key_is_refused() {
    let dir = TempDir::new("hosts-trust");
    let config = write_config(&dir, &[], 3000);
    let public = keys_init(&config);
    let mut host = SshHost::start(&public);
    let config = write_config(&dir, &[("web1", &host)], 3000);
    let offered = keygen_fingerprint(&host.host_key_pub());

    let out = nonstop(&["hosts", "check", "--config", &config]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let line = head(&report, "web1");
    assert!(line.contains("FAILED") && line.contains("unknown") && line.contains(&offered), "{report}");

    let out = nonstop(&["hosts", "trust", "web1", "--config", &config]);
    let printed = text(&out);
    assert!(out.status.success(), "{printed}");
    assert!(
        printed.contains(&format!("ssh-ed25519 {offered}")),
        "trust prints ssh-keygen's fingerprint {offered}: {printed}"
    );
    let known = std::fs::read_to_string(dir.path().join("state/ssh/known_hosts")).unwrap();
    assert!(known.starts_with(&format!("[{}]:{SSHD_PORT} ssh-ed25519 ", host.ip)), "{known}");

    let out = nonstop(&["hosts", "check", "--config", &config]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(0), "{report}\nsshd: {}", host.log());
    assert!(head(&report, "web1").ends_with(": ok"), "{report}");
    for want in [
        format!("host key: ssh-ed25519 {offered} (pinned)"),
        "reachable: yes".to_string(),
        "user: root".to_string(),
        format!("dir: {}/releases/web1 (writable)", dir.path().display()),
    ] {
        assert!(report.contains(&want), "{want:?} not in:\n{report}");
    }
    assert!(dir.path().join("releases/web1").is_dir(), "check made the release directory");
    assert!(report.contains("docker: "), "{report}");

    host.restart_with_new_host_key();
    let new = keygen_fingerprint(&host.host_key_pub());
    assert_ne!(new, offered);
    let out = nonstop(&["hosts", "check", "--config", &config]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let line = head(&report, "web1");
    assert!(line.contains("CHANGED") && line.contains(&offered) && line.contains(&new), "both fingerprints: {report}");
}

#[test]
fn hosts_are_checked_in_parallel_and_a_cut_link_costs_one_connect_timeout() {
    const TIMEOUT_MS: u64 = 2000;
    let dir = TempDir::new("hosts-parallel");
    let config = write_config(&dir, &[], TIMEOUT_MS);
    let public = keys_init(&config);
    let hosts: Vec<SshHost> = (0..3).map(|_| SshHost::start(&public)).collect();
    let named: Vec<(&str, &SshHost)> = ["a", "b", "c"].into_iter().zip(&hosts).collect();
    let config = write_config(&dir, &named, TIMEOUT_MS);
    let out = nonstop(&["hosts", "trust", "--all", "--config", &config]);
    assert!(out.status.success(), "{}", text(&out));
    let out = nonstop(&["hosts", "check", "--config", &config]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));

    hosts[1].cut_link();
    let started = Instant::now();
    let out = nonstop(&["hosts", "check", "--config", &config]);
    let elapsed = started.elapsed();
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(head(&report, "b").contains("FAILED: unreachable"), "{report}");
    assert!(head(&report, "a").ends_with(": ok") && head(&report, "c").ends_with(": ok"), "{report}");
    assert!(report.contains("2 of 3 hosts ok"), "{report}");
    assert!(
        elapsed < Duration::from_millis(2 * TIMEOUT_MS),
        "the dead host should cost one connect timeout ({TIMEOUT_MS} ms), took {elapsed:?}:\n{report}"
    );

    // Two dead hosts still cost one timeout, not two: they are waited for side by side.
    hosts[2].cut_link();
    let started = Instant::now();
    let out = nonstop(&["hosts", "check", "--config", &config]);
    let elapsed = started.elapsed();
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(head(&report, "c").contains("FAILED: unreachable"), "{report}");
    assert!(report.contains("1 of 3 hosts ok"), "{report}");
    assert!(elapsed < Duration::from_millis(2 * TIMEOUT_MS), "two dead hosts took {elapsed:?}:\n{report}");
}

#[test]
fn a_host_that_does_not_authorize_nonstops_key_fails_the_check_and_an_unknown_name_is_refused() {
    let dir = TempDir::new("hosts-auth");
    let config = write_config(&dir, &[], 3000);
    keys_init(&config);
    // The host authorizes another key, not nonstop's.
    let other = dir.path().join("other");
    nonstop_testkit::sshd::run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-f", &other.display().to_string()]);
    let host = SshHost::start(std::fs::read_to_string(other.with_extension("pub")).unwrap().trim());
    let config = write_config(&dir, &[("web1", &host)], 3000);
    let out = nonstop(&["hosts", "trust", "--all", "--config", &config]);
    assert!(out.status.success(), "{}", text(&out));
    let out = nonstop(&["hosts", "check", "--config", &config]);
    let report = text(&out);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert!(head(&report, "web1").contains("authentication refused for user root"), "{report}");
    assert!(report.contains("(pinned)"), "the key was pinned, so the handshake got to authentication: {report}");

    let out = nonstop(&["hosts", "trust", "web9", "--config", &config]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("no host \"web9\"") && text(&out).contains("web1"), "{}", text(&out));
}

// ---- The SSH driver: `nonstop serve` runs an app service's instances on SSH hosts. ----

/// The driver tests share the machine's two cores, so they run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const READS: &str = "[[flow]]\nname = \"read\"\n[[flow.step]]\nurl = \"/\"\n";
const ORDERS: &str =
    "[[flow]]\nname = \"order\"\n[[flow.step]]\nmethod = \"POST\"\nurl = \"/orders\"\njson = { item = \"book-{{seq}}\", qty = 1 }\n";

/// A proxy whose app service `web` runs one instance on each of its SSH hosts (h1, h2, ...), every instance a
/// `nonstop app` shipped as the release (a copy of this test's binary) and sharing one SQLite file (the namespaces
/// share the file system). Fields drop in order: the proxy (SIGKILL), then the hosts (whatever is left in their
/// namespaces is killed), then the directory.
struct SshRig {
    proxy: Option<Proc>,
    admin: String,
    hosts: Vec<SshHost>,
    names: Vec<String>,
    dir: TempDir,
    config: std::path::PathBuf,
}

impl SshRig {
    /// The key pair, `n` hosts authorizing it, the release and the config; no host trusted yet, no proxy yet.
    fn setup(tag: &str, slot: u16, n: usize) -> SshRig {
        let dir = TempDir::new(tag);
        let bootstrap = write_config(&dir, &[], 2000);
        let public = keys_init(&bootstrap);
        let hosts: Vec<SshHost> = (0..n).map(|_| SshHost::start(&public)).collect();
        let names: Vec<String> = (1..=n).map(|k| format!("h{k}")).collect();
        let release = dir.path().join("release");
        std::fs::create_dir_all(&release).unwrap();
        // The test's own binary is the release (a hard link: the same bytes, without a copy of them).
        if std::fs::hard_link(bin(), release.join("nonstop")).is_err() {
            std::fs::copy(bin(), release.join("nonstop")).expect("copy the binary into the release");
        }
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::write(dir.path().join("reads.toml"), READS).unwrap();
        std::fs::write(dir.path().join("orders.toml"), ORDERS).unwrap();
        // Each host is a namespace of its own, with its own ports: the range only keeps clear of other tests' habits.
        let base = 34_000 + (std::process::id() % 150) as u16 * 40 + slot * 10;
        let d = dir.path().display();
        let quoted: Vec<String> = names.iter().map(|n| format!("\"{n}\"")).collect();
        let mut config = format!(
            "state_dir = \"{d}/state\"\n\n[[listeners]]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout_ms = 1000\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\n[access_log]\npath = \"{d}/access.log\"\nflush_ms = 10\n\n[[routes]]\nservice = \"web\"\n\n\
             [services.web]\nresponse_timeout_ms = 2000\nconnect_timeout_ms = 500\n\n\
             [services.web.retry]\nadd_idempotency_key = true\n\n\
             [services.web.app]\ndriver = \"ssh\"\nhosts = [{hosts}]\ncount = 1\nrelease = \"{d}/release\"\n\
             keep_releases = 3\n\
             command = \"./nonstop app --listen {{addr}} --version {{version}} --instance {{instance}} \
             --db sqlite://{d}/data/app.db --workers 8 --work-ms 2\"\n\
             version = \"v1\"\nports = \"{lo}-{hi}\"\nready_interval_ms = 100\nsoak_ms = 3000\nready_timeout_ms = 10000\n\
             stop_grace_ms = 5000\nrestart_backoff_base_ms = 200\np99_slack_ms = 2000\n",
            hosts = quoted.join(", "),
            lo = base,
            hi = base + 9,
        );
        for (name, h) in names.iter().zip(&hosts) {
            config.push_str(&format!(
                "\n[hosts.{name}]\naddress = \"{}:{SSHD_PORT}\"\nuser = \"root\"\ndir = \"{d}/hosts/{name}\"\n\
                 connect_timeout_ms = 2000\n",
                h.ip
            ));
        }
        let path = dir.path().join("nonstop.toml");
        std::fs::write(&path, config).unwrap();
        let check = Command::new(bin()).args(["check", "--config"]).arg(&path).output().unwrap();
        assert!(check.status.success(), "nonstop check: {}", text(&check));
        SshRig { proxy: None, admin: String::new(), hosts, names, dir, config: path }
    }

    /// `setup` with every host trusted, then `serve`, until one healthy instance of v1 serves on each host.
    fn new(tag: &str, slot: u16, n: usize) -> SshRig {
        let mut rig = SshRig::setup(tag, slot, n);
        rig.trust(&["--all"]);
        rig.serve();
        rig.wait_serving("v1");
        rig
    }

    fn config_arg(&self) -> String {
        self.config.display().to_string()
    }

    /// `nonstop hosts trust ARGS --config C`.
    fn trust(&self, args: &[&str]) {
        let config = self.config_arg();
        let out = nonstop(&[&["hosts", "trust"], args, &["--config", &config]].concat());
        assert!(out.status.success(), "hosts trust {args:?}: {}", text(&out));
    }

    fn serve(&mut self) {
        let proxy = Proc::start(bin(), &["serve", "--config", &self.config_arg()]);
        self.admin = proxy.addr_after("admin").expect("serve names its admin address").to_string();
        self.proxy = Some(proxy);
    }

    fn proxy(&self) -> &Proc {
        self.proxy.as_ref().expect("the proxy runs")
    }

    fn host(&self, name: &str) -> &SshHost {
        let k = self.names.iter().position(|n| n == name).unwrap_or_else(|| panic!("no host {name}"));
        &self.hosts[k]
    }

    /// The host's name whose IP is that of `addr` ("10.251.N.2:PORT").
    fn host_of_addr(&self, addr: &str) -> Option<String> {
        let ip = addr.rsplit_once(':').map_or(addr, |(ip, _)| ip);
        self.hosts.iter().position(|h| h.ip == ip).map(|k| self.names[k].clone())
    }

    /// `nonstop ARGS --admin ADDR`, its output printed.
    fn nonstop(&self, args: &[&str]) -> Output {
        let out = Command::new(bin()).args(args).args(["--admin", &self.admin]).output().expect("run nonstop");
        eprintln!("$ nonstop {}\n{}", args.join(" "), text(&out));
        out
    }

    /// `nonstop status --json`: the service's part.
    fn status(&self) -> Value {
        let out = Command::new(bin()).args(["status", "--json", "--admin", &self.admin]).output().unwrap();
        assert!(out.status.success(), "status: {}", text(&out));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["services"][0].clone()
    }

    fn instances(s: &Value) -> Vec<Value> {
        s["instances"].as_array().cloned().unwrap_or_default()
    }

    /// Polls status (up to `secs`) until `ok` holds for it; panics with the last status otherwise.
    fn wait_status(&self, what: &str, secs: u64, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let s = self.status();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "{what}: not so after {secs} s: {s:#}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until exactly one healthy ssh instance of `version` serves on each host, at the host's address, and
    /// no deploy runs.
    fn wait_serving(&self, version: &str) -> Value {
        let s = self.wait_status(&format!("one healthy instance of {version} serving on each host"), 60, |s| {
            let inst = SshRig::instances(s);
            let mut on: Vec<String> = inst.iter().filter_map(|i| i["host"].as_str().map(String::from)).collect();
            on.sort();
            inst.iter().all(|i| {
                i["version"] == version
                    && i["state"] == "serving"
                    && i["healthy"] == true
                    && i["running"] == true
                    && i["driver"] == "ssh"
            }) && on == self.names
                && s["deploy"].is_null()
        });
        for i in SshRig::instances(&s) {
            let name = i["host"].as_str().unwrap();
            let addr = i["addr"].as_str().unwrap();
            assert_eq!(self.host_of_addr(addr).as_deref(), Some(name), "listens on its host's address: {i:#}");
        }
        s
    }

    /// The instance running on host `name`, from `s`.
    fn on_host(s: &Value, name: &str) -> Value {
        SshRig::instances(s)
            .into_iter()
            .find(|i| i["host"] == name)
            .unwrap_or_else(|| panic!("no instance on {name}: {s:#}"))
    }

    /// `nonstop load` at `rate` requests/s for `seconds` of one scenario, on a thread; `join` gives its JSON.
    fn load(&self, scenario: &str, rate: u32, seconds: u32) -> std::thread::JoinHandle<Value> {
        let (rate, duration) = (rate.to_string(), format!("{seconds}s"));
        let args = ["--rate", &rate, "--duration", &duration, "--connections", "2000", "--timeout", "30s"];
        let scenario = self.dir.path().join(format!("{scenario}.toml"));
        let args = [&args[..], &["--track-header", "X-Nonstop-Version"]].concat();
        nonstop_testkit::run_load(bin(), self.proxy().addr, &scenario, &args, self.dir.path())
    }

    /// The versions that answered 100 GETs.
    fn versions_now(&self) -> Value {
        self.load("reads", 100, 1).join().unwrap()["headers"].clone()
    }

    /// (rows, distinct items) of the orders table in the database every host's instances share.
    fn orders(&self) -> (u64, u64) {
        let db = rusqlite::Connection::open(self.dir.path().join("data/app.db")).unwrap();
        let (rows, items): (i64, i64) = db
            .query_row("SELECT COUNT(*), COUNT(DISTINCT item) FROM orders", [], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap();
        (rows as u64, items as u64)
    }

    fn assert_no_failures(&self, doc: &Value) {
        let r = &doc["requests"];
        let brief = format!("requests {} errors {} status {}", r, doc["errors"], doc["status"]);
        assert!(count(&r["scheduled"]) > 0, "{brief}");
        let failures: Vec<Value> = std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| l["status"].as_u64().unwrap_or(0) >= 500)
            .take(5)
            .collect();
        assert_eq!(count(&r["failed"]), 0, "{brief}; the proxy's log of failures: {failures:#?}");
        assert_eq!(count(&r["not_sent"]), 0, "{brief}");
        assert!(doc["valid"].as_bool().unwrap(), "{brief}");
    }

    /// Every order that got a 2xx is in the database exactly once (each has its own item name).
    fn assert_orders_stored_once(&self, orders: &Value) {
        let sent = count(&orders["requests"]["ok"]);
        assert!(sent > 0, "orders were created: {}", orders["requests"]);
        assert_eq!(self.orders(), (sent, sent), "(rows, distinct items) against {sent} orders answered 2xx");
    }

    /// Live `nonstop app` processes in the hosts' namespaces, as "HOST: PID COMMAND"; with `wrappers`, also the
    /// driver's wrapper shells that wait for them (their command line names `nonstop-instance`).
    fn left_on_hosts(&self, wrappers: bool) -> Vec<String> {
        let mut left = Vec::new();
        for (name, h) in self.names.iter().zip(&self.hosts) {
            for (pid, cmd) in h.processes() {
                let app = cmd.contains(" app ") && cmd.contains("--listen");
                if app || (wrappers && cmd.contains("nonstop-instance")) {
                    left.push(format!("{name}: {pid} {cmd}"));
                }
            }
        }
        left
    }

    /// Live `nonstop app` processes in the hosts' namespaces, as "HOST: PID COMMAND".
    fn instances_left(&self) -> Vec<String> {
        self.left_on_hosts(false)
    }

    /// Exactly one live `nonstop app` process on each host, of `version`.
    fn assert_one_app_per_host(&self, version: &str) {
        let left = self.instances_left();
        for name in &self.names {
            let on: Vec<&String> = left.iter().filter(|l| l.starts_with(&format!("{name}: "))).collect();
            assert!(
                on.len() == 1 && on[0].contains(&format!("--version {version}")),
                "one app process of {version} on {name}: {left:#?}"
            );
        }
    }

    /// The instance's process (status' pid) is a live `nonstop app` of `version` in its host's namespace.
    fn assert_runs_on_its_host(&self, i: &Value, version: &str) {
        let name = i["host"].as_str().unwrap_or_else(|| panic!("an instance names its host: {i:#}"));
        let pid = i["pid"].as_i64().unwrap_or(0) as i32;
        let procs = self.host(name).processes();
        let cmd = procs
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|(_, c)| c.clone())
            .unwrap_or_else(|| panic!("pid {pid} of {i:#} is not a process in {name}'s namespace: {procs:?}"));
        let listen = format!("--listen {}", i["addr"].as_str().unwrap());
        assert!(
            cmd.contains("nonstop app") && cmd.contains(&listen) && cmd.contains(&format!("--version {version}")),
            "pid {pid} on {name} runs {cmd:?}"
        );
    }

    /// SIGTERM: the proxy stops every remote instance and exits 0; no instance process is left on any host.
    fn shut_down(&mut self) {
        let pids: Vec<i64> = SshRig::instances(&self.status()).iter().filter_map(|i| i["pid"].as_i64()).collect();
        let proxy = self.proxy.as_mut().expect("the proxy runs");
        proxy.signal(libc::SIGTERM);
        let started = Instant::now();
        let exit = proxy.wait_exit(Duration::from_secs(60));
        assert!(exit.is_some_and(|s| s.success()), "serve exits 0 after SIGTERM: {exit:?}");
        eprintln!("serve stopped its remote instances and exited in {} ms", started.elapsed().as_millis());
        assert_eq!(self.instances_left(), Vec::<String>::new(), "instances left after serve exited (pids {pids:?})");
        // The wrappers that waited for them exit once they recorded the exit status (which is how serve learnt of it).
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.left_on_hosts(true).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(self.left_on_hosts(true), Vec::<String>::new(), "wrappers left 2 s after serve exited");
    }
}

fn count(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The JSON lines of `deploy --json` output (other lines left out).
fn events(out: &str) -> Vec<Value> {
    out.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|v| v.get("step").is_some()).collect()
}

fn at(e: &Value) -> u64 {
    e["at_ms"].as_u64().unwrap_or(0)
}

/// Prints the deploy's timeline and the durations of its parts, as derived from its events.
fn print_timings(rig: &SshRig, events: &[Value], wall: Duration) {
    eprintln!("---- timeline of the deploy (at_ms step message) ----");
    for e in events {
        eprintln!("{:>7} {:<12} {}", at(e), e["step"].as_str().unwrap_or(""), e["message"].as_str().unwrap_or(""));
    }
    let first = |step: &str| events.iter().find(|e| e["step"] == step).map(at);
    let last = |step: &str| events.iter().rev().find(|e| e["step"] == step).map(at);
    eprintln!("---- timings ----");
    eprintln!("total (nonstop deploy, wall clock): {} ms", wall.as_millis());
    if let Some(done) = last("done") {
        eprintln!("total (the deploy's own clock, start to done): {done} ms");
    }
    if let Some(shipped) = last("shipped") {
        eprintln!("shipping the release to every host (in parallel), from the start: {shipped} ms");
        for e in events.iter().filter(|e| e["step"] == "shipped") {
            eprintln!("  {}", e["message"].as_str().unwrap_or(""));
        }
    }
    let mut ids: Vec<u64> =
        events.iter().filter(|e| e["step"] == "started").filter_map(|e| e["instance"].as_u64()).collect();
    ids.dedup();
    for id in ids {
        let of = |step: &str| events.iter().find(|e| e["step"] == step && e["instance"] == id).map(at);
        let addr = events
            .iter()
            .find(|e| e["step"] == "started" && e["instance"] == id)
            .and_then(|e| e["addr"].as_str())
            .unwrap_or("");
        let host = rig.host_of_addr(addr).unwrap_or_default();
        match (of("started"), of("ready"), of("in_service")) {
            (Some(s), Some(r), Some(t)) => eprintln!(
                "instance {id} on {host} ({addr}): started at {s} ms, ready after {} ms, takes traffic {} ms later",
                r - s,
                t - r
            ),
            other => eprintln!("instance {id} on {host} ({addr}): started/ready/in_service at {other:?}"),
        }
    }
    if let (Some(s), Some(t)) = (first("started"), last("in_service")) {
        eprintln!("rollout (first new instance started to the last taking traffic): {} ms", t - s);
    }
    if let (Some(s), Some(p)) = (first("soak"), first("soak_passed")) {
        eprintln!("soak: {} ms", p - s);
    }
    if let (Some(p), Some(d)) = (first("soak_passed"), last("done")) {
        eprintln!("stopping the old instances (soak passed to done): {} ms", d - p);
    }
}

#[test]
fn ssh_rolling_deploy_on_3_hosts_under_load_fails_nothing_ships_once_per_host_and_stores_every_order_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = SshRig::new("sroll", 0, 3);
    let s = rig.status();
    for i in SshRig::instances(&s) {
        rig.assert_runs_on_its_host(&i, "v1");
    }
    for name in &rig.names {
        let shipped = rig.dir.path().join(format!("hosts/{name}/releases/v1/nonstop"));
        assert!(shipped.is_file(), "v1 is shipped to {name} as {}", shipped.display());
    }

    let reads = rig.load("reads", 150, 25);
    let orders = rig.load("orders", 150, 25);
    std::thread::sleep(Duration::from_secs(2));
    let started = Instant::now();
    let out = rig.nonstop(&["deploy", "--version", "v2", "--json"]);
    let wall = started.elapsed();
    let printed = text(&out);
    let events = events(&String::from_utf8_lossy(&out.stdout));
    print_timings(&rig, &events, wall);
    assert!(out.status.success(), "the deploy succeeds: {printed}");

    // The release is shipped once to each host, named in its event.
    let shipped: Vec<&Value> = events.iter().filter(|e| e["step"] == "shipped").collect();
    assert_eq!(shipped.len(), 3, "one shipping per host: {printed}");
    assert!(shipped.iter().all(|e| e["bytes"].as_u64().unwrap_or(0) > 0), "each host got the bytes: {printed}");
    for name in &rig.names {
        assert_eq!(
            shipped
                .iter()
                .filter(|e| e["message"].as_str().unwrap_or("").contains(&format!("shipped to {name} ")))
                .count(),
            1,
            "v2 shipped to {name} once: {printed}"
        );
        let release = rig.dir.path().join(format!("hosts/{name}/releases/v2/nonstop"));
        assert!(release.is_file(), "v2 is in {name}'s releases: {}", release.display());
        let size = std::fs::metadata(bin()).unwrap().len();
        assert_eq!(std::fs::metadata(&release).unwrap().len(), size, "the whole binary arrived on {name}");
        assert!(rig.dir.path().join(format!("hosts/{name}/releases/v1")).exists(), "v1 is kept on {name}");
    }
    // One new instance at a time, each on a host of its own.
    let in_service: Vec<&Value> = events.iter().filter(|e| e["step"] == "in_service").collect();
    assert_eq!(in_service.len(), 3, "one at a time: {printed}");
    let mut hosts: Vec<String> =
        in_service.iter().filter_map(|e| rig.host_of_addr(e["addr"].as_str().unwrap_or(""))).collect();
    hosts.sort();
    assert_eq!(hosts, rig.names, "the new instances are on every host: {printed}");

    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    rig.assert_no_failures(&reads);
    rig.assert_no_failures(&orders);
    assert!(reads["headers"]["v2"].as_u64().unwrap_or(0) > 0, "v2 served during the load: {}", reads["headers"]);
    let s = rig.wait_serving("v2");
    for i in SshRig::instances(&s) {
        rig.assert_runs_on_its_host(&i, "v2");
    }
    assert_eq!(rig.versions_now(), serde_json::json!({ "v2": 100 }));
    rig.assert_orders_stored_once(&orders);
    rig.assert_one_app_per_host("v2");

    // `nonstop logs` fetches the remote instances' output over SSH, each under a header naming instance and host.
    let out = rig.nonstop(&["logs", "web"]);
    let logs = text(&out);
    assert!(out.status.success(), "{logs}");
    assert!(logs.contains("nonstop app listening on http://10.251.") && logs.contains("(version v2"), "{logs}");
    for name in &rig.names {
        assert!(logs.contains(&format!(" on host {name} (v2, ")), "the logs name host {name}: {logs}");
    }
    let one = SshRig::on_host(&s, "h2");
    let id = one["id"].to_string();
    let out = rig.nonstop(&["logs", "--service", "web", "--instance", &id]);
    let logs = text(&out);
    assert!(out.status.success(), "{logs}");
    let addr = one["addr"].as_str().unwrap();
    assert!(
        logs.contains(&format!("==> instance {id} on host h2 (v2, {addr}"))
            && logs.contains(&format!("listening on http://{addr}")),
        "instance {id} on h2: {logs}"
    );
    for other in SshRig::instances(&s).iter().filter(|i| i["id"] != one["id"]) {
        let other = other["addr"].as_str().unwrap();
        assert!(!logs.contains(other), "only instance {id}'s log, not {other}'s: {logs}");
    }

    rig.shut_down();
}

#[test]
fn ssh_a_host_whose_link_is_cut_mid_deploy_fails_it_and_the_rollback_to_v1_fails_no_request() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = SshRig::new("scut", 1, 3);
    let reads = rig.load("reads", 150, 30);
    let orders = rig.load("orders", 150, 30);
    std::thread::sleep(Duration::from_secs(2));

    // The deploy runs on its own; its JSON lines stream back as they happen.
    let mut child = Command::new(bin())
        .args(["deploy", "--version", "v2", "--json", "--admin", &rig.admin])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start nonstop deploy");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    // Until the first new instance takes traffic.
    while !events(&lines.join("\n")).iter().any(|e| e["step"] == "in_service") {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!("no new instance took traffic within 60 s: {}", lines.join("\n"));
            }
        }
    }
    // A host no new instance was started on yet, the last one in order.
    let so_far = events(&lines.join("\n"));
    let replaced: Vec<String> = so_far
        .iter()
        .filter(|e| e["step"] == "started")
        .filter_map(|e| rig.host_of_addr(e["addr"].as_str().unwrap_or("")))
        .collect();
    let victim = rig
        .names
        .iter()
        .rev()
        .find(|n| !replaced.contains(n))
        .unwrap_or_else(|| panic!("every host got a new instance already: {}", lines.join("\n")))
        .clone();
    rig.host(&victim).cut_link();
    let cut = Instant::now();
    eprintln!("cut the link of {victim} (new instances so far on {replaced:?})");

    let limit = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > limit {
            let _ = child.kill();
            panic!("the deploy did not end within 120 s of the cut of {victim}: {}", lines.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("the deploy ended {} ms after the cut", cut.elapsed().as_millis());
    reader.join().unwrap();
    lines.extend(rx.try_iter());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let printed = format!("{}\n{stderr}", lines.join("\n"));
    eprintln!("$ nonstop deploy --version v2 --json\n{printed}");
    assert_eq!(status.code(), Some(1), "the deploy fails: {printed}");
    assert!(printed.contains("rolled back to v1"), "{printed}");
    let failed: Vec<Value> = events(&printed).into_iter().filter(|e| e["step"] == "failed").collect();
    assert!(
        failed.iter().any(|e| e["message"].as_str().unwrap_or("").contains(&format!("host {victim}"))),
        "the failure names the cut host {victim}: {printed}"
    );

    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    rig.assert_no_failures(&reads);
    rig.assert_no_failures(&orders);
    rig.assert_orders_stored_once(&orders);
    let last = rig.status()["last_deploy"].clone();
    assert_eq!((last["version"].as_str(), last["result"].as_str()), (Some("v2"), Some("rolled_back")), "{last:#}");

    // The link comes back: v1 serves on every host again, and the shutdown leaves nothing behind.
    rig.host(&victim).restore_link();
    rig.wait_serving("v1");
    assert_eq!(rig.versions_now(), serde_json::json!({ "v1": 100 }));
    // The v2 instances were stopped, and the v1 instance that was lost behind the cut link was not left running
    // beside the one started again.
    rig.assert_one_app_per_host("v1");
    rig.shut_down();
}

#[test]
fn ssh_kill_9_of_a_remote_instance_under_load_fails_nothing_and_it_is_restarted_over_ssh() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = SshRig::new("skill", 2, 3);
    let victim = SshRig::on_host(&rig.status(), "h2");
    rig.assert_runs_on_its_host(&victim, "v1");
    let pid = victim["pid"].as_i64().unwrap() as i32;
    let reads = rig.load("reads", 150, 10);
    let orders = rig.load("orders", 150, 10);
    std::thread::sleep(Duration::from_secs(2));
    rig.host("h2").kill(pid, libc::SIGKILL);
    let killed = Instant::now();
    let s = rig.wait_status("the killed instance restarted and healthy again", 30, |s| {
        let i = SshRig::on_host(s, "h2");
        i["id"] == victim["id"] && i["restarts"] == 1 && i["healthy"] == true && i["running"] == true
    });
    eprintln!("the instance on h2 was restarted and healthy {} ms after kill -9", killed.elapsed().as_millis());
    let again = SshRig::on_host(&s, "h2");
    let how = again["last_exit"].as_str().unwrap_or("");
    assert!(how.contains("signal 9") || how.contains("137"), "last_exit tells the kill: {again:#}");
    assert_ne!(again["pid"], victim["pid"], "a new process: {again:#}");
    rig.assert_runs_on_its_host(&again, "v1");
    assert_eq!(again["addr"], victim["addr"], "at the same address: {again:#}");

    let (reads, orders) = (reads.join().unwrap(), orders.join().unwrap());
    rig.assert_no_failures(&reads);
    rig.assert_no_failures(&orders);
    rig.assert_orders_stored_once(&orders);
    rig.wait_serving("v1");
    rig.assert_one_app_per_host("v1");
    // The restarted instance serves: GETs straight to it answer.
    let addr: std::net::SocketAddr = again["addr"].as_str().unwrap().parse().unwrap();
    let r = tokio::runtime::Runtime::new().unwrap().block_on(nonstop_testkit::get(addr, "/"));
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.header("x-nonstop-version"), Some("v1"));
    rig.shut_down();
}

#[test]
fn ssh_a_host_whose_key_changed_or_was_never_trusted_is_refused_naming_it_and_the_others_keep_serving() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rig = SshRig::setup("skey", 3, 3);
    rig.trust(&["--all"]);
    let pinned = keygen_fingerprint(&rig.host("h2").host_key_pub());
    rig.hosts[1].restart_with_new_host_key();
    let offered = keygen_fingerprint(&rig.host("h2").host_key_pub());
    assert_ne!(pinned, offered);
    rig.serve();
    let refused = |i: &Value| {
        let how = i["last_exit"].as_str().unwrap_or("");
        i["running"] == false && how.contains("host h2") && how.contains(&pinned) && how.contains(&offered)
    };
    let s = rig.wait_status("h1 and h3 serve v1, h2's instance refused", 60, |s| {
        let inst = SshRig::instances(s);
        let on = |name: &str| inst.iter().find(|i| i["host"] == name).cloned();
        let serving = |i: Option<Value>| {
            i.is_some_and(|i| i["state"] == "serving" && i["healthy"] == true && i["version"] == "v1")
        };
        serving(on("h1")) && serving(on("h3")) && on("h2").is_some_and(|i| refused(&i))
    });
    eprintln!("h2's instance: {:#}", SshRig::on_host(&s, "h2"));
    // Nothing runs on h2: it was never logged in to.
    assert_eq!(rig.instances_left().iter().filter(|l| l.starts_with("h2:")).count(), 0, "{:?}", rig.instances_left());

    let out = rig.nonstop(&["deploy", "--version", "v2"]);
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(1), "the deploy fails: {printed}");
    assert!(
        printed.contains("host h2") && printed.contains(&pinned) && printed.contains(&offered),
        "the deploy names h2 and both fingerprints ({pinned} pinned, {offered} offered): {printed}"
    );
    assert_eq!(rig.versions_now(), serde_json::json!({ "v1": 100 }), "h1 and h3 keep serving v1");
    let s = rig.status();
    for name in ["h1", "h3"] {
        let i = SshRig::on_host(&s, name);
        assert!(i["version"] == "v1" && i["healthy"] == true && i["state"] == "serving", "{name}: {i:#}");
    }
    assert!(refused(&SshRig::on_host(&s, "h2")), "{s:#}");
    rig.shut_down();
    drop(rig);

    // Two hosts, only h1 trusted: h2 is unknown, and refused.
    let mut rig = SshRig::setup("sunknown", 3, 2);
    rig.trust(&["h1"]);
    let fingerprint = keygen_fingerprint(&rig.host("h2").host_key_pub());
    rig.serve();
    let s = rig.wait_status("h1 serves v1, h2's instance refused as unknown", 60, |s| {
        let inst = SshRig::instances(s);
        let h1 = inst.iter().find(|i| i["host"] == "h1");
        let h2 = inst.iter().find(|i| i["host"] == "h2");
        h1.is_some_and(|i| i["state"] == "serving" && i["healthy"] == true)
            && h2.is_some_and(|i| {
                let how = i["last_exit"].as_str().unwrap_or("");
                i["running"] == false
                    && how.contains("host h2")
                    && how.contains("unknown")
                    && how.contains(&fingerprint)
            })
    });
    eprintln!("h2's instance: {:#}", SshRig::on_host(&s, "h2"));
    let out = rig.nonstop(&["deploy", "--version", "v2"]);
    let printed = text(&out);
    assert_eq!(out.status.code(), Some(1), "the deploy fails: {printed}");
    assert!(
        printed.contains("host h2") && printed.contains("unknown") && printed.contains(&fingerprint),
        "the deploy names h2, unknown, and the offered key {fingerprint}: {printed}"
    );
    assert_eq!(rig.versions_now(), serde_json::json!({ "v1": 100 }), "h1 keeps serving v1");
    rig.shut_down();
}
