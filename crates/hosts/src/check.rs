//! The pure part of `nonstop hosts check`: what was learned of one host, the verdict on it, the report lines, and
//! the shell commands run there.

use crate::known::KeyStatus;

/// The key a host offered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferedKey {
    /// Such as `ssh-ed25519`.
    pub algorithm: String,
    /// `SHA256:...`.
    pub fingerprint: String,
}

/// How far a connection to a host got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// No SSH handshake: refused, timed out, no route, or not an SSH server.
    Unreachable(String),
    /// The host's key is not the pinned one (never [`KeyStatus::Pinned`]).
    HostKey(KeyStatus),
    /// The handshake failed after the key was accepted.
    Handshake(String),
    /// The host refused the identity.
    AuthRefused,
    /// Logged in; what the drivers need there.
    LoggedIn {
        /// `Ok` or why `mkdir -p DIR && test -w DIR` failed.
        dir: Result<(), String>,
        /// The Docker engine's version, if one answers.
        docker: Option<String>,
    },
}

/// What `hosts check` learned of one host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub name: String,
    /// `host:port`.
    pub address: String,
    pub user: String,
    pub dir: String,
    pub key: Option<OfferedKey>,
    pub reach: Reach,
}

/// Why a host fails the check, or `None` when it passes. Docker being absent is reported, not a failure.
pub fn failure(p: &Probe) -> Option<String> {
    let offered = p.key.as_ref().map_or_else(|| "?".to_string(), |k| format!("{} {}", k.algorithm, k.fingerprint));
    match &p.reach {
        Reach::Unreachable(why) => Some(format!("unreachable: {why}")),
        Reach::HostKey(KeyStatus::Unknown | KeyStatus::Pinned) => Some(format!(
            "host key unknown: offered {offered}, nothing pinned for this host; if that is the host's key (ssh-keygen \
             -lf on its key file), pin it with: nonstop hosts trust {}",
            p.name
        )),
        Reach::HostKey(KeyStatus::Changed { pinned }) => Some(format!(
            "host key CHANGED: pinned {}, offered {offered}; refused (someone may be in the middle). If the host \
             was reinstalled, check the new key and pin it with: nonstop hosts trust {}",
            pinned.join(", "),
            p.name
        )),
        Reach::Handshake(why) => Some(format!("SSH handshake failed: {why}")),
        Reach::AuthRefused => {
            Some(format!("authentication refused for user {}: add nonstop's public key to its authorized_keys", p.user))
        }
        Reach::LoggedIn { dir: Err(why), .. } => Some(format!("release directory {} not writable: {why}", p.dir)),
        Reach::LoggedIn { dir: Ok(()), .. } => None,
    }
}

/// The report of one host: a head line `NAME (ADDRESS): ok|FAILED: why`, then indented details.
pub fn report(p: &Probe) -> String {
    let mut out = match failure(p) {
        None => format!("{} ({}): ok\n", p.name, p.address),
        Some(why) => format!("{} ({}): FAILED: {why}\n", p.name, p.address),
    };
    if let Some(k) = &p.key {
        let pinned = match &p.reach {
            Reach::Unreachable(_) | Reach::HostKey(_) => "not pinned",
            _ => "pinned",
        };
        out.push_str(&format!("  host key: {} {} ({pinned})\n", k.algorithm, k.fingerprint));
    }
    if let Reach::LoggedIn { dir, docker } = &p.reach {
        out.push_str("  reachable: yes\n");
        out.push_str(&format!("  user: {}\n", p.user));
        let dir_state = if dir.is_ok() { "writable" } else { "NOT writable" };
        out.push_str(&format!("  dir: {} ({dir_state})\n", p.dir));
        out.push_str(&format!("  docker: {}\n", docker.as_deref().unwrap_or("none")));
    }
    out
}

/// `s` quoted for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The release directory as a shell word: `~` and `~/...` are the login user's home.
pub fn dir_word(dir: &str) -> String {
    if dir == "~" {
        "\"$HOME\"".to_string()
    } else if let Some(rest) = dir.strip_prefix("~/") {
        format!("\"$HOME\"/{}", shell_quote(rest))
    } else {
        shell_quote(dir)
    }
}

/// Makes the release directory and tests that it is writable.
pub fn dir_command(dir: &str) -> String {
    let d = dir_word(dir);
    format!("mkdir -p -- {d} && test -w {d}")
}

/// Asks the host's Docker engine for its version.
pub const DOCKER_COMMAND: &str = "docker version --format '{{.Server.Version}}'";

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(reach: Reach) -> Probe {
        Probe {
            name: "web1".into(),
            address: "10.0.0.5:22".into(),
            user: "deploy".into(),
            dir: "~/nonstop".into(),
            key: Some(OfferedKey { algorithm: "ssh-ed25519".into(), fingerprint: "SHA256:new".into() }),
            reach,
        }
    }

    #[test]
    fn only_a_logged_in_host_with_a_writable_dir_passes_and_docker_is_only_reported() {
        let ok = probe(Reach::LoggedIn { dir: Ok(()), docker: None });
        assert_eq!(failure(&ok), None);
        let r = report(&ok);
        assert!(r.starts_with("web1 (10.0.0.5:22): ok\n"), "{r}");
        for want in
            ["host key: ssh-ed25519 SHA256:new (pinned)", "user: deploy", "dir: ~/nonstop (writable)", "docker: none"]
        {
            assert!(r.contains(want), "{want:?} not in {r}");
        }
        let docker = report(&probe(Reach::LoggedIn { dir: Ok(()), docker: Some("27.1.0".into()) }));
        assert!(docker.contains("docker: 27.1.0"), "{docker}");
        let dir = probe(Reach::LoggedIn { dir: Err("exit status 1".into()), docker: None });
        assert!(failure(&dir).unwrap().contains("not writable"));
        assert!(failure(&probe(Reach::AuthRefused)).unwrap().contains("user deploy"));
        assert!(failure(&probe(Reach::Unreachable("timed out".into()))).unwrap().starts_with("unreachable"));
    }

    #[test]
    fn key_failures_name_the_offered_and_the_pinned_fingerprints() {
        let unknown = failure(&probe(Reach::HostKey(KeyStatus::Unknown))).unwrap();
        assert!(unknown.contains("unknown") && unknown.contains("SHA256:new") && unknown.contains("trust web1"));
        let changed = report(&probe(Reach::HostKey(KeyStatus::Changed { pinned: vec!["SHA256:old".into()] })));
        assert!(changed.contains("CHANGED") && changed.contains("SHA256:old") && changed.contains("SHA256:new"));
        assert!(changed.contains("(not pinned)"), "{changed}");
    }

    #[test]
    fn the_release_directory_is_quoted_and_tilde_is_home() {
        assert_eq!(dir_command("~/nonstop"), "mkdir -p -- \"$HOME\"/'nonstop' && test -w \"$HOME\"/'nonstop'");
        assert_eq!(dir_word("/srv/it's here"), "'/srv/it'\\''s here'");
        assert_eq!(dir_word("~"), "\"$HOME\"");
    }
}
