//! Real SSH hosts for tests: Debian's `/usr/sbin/sshd` run in a network namespace the test creates, reached over a
//! veth pair on a private /30 (10.251.N.0/30: the root side .1, the host .2). The guard kills sshd and deletes the
//! namespace (and with it the veth pair) on drop, also when the test fails. Root on the host has an empty home of
//! its own, as on a fresh machine, not this machine's /root and its shell profile.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::TempDir;

/// The port sshd listens on inside its namespace.
pub const SSHD_PORT: u16 = 2222;

const SSHD: &str = "/usr/sbin/sshd";

/// Runs a command, panicking with its standard error when it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd} ({e}): the SSH host tests need iproute2 and openssh-server (.ci/run)")
    });
    assert!(
        out.status.success(),
        "{cmd} {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Panics with a clear message unless sshd, ssh-keygen and ip are installed.
pub fn require_tools() {
    for (path, package) in [(SSHD, "openssh-server"), ("/usr/bin/ssh-keygen", "openssh-client")] {
        assert!(
            Path::new(path).exists(),
            "{path} is missing: the SSH host tests need it (apt-get install {package}, as .ci/run does)"
        );
    }
    let ip = Command::new("ip").arg("-V").output();
    assert!(
        ip.is_ok_and(|o| o.status.success()),
        "ip (iproute2) is missing: the SSH host tests need it to make network namespaces"
    );
}

/// The SHA256 fingerprint of a public key file, as `ssh-keygen -lf` prints it.
pub fn keygen_fingerprint(pub_file: &Path) -> String {
    let line = run("ssh-keygen", &["-lf", &pub_file.display().to_string()]);
    line.split_whitespace().nth(1).unwrap_or_else(|| panic!("ssh-keygen -lf printed {line:?}")).to_string()
}

/// One SSH host: a namespace with a veth pair to the root namespace, and sshd in it.
pub struct SshHost {
    pub ns: String,
    /// The veth end in the root namespace and the one in the host's.
    pub veth_root: String,
    pub veth_host: String,
    /// The host's address (the namespace side), port [`SSHD_PORT`].
    pub ip: String,
    dir: TempDir,
    sshd: Option<Child>,
    /// Lines appended to sshd_config (such as `SetEnv DOCKER_HOST=...` for a host with its own Docker engine).
    extra_config: String,
}

fn subnet_free(n: usize) -> bool {
    let out = Command::new("ip").args(["-o", "addr", "show", "to", &format!("10.251.{n}.0/30")]).output();
    out.is_ok_and(|o| o.status.success() && o.stdout.is_empty())
}

impl SshHost {
    /// Creates the namespace and veth pair and starts sshd with a new host key, `authorized` its only authorized
    /// key (for root).
    pub fn start(authorized: &str) -> SshHost {
        SshHost::start_with(authorized, |_| String::new())
    }

    /// [`SshHost::start`], with lines that `extra_config` makes from the namespace's name appended to sshd_config
    /// (for something the test starts in the namespace before sshd, such as a Docker engine).
    pub fn start_with(authorized: &str, extra_config: impl FnOnce(&str) -> String) -> SshHost {
        require_tools();
        static N: AtomicUsize = AtomicUsize::new(0);
        let pid = std::process::id() as usize;
        // A subnet no other interface uses, so that parallel tests (and test runs) keep apart.
        let mut n = 0;
        for _ in 0..250 {
            let k = N.fetch_add(1, Ordering::Relaxed);
            n = (pid * 7 + k) % 250 + 1;
            if subnet_free(n) {
                break;
            }
        }
        let k = N.fetch_add(1, Ordering::Relaxed);
        let ns = format!("nonstop-t-{pid}-{k}");
        let tag = format!("{}{k}", pid % 100_000);
        let (veth_root, veth_host) = (format!("nsr{tag}"), format!("nsh{tag}"));
        assert!(veth_root.len() <= 15);
        let dir = TempDir::new("sshd");
        let mut host = SshHost {
            ns,
            veth_root,
            veth_host,
            ip: format!("10.251.{n}.2"),
            dir,
            sshd: None,
            extra_config: String::new(),
        };
        run("ip", &["netns", "add", &host.ns]);
        run("ip", &["link", "add", &host.veth_root, "type", "veth", "peer", "name", &host.veth_host]);
        run("ip", &["link", "set", &host.veth_host, "netns", &host.ns]);
        run("ip", &["addr", "add", &format!("10.251.{n}.1/30"), "dev", &host.veth_root]);
        run("ip", &["link", "set", &host.veth_root, "up"]);
        host.in_ns(&["ip", "addr", "add", &format!("{}/30", host.ip), "dev", &host.veth_host]);
        host.in_ns(&["ip", "link", "set", &host.veth_host, "up"]);
        host.in_ns(&["ip", "link", "set", "lo", "up"]);
        host.extra_config = extra_config(&host.ns);
        std::fs::write(host.dir.path().join("authorized_keys"), format!("{authorized}\n")).expect("authorized_keys");
        host.new_host_key();
        host.start_sshd();
        host
    }

    /// Runs a command inside the namespace.
    pub fn in_ns(&self, args: &[&str]) -> String {
        let mut all = vec!["netns", "exec", self.ns.as_str()];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn addr(&self) -> SocketAddr {
        format!("{}:{SSHD_PORT}", self.ip).parse().expect("address")
    }

    /// The host key's public half.
    pub fn host_key_pub(&self) -> PathBuf {
        self.dir.path().join("host_key.pub")
    }

    fn new_host_key(&self) {
        let key = self.dir.path().join("host_key");
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(self.host_key_pub());
        run("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-C", "test-host", "-f", &key.display().to_string()]);
    }

    fn start_sshd(&mut self) {
        let d = self.dir.path().display().to_string();
        let config = format!(
            "ListenAddress {ip}:{SSHD_PORT}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
             PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPermitRootLogin prohibit-password\nPidFile {d}/sshd.pid\nLogLevel VERBOSE\n{extra}",
            ip = self.ip,
            extra = self.extra_config
        );
        let config_path = self.dir.path().join("sshd_config");
        std::fs::write(&config_path, config).expect("sshd_config");
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd (sshd's privilege separation directory)");
        let log = std::fs::File::create(self.dir.path().join("sshd.log")).expect("sshd.log");
        // The host's root gets a home of its own, as on a fresh machine: sshd's sessions run root's shell, and bash
        // reads ~/.bashrc when sshd starts it. This machine's /root/.bashrc runs `pyenv init`, a quarter of a second
        // a session and a lock that a session killed at the wrong moment leaves behind, after which every session
        // waits 60 s for it. The bind mount is made in the mount namespace `ip netns exec` gives sshd (a slave of
        // the machine's), so the machine's /root is untouched and it goes when the host's processes end.
        let home = self.dir.path().join("root-home");
        std::fs::create_dir_all(&home).expect("the host's home");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "sh", "-c", "mount --bind \"$0\" /root && exec \"$@\""])
            .arg(&home)
            .args([SSHD, "-D", "-e", "-f", &config_path.display().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start sshd");
        self.sshd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_err() {
            if let Some(status) = self.sshd.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("sshd exited ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "sshd does not listen on {} after 10 s: {}", self.addr(), self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    fn stop_sshd(&mut self) {
        if let Some(mut c) = self.sshd.take() {
            // `ip netns exec` execs sh, which execs sshd, so this is sshd itself; -D keeps it in the foreground.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts sshd with a newly generated host key (a reinstalled host, or someone in the middle).
    pub fn restart_with_new_host_key(&mut self) {
        self.stop_sshd();
        self.new_host_key();
        self.start_sshd();
    }

    /// Cuts the host's link: its side of the veth goes down, so packets to it are lost.
    pub fn cut_link(&self) {
        self.in_ns(&["ip", "link", "set", "dev", &self.veth_host, "down"]);
    }

    /// Brings a link cut by [`SshHost::cut_link`] back up: packets flow again (connections that retransmitted
    /// meanwhile carry on).
    pub fn restore_link(&self) {
        self.in_ns(&["ip", "link", "set", "dev", &self.veth_host, "up"]);
    }

    /// The processes in the namespace that are alive (zombies left out): pid and command line (arguments joined
    /// by spaces). sshd itself and its sessions are among them.
    pub fn processes(&self) -> Vec<(i32, String)> {
        let pids = run("ip", &["netns", "pids", &self.ns]);
        pids.split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                // The state follows the command name, which is in parentheses and may hold spaces.
                let state = stat.rsplit_once(')')?.1.split_whitespace().next()?;
                if state == "Z" || state == "X" {
                    return None;
                }
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let args: Vec<String> = cmdline
                    .split(|&b| b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                Some((pid, args.join(" ")))
            })
            .collect()
    }

    /// Sends `sig` to `pid`, which must be a live process in the namespace (so that a test never signals a process
    /// of its own machine by mistake).
    pub fn kill(&self, pid: i32, sig: i32) {
        let here = self.processes();
        assert!(
            pid > 0 && here.iter().any(|(p, _)| *p == pid),
            "process {pid} is not in namespace {} (host {}): {here:?}",
            self.ns,
            self.ip
        );
        // SAFETY: kill(2) of a process in the namespace this guard created, checked just above.
        let rc = unsafe { libc::kill(pid, sig) };
        assert_eq!(rc, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        self.stop_sshd();
        // Connections sshd forked for are in the namespace too: kill whatever is left in it.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    // SAFETY: kill(2) of a process in the namespace this guard created.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
        }
        let _ = Command::new("ip").args(["link", "del", &self.veth_root]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}
