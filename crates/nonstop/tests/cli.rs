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
