//! Hostile use of `nonstop serve` and its admin API (issue 17): a second proxy on held ports, cross-origin and
//! rebinding requests to the admin API, and service names that would break the Prometheus text format.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nonstop_testkit::{echo, get, Proc};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

/// A child killed when dropped, so a second proxy that wrongly started does not outlive the test.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `nonstop serve ARGS` and waits (up to 30 s) for it to exit; panics if it is still running then, which
/// means it shares the address with the first proxy. Returns its exit code and standard error.
fn refused_start(args: &[&str]) -> (Option<i32>, String) {
    let child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nonstop");
    let mut child = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "nonstop {args:?} started beside the first proxy instead of refusing");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child.0.stderr.take().expect("piped stderr").read_to_string(&mut err).expect("read stderr");
    (status.code(), err)
}

/// Requests served, by server address, as the admin API counts them.
async fn requests_by_server(admin: SocketAddr) -> BTreeMap<String, u64> {
    let v = get(admin, "/services").await.json();
    v["services"][0]["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| (s["addr"].as_str().unwrap().to_string(), s["requests"].as_u64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_a_held_listener_or_admin_address_refuses_to_start() {
    let backend = echo::start("a").await.to_string();
    let first = Proc::start(
        bin(),
        &["serve", "--listen", "127.0.0.1:0", "--to", &backend, "--admin", "127.0.0.1:0", "--threads", "2"],
    );
    let listen = first.addr.to_string();
    let admin = first.addr_after("admin").expect("admin address in the banner").to_string();
    let pid = first.pid().to_string();

    for (what, args) in [
        ("listener", ["serve", "--listen", listen.as_str(), "--to", &backend, "--admin", "127.0.0.1:0"]),
        ("admin", ["serve", "--listen", "127.0.0.1:0", "--to", &backend, "--admin", admin.as_str()]),
    ] {
        let held = if what == "listener" { &listen } else { &admin };
        let (code, err) = refused_start(&args);
        assert!(code.is_some_and(|c| c != 0), "the second serve on the {what} address exited {code:?}: {err}");
        assert!(err.contains(held.as_str()), "the refusal does not name {held}: {err}");
        assert!(err.contains(&format!("pid {pid}")), "the refusal does not name the holder, pid {pid}: {err}");
        assert!(err.contains("nonstop"), "the refusal does not name the holder's command: {err}");
    }

    // The first proxy still has every connection: each request on a new connection reaches it.
    let before = requests_by_server(first.addr_after("admin").unwrap()).await[&backend];
    for _ in 0..40 {
        assert_eq!(get(first.addr, "/").await.status, 200);
    }
    let after = requests_by_server(first.addr_after("admin").unwrap()).await[&backend];
    assert_eq!(after - before, 40, "the first proxy did not serve all the traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_a_wildcard_address_refuses_and_port_zero_still_works() {
    let backend = echo::start("a").await.to_string();
    let first = Proc::start(bin(), &["serve", "--listen", "127.0.0.1:0", "--to", &backend]);
    let wildcard = format!("0.0.0.0:{}", first.addr.port());
    let (code, err) = refused_start(&["serve", "--listen", &wildcard, "--to", &backend]);
    assert!(code.is_some_and(|c| c != 0), "exited {code:?}: {err}");
    assert!(err.contains(&wildcard) && err.contains(&format!("pid {}", first.pid())), "{err}");
    // Port 0 is never held: a second proxy on port 0 starts.
    let second = Proc::start(bin(), &["serve", "--listen", "127.0.0.1:0", "--to", &backend]);
    assert_ne!(second.addr, first.addr);
    assert_eq!(get(second.addr, "/").await.status, 200);
}
