//! The command line as a user meets it in a terminal and in shell pipelines: the real binary, driven with real
//! pipes, pseudo-terminals and sockets.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use nonstop_testkit::TempDir;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn nonstop(args: &[&str]) -> Output {
    Command::new(bin()).args(args).stdin(Stdio::null()).output().expect("run nonstop")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn write(dir: &TempDir, name: &str, body: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    path
}

/// Runs `nonstop args...` with its standard output on a pipe whose reading end is already closed (as after
/// `| head` exited), so its first write gets EPIPE.
fn into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nonstop");
    child.wait_with_output().expect("wait")
}

#[test]
fn a_closed_pipe_on_stdout_ends_quietly() {
    let dir = TempDir::new("cli-pipe");
    let config = write(&dir, "c.toml", MINIMAL);
    let config = config.to_str().unwrap();
    for args in [&["config-reference"][..], &["check", "--config", config], &["status", "--help"]] {
        let out = into_closed_pipe(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{args:?}: {stderr}");
    }
}

const MINIMAL: &str = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nservice = \"s\"\n\n\
                       [services.s]\nservers = [{ addr = \"127.0.0.1:1\" }]\n";

/// A `nonstop serve` whose standard error goes to a file, to count its log lines.
struct Served {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    stderr: PathBuf,
}

impl Served {
    fn start(dir: &TempDir, args: &[&str]) -> Served {
        let stderr = dir.path().join("serve.stderr");
        let mut child = Command::new(bin())
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("run nonstop serve");
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut banner).unwrap();
        // Keep draining stdout (the access log), so that the proxy never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let addr = banner.split("listening on http://").nth(1).and_then(|r| r.split_whitespace().next());
        let addr = addr.unwrap_or_else(|| panic!("no address in {banner:?}")).parse().unwrap();
        Served { child, addr, stderr }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn all_servers_failing_logs_the_ejection_share_warning_once_not_per_request() {
    let dir = TempDir::new("cli-eject");
    let apps: Vec<nonstop_testkit::Proc> = (0..3)
        .map(|i| {
            let db = format!("sqlite://{}", dir.path().join(format!("app{i}.db")).display());
            nonstop_testkit::Proc::start(bin(), &["app", "--listen", "127.0.0.1:0", "--db", &db, "--fail-rate", "1"])
        })
        .collect();
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--threads", "2"];
    let to: Vec<String> = apps.iter().map(|a| a.addr.to_string()).collect();
    for t in &to {
        args.extend(["--to", t.as_str()]);
    }
    let served = Served::start(&dir, &args);
    let url = format!("http://{}/", served.addr);
    let out = nonstop(&["load", &url, "-c", "4", "-d", "2s", "-t", "1"]);
    let requests = text(&out);
    assert!(requests.contains("500") || requests.contains("5xx"), "every server answers 500: {requests}");
    std::thread::sleep(Duration::from_millis(200));
    let log = served.stderr();
    let lines = log.lines().filter(|l| l.contains("ejection share used up")).count();
    assert!((1..=3).contains(&lines), "{lines} lines of the warning in 2 s of failing requests:\n{log}");
}

/// Runs `nonstop serve args...` with its standard output on a pseudo-terminal, as in a shell, sends `requests`
/// requests through it, and returns what the terminal showed.
fn serve_on_terminal(args: &[&str], requests: usize) -> String {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty(3) fills in two descriptors we then own; no name, termios or window size is passed.
    let rc =
        unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (master, slave) = unsafe {
        use std::os::fd::FromRawFd;
        (std::fs::File::from_raw_fd(master), std::os::fd::OwnedFd::from_raw_fd(slave))
    };
    let mut child = Command::new(bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(slave))
        .stderr(Stdio::null())
        .spawn()
        .expect("run nonstop serve");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    {
        let (seen, mut master) = (seen.clone(), master);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once the child, the last holder of the terminal's other side, is gone.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                seen.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        let now = seen.lock().unwrap().clone();
        if let Some(a) = now.split("listening on http://").nth(1).and_then(|r| r.split_whitespace().next()) {
            break a.to_string();
        }
        assert!(Instant::now() < deadline, "no banner on the terminal: {now:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    for _ in 0..requests {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    }
    // SIGTERM: a clean shutdown writes every buffered line before the process exits.
    // SAFETY: kill(2) on our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let _ = child.wait();
    std::thread::sleep(Duration::from_millis(100));
    let shown = seen.lock().unwrap().clone();
    shown
}

#[test]
fn serve_on_a_terminal_shows_no_json_access_lines_unless_asked() {
    let dir = TempDir::new("cli-tty");
    let db = format!("sqlite://{}", dir.path().join("app.db").display());
    let app = nonstop_testkit::Proc::start(bin(), &["app", "--listen", "127.0.0.1:0", "--db", &db]);
    let to = app.addr.to_string();
    let shown = serve_on_terminal(&["serve", "--listen", "127.0.0.1:0", "--to", &to, "--threads", "1"], 5);
    assert!(shown.contains("nonstop serve listening on"), "{shown:?}");
    assert!(!shown.contains("\"status\""), "no access log on the terminal by default: {shown:?}");

    // Written in the config, it is shown there (and this test can see a JSON line when there is one).
    let config = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nservice = \"s\"\n\n[services.s]\n\
         servers = [{{ addr = \"{to}\" }}]\n\n[access_log]\nenabled = true\n"
    );
    let config = write(&dir, "c.toml", config);
    let shown = serve_on_terminal(&["serve", "--config", config.to_str().unwrap(), "--threads", "1"], 5);
    assert_eq!(shown.matches("\"status\":200").count(), 5, "{shown:?}");
}

#[test]
fn check_catches_missing_tls_files_as_serve_would() {
    let dir = TempDir::new("cli-check-tls");
    let (cert, key) = (dir.path().join("no-cert.pem"), dir.path().join("no-key.pem"));
    let config = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\n[[routes]]\n\
         service = \"s\"\n\n[services.s]\nservers = [{{ addr = \"127.0.0.1:1\" }}]\n",
        cert.display(),
        key.display()
    );
    let config = write(&dir, "tls.toml", config);
    let config = config.to_str().unwrap();
    let checked = nonstop(&["check", "--config", config]);
    let said = text(&checked);
    assert_eq!(checked.status.code(), Some(1), "{said}");
    assert!(said.contains("listeners[0].tls") && said.contains("no-cert.pem"), "{said}");
    assert!(said.contains("no-key.pem"), "the key's problem too: {said}");
    // serve stops at the same config: check said what it would hit.
    let served = nonstop(&["serve", "--config", config]);
    assert_ne!(served.status.code(), Some(0), "{}", text(&served));
    assert!(text(&served).contains("no-cert.pem"), "{}", text(&served));
}

#[test]
fn check_points_invalid_utf8_to_its_line() {
    let dir = TempDir::new("cli-check-utf8");
    let mut bytes = MINIMAL.as_bytes().to_vec();
    // Line 5 is `service = "s"`: a Latin-1 é in the name.
    let at = MINIMAL.find("service = \"s\"").unwrap() + "service = \"s".len();
    bytes.insert(at, 0xe9);
    let config = write(&dir, "latin1.toml", bytes);
    let checked = nonstop(&["check", "--config", config.to_str().unwrap()]);
    let said = text(&checked);
    assert_eq!(checked.status.code(), Some(1), "{said}");
    assert!(said.contains("line 5:") && said.contains("invalid UTF-8") && said.contains("0xe9"), "{said}");
}

#[test]
fn check_lists_every_bad_value_of_an_array() {
    let dir = TempDir::new("cli-check-array");
    let config = MINIMAL.replace("service = \"s\"\n", "service = \"s\"\nmethods = [\"GET\", 1, \"PO ST\", false]\n");
    let config = write(&dir, "array.toml", config);
    let checked = nonstop(&["check", "--config", config.to_str().unwrap()]);
    let said = text(&checked);
    assert_eq!(checked.status.code(), Some(1), "{said}");
    assert!(said.contains("methods[1]") && said.contains("methods[3]"), "{said}");
}

#[test]
fn status_of_an_unknown_service_exits_1() {
    let dir = TempDir::new("cli-status");
    let lo = 33_000 + (std::process::id() % 250) as u16 * 10;
    let config = format!(
        "state_dir = \"{state}\"\n\n[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [access_log]\nenabled = false\n\n[[routes]]\nservice = \"app\"\n\n[services.app.app]\n\
         command = \"sleep 60\"\nports = \"{lo}-{hi}\"\n",
        state = dir.path().join("state").display(),
        hi = lo + 9,
    );
    let config = write(&dir, "apps.toml", config);
    let served = nonstop_testkit::Proc::start(bin(), &["serve", "--config", config.to_str().unwrap()]);
    let admin = served.addr_after("admin").expect("admin address").to_string();
    let known = nonstop(&["status", "--admin", &admin, "--service", "app"]);
    assert_eq!(known.status.code(), Some(0), "{}", text(&known));
    let unknown = nonstop(&["status", "--admin", &admin, "--service", "apq"]);
    let said = text(&unknown);
    assert_eq!(unknown.status.code(), Some(1), "{said}");
    assert!(said.contains("no app service \"apq\"") && said.contains("app"), "{said}");
}

#[test]
fn check_takes_the_file_as_a_positional_argument_too() {
    let dir = TempDir::new("cli-check-positional");
    let config = write(&dir, "c.toml", MINIMAL);
    let config = config.to_str().unwrap();
    for args in [&["check", config][..], &["check", "--config", config]] {
        let out = nonstop(args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(": ok"), "{args:?}: {}", text(&out));
    }
    assert_eq!(nonstop(&["check"]).status.code(), Some(2), "no file is a usage error");
}

/// Runs `nonstop args...` with the given environment (and no NONSTOP_ADMIN / NONSTOP_TOKEN of the caller's).
fn nonstop_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args).stdin(Stdio::null()).env_remove("NONSTOP_ADMIN").env_remove("NONSTOP_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run nonstop")
}

