//! `nonstop keys init`, `nonstop hosts trust` and `nonstop hosts check` against real sshd hosts, each in a network
//! namespace the test creates (see `nonstop_testkit::sshd`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nonstop_testkit::sshd::{keygen_fingerprint, SshHost, SSHD_PORT};
use nonstop_testkit::TempDir;

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