#[test]
fn admin_commands_find_the_admin_api_in_the_environment_or_the_config_file() {
    let dir = TempDir::new("cli-admin-conn");
    let port = 36_000 + (std::process::id() % 250) as u16 * 10;
    let config = format!("{MINIMAL}\n[admin]\nlisten = \"0.0.0.0:{port}\"\ntoken = \"s3cret-token\"\n");
    let config = write(&dir, "admin.toml", config);
    let config = config.to_str().unwrap();
    let served = nonstop_testkit::Proc::start(bin(), &["serve", "--config", config]);
    let admin = served.addr_after("admin").expect("admin address");
    assert_eq!(admin.port(), port);
    let loopback = format!("127.0.0.1:{port}");
    let token = [("NONSTOP_TOKEN", "s3cret-token")];

    // --config: the address (0.0.0.0 reached on loopback) and the token both come from the file.
    for args in
        [&["status", "--config", config][..], &["history", "--config", config], &["queue", "list", "--config", config]]
    {
        let out = nonstop_env(args, &[]);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
    }
    assert!(text(&nonstop_env(&["history", "--config", config], &[])).contains("no deploys yet"));
    // The environment.
    let out = nonstop_env(&["status"], &[("NONSTOP_ADMIN", &loopback), token[0]]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let out = nonstop_env(&["queue", "list"], &[("NONSTOP_ADMIN", &loopback)]);
    assert_eq!(out.status.code(), Some(1), "no token, refused: {}", text(&out));
    // The flag beats the environment, and the environment beats the file.
    let out = nonstop_env(&["status", "--admin", "127.0.0.1:1"], &[("NONSTOP_ADMIN", &loopback), token[0]]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("cannot reach the admin API at 127.0.0.1:1"), "{}", text(&out));
    let out = nonstop_env(&["status", "--config", config], &[("NONSTOP_ADMIN", "127.0.0.1:1")]);
    assert!(text(&out).contains("127.0.0.1:1"), "{}", text(&out));
    let out = nonstop_env(&["status", "--config", config, "--token", "wrong"], &[]);
    assert_eq!(out.status.code(), Some(1), "the flag's token beats the file's: {}", text(&out));

    // A file whose admin port is chosen at start cannot be reached this way; nor one that does not parse.
    let zero = write(&dir, "zero.toml", format!("{MINIMAL}\n[admin]\nlisten = \"127.0.0.1:0\"\n"));
    let out = nonstop_env(&["status", "--config", zero.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("port 0") && text(&out).contains("--admin"), "{}", text(&out));
    let bad = write(&dir, "bad.toml", "listeners = 3\n");
    let out = nonstop_env(&["rollback", "--config", bad.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("bad.toml") && text(&out).contains("line 1"), "{}", text(&out));
    let out = nonstop_env(&["runs", "--config", dir.path().join("missing.toml").to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    // The token flag's help warns that it shows in ps.
    assert!(text(&nonstop(&["deploy", "--help"])).contains("shows in `ps`"));
}

#[test]
fn quick_mode_errors_name_the_flags_not_lines() {
    let out = nonstop(&["serve", "--listen", "127.0.0.1:0", "--to", "nothing", "--balance", "best"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("--to \"nothing\": ") && said.contains("--balance \"best\": "), "{said}");
    assert!(!said.contains("line "), "{said}");
}

#[test]
fn every_example_config_passes_check_from_the_repository_root() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(bin()).current_dir(&root).arg("check").arg("--config").arg(&path).output().unwrap();
            assert!(out.status.success(), "{}: {}", path.display(), text(&out));
            checked.push(path);
        }
    }
    assert!(checked.len() >= 8, "the examples: {checked:?}");
}
