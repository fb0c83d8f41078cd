//! Integration tests of `nonstop serve`: the real binary on 127.0.0.1 in front of real backends (`nonstop app`
//! processes and in-process echo servers), driven over real sockets.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use nonstop_testkit::{echo, get, post_json, send, Conn, Method, Proc, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn app(dir: &TempDir, name: &str, extra: &[&str]) -> Proc {
    let db = format!("sqlite://{}", dir.path().join("shared.db").display());
    let mut args = vec!["app", "--listen", "127.0.0.1:0", "--db", &db, "--instance", name];
    args.extend_from_slice(extra);
    Proc::start(bin(), &args)
}

fn quick(to: &[String], balance: &str) -> Proc {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--threads", "2"];
    args.extend(["--balance", balance]);
    for t in to {
        args.extend(["--to", t.as_str()]);
    }
    Proc::start(bin(), &args)
}

fn serve_file(dir: &TempDir, toml: &str) -> (Proc, std::path::PathBuf) {
    serve_file_threads(dir, toml, 2)
}

fn serve_file_threads(dir: &TempDir, toml: &str, threads: usize) -> (Proc, std::path::PathBuf) {
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, toml).unwrap();
    let threads = threads.to_string();
    let p = Proc::start(bin(), &["serve", "--config", path.to_str().unwrap(), "--threads", &threads]);
    (p, path)
}

async fn instance_counts(addr: std::net::SocketAddr, n: usize, headers: &[(&str, &str)]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let mut conn = Conn::open(addr).await.unwrap();
    for _ in 0..n {
        let r = conn.send(Method::GET, "/", headers, "").await.unwrap();
        assert_eq!(r.status, 200, "{:?}", r.body);
        *counts.entry(r.header("x-nonstop-instance").unwrap().to_string()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_mode_round_robin_spreads_evenly() {
    let dir = TempDir::new("rr");
    let apps: Vec<Proc> = ["a", "b", "c"].iter().map(|n| app(&dir, n, &[])).collect();
    let to: Vec<String> = apps.iter().map(|a| a.addr.to_string()).collect();
    let p = quick(&to, "round_robin");
    let counts = instance_counts(p.addr, 30, &[]).await;
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), [10, 10, 10], "{counts:?}");
    // POSTs go through too, with the status of the server.
    let r = post_json(p.addr, "/orders", &[], r#"{"item":"x","qty":1}"#).await;
    assert_eq!(r.status, 201);
    assert_eq!(post_json(p.addr, "/orders", &[], "{").await.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_balancing_follows_weights() {
    let dir = TempDir::new("weighted");
    let (a, b) = (app(&dir, "a", &[]), app(&dir, "b", &[]));
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"s\"\n[services.s]\nbalance = \"weighted\"\n\
         servers = [{{ addr = \"{}\", weight = 3 }}, {{ addr = \"{}\", weight = 1 }}]\n[access_log]\nenabled = false\n",
        a.addr, b.addr
    );
    let (p, _) = serve_file(&dir, &toml);
    let counts = instance_counts(p.addr, 40, &[]).await;
    assert_eq!((counts["a"], counts["b"]), (30, 10), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_inflight_and_peak_ewma_avoid_the_slow_server() {
    let dir = TempDir::new("least");
    let slow = app(&dir, "slow", &["--work-ms", "150"]);
    let fast = app(&dir, "fast", &[]);
    let to = vec![slow.addr.to_string(), fast.addr.to_string()];
    for balance in ["least_inflight", "peak_ewma"] {
        let p = quick(&to, balance);
        // Four concurrent clients for a fixed number of requests each.
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let addr = p.addr;
                tokio::spawn(async move { instance_counts(addr, 25, &[]).await })
            })
            .collect();
        let mut total: BTreeMap<String, usize> = BTreeMap::new();
        for t in tasks {
            for (k, v) in t.await.unwrap() {
                *total.entry(k).or_default() += v;
            }
        }
        let (s, f) = (total.get("slow").copied().unwrap_or(0), total.get("fast").copied().unwrap_or(0));
        assert_eq!(s + f, 100);
        assert!(s * 5 < f, "{balance}: slow {s}, fast {f}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_balancing_is_sticky() {
    let dir = TempDir::new("hash");
    let apps: Vec<Proc> = ["a", "b", "c"].iter().map(|n| app(&dir, n, &[])).collect();
    let to: Vec<String> = apps.iter().map(|a| a.addr.to_string()).collect();
    let p = quick(&to, "hash=header:x-user");
    let mut homes = std::collections::BTreeSet::new();
    for user in 0..12 {
        let user = format!("user-{user}");
        let counts = instance_counts(p.addr, 5, &[("x-user", &user)]).await;
        assert_eq!(counts.len(), 1, "{user} moved between servers: {counts:?}");
        homes.extend(counts.into_keys());
    }
    assert!(homes.len() >= 2, "12 users all on one server: {homes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_headers_are_set_and_hop_by_hop_removed() {
    let backend = echo::start("e1").await;
    let p = quick(&[backend.to_string()], "round_robin");
    let headers =
        [("x-forwarded-for", "10.1.1.1"), ("connection", "x-secret, keep-alive"), ("x-secret", "1"), ("te", "gzip")];
    let r = send(p.addr, Method::GET, "/headers", &headers, "").await.unwrap();
    let seen = r.json();
    assert_eq!(seen["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], p.addr.to_string());
    assert_eq!(seen["forwarded"], "for=127.0.0.1;proto=http;host=\"127.0.0.1\"");
    assert_eq!(seen["via"], "1.1 nonstop");
    for gone in ["connection", "x-secret", "te", "keep-alive"] {
        assert!(seen.get(gone).is_none(), "{gone} was forwarded: {seen}");
    }
    assert_eq!(r.header("via"), Some("1.1 nonstop"));
    assert_eq!(r.header("server"), Some("echo/1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hide_identity_removes_server_headers() {
    let dir = TempDir::new("hide");
    let backend = echo::start("e1").await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"s\"\n[services.s]\nhide_identity = true\n\
         servers = [{{ addr = \"{backend}\" }}]\n"
    );
    let (p, _) = serve_file(&dir, &toml);
    let r = get(p.addr, "/").await;
    assert_eq!(r.status, 200);
    assert_eq!((r.header("server"), r.header("x-nonstop-instance")), (None, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limit_answers_its_status() {
    let dir = TempDir::new("limits");
    let backend = echo::start("e1").await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout_ms = 400\nheader_count_max = 20\n\
         header_bytes_max = 8192\n\
         [[routes]]\npath_prefix = \"/only-get\"\nmethods = [\"GET\"]\nservice = \"s\"\n\
         [[routes]]\npath_prefix = \"/\"\nbody_bytes_max = 1000\nservice = \"s\"\n\
         [[routes]]\nhost = \"dead.test\"\nservice = \"dead\"\n\
         [services.s]\nresponse_timeout_ms = 200\nservers = [{{ addr = \"{backend}\" }}]\n\
         [services.dead]\nservers = [{{ addr = \"127.0.0.1:1\" }}]\n\
         [services.dead.admission]\nqueue_wait_ms_max = 0\n"
    );
    let (p, _) = serve_file(&dir, &toml);
    // 413: declared and streamed.
    let r = send(p.addr, Method::POST, "/count", &[], vec![b'x'; 1001]).await.unwrap();
    assert_eq!(r.status, 413);
    assert!(r.json()["error"].as_str().unwrap().contains("body_bytes_max of 1000"));
    assert_eq!(send(p.addr, Method::POST, "/count", &[], vec![b'x'; 1000]).await.unwrap().json()["bytes"], 1000);
    // 431: too many headers, and too large a head.
    let many: Vec<(String, String)> = (0..30).map(|i| (format!("x-h{i}"), "v".into())).collect();
    let many_ref: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(send(p.addr, Method::GET, "/", &many_ref, "").await.unwrap().status, 431);
    let big = "v".repeat(20_000);
    assert_eq!(send(p.addr, Method::GET, "/", &[("x-big", &big)], "").await.unwrap().status, 431);
    // 408: a head that never completes (slowloris).
    let mut slow = TcpStream::connect(p.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), slow.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?}");
    // 504 response timeout (no other server to retry on); 502 when the only server refuses and the queue may
    // not wait for it to come back: the body says which.
    let r = get(p.addr, "/slow?ms=1000").await;
    assert_eq!(r.status, 504);
    assert!(r.json()["error"].as_str().unwrap().starts_with("response timeout"));
    let r = send(p.addr, Method::GET, "/", &[("host", "dead.test")], "").await.unwrap();
    assert_eq!(r.status, 502);
    assert!(r.json()["error"].as_str().unwrap().contains("connect to 127.0.0.1:1 failed"), "{}", r.json());
    // A method a route does not take falls through to the next matching route (here the catch-all).
    assert_eq!(send(p.addr, Method::POST, "/only-get", &[], "").await.unwrap().status, 200);
    // 405 when the only route for the path takes other methods; 404 when no route matches.
    let dir2 = TempDir::new("limits-404");
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\npath_prefix = \"/api\"\nmethods = [\"GET\"]\nservice = \"s\"\n\
         [services.s]\nservers = [{{ addr = \"{backend}\" }}]\n"
    );
    let (p2, _) = serve_file(&dir2, &toml);
    assert_eq!(get(p2.addr, "/api/x").await.status, 200);
    assert_eq!(send(p2.addr, Method::POST, "/api/x", &[], "").await.unwrap().status, 405);
    let r = get(p2.addr, "/elsewhere").await;
    assert_eq!(r.status, 404);
    assert!(r.json()["error"].as_str().unwrap().starts_with("no route for GET"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_extra_clients_in_the_backlog() {
    let dir = TempDir::new("maxconn");
    let backend = echo::start("e1").await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nmax_connections = 1\n[[routes]]\nservice = \"s\"\n\
         [services.s]\nservers = [{{ addr = \"{backend}\" }}]\n"
    );
    let (p, _) = serve_file_threads(&dir, &toml, 1);
    let mut first = Conn::open(p.addr).await.unwrap();
    assert_eq!(first.send(Method::GET, "/", &[], "").await.unwrap().status, 200);
    let addr = p.addr;
    let second = tokio::spawn(async move { get(addr, "/").await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!second.is_finished(), "a second connection was served while the first was open");
    drop(first);
    let r = tokio::time::timeout(Duration::from_secs(5), second).await.expect("served after the first closed");
    assert_eq!(r.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_lists_changes_and_drains_servers() {
    let (a, b) = (echo::start("a").await, echo::start("b").await);
    let p = quick(&[a.to_string()], "round_robin");
    let admin = p.addr_after("admin").expect("admin address in the banner");
    let listed = get(admin, "/services").await.json();
    assert_eq!(listed["services"][0]["name"], "default");
    assert_eq!(listed["services"][0]["servers"][0]["addr"], a.to_string());

    let body = format!(r#"{{"addr":"{b}","weight":1,"slow_start":false}}"#);
    let added = send(admin, Method::POST, "/services/default/servers", &[("content-type", "application/json")], body);
    assert_eq!(added.await.unwrap().status, 201);
    let counts = instance_counts(p.addr, 10, &[]).await;
    assert_eq!((counts["a"], counts["b"]), (5, 5));

    // Drain a while a slow request is in flight on it: it gets no new requests, and wait_ms reports drained.
    let slow = tokio::spawn(async move { get(p.addr, "/slow?ms=600").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let state = get(admin, &format!("/services/default/servers/{a}")).await.json();
    let busy = if state["in_flight"] == 1 { a } else { b };
    let r = send(admin, Method::POST, &format!("/services/default/servers/{busy}/drain"), &[], "").await.unwrap();
    assert_eq!(
        (r.json()["state"].as_str(), r.json()["in_flight"].as_u64(), r.json()["drained"].as_bool()),
        (Some("draining"), Some(1), Some(false))
    );
    let counts = instance_counts(p.addr, 6, &[]).await;
    assert_eq!(counts.len(), 1, "a draining server got new requests: {counts:?}");
    let path = format!("/services/default/servers/{busy}/drain?wait_ms=5000");
    let r = send(admin, Method::POST, &path, &[], "").await.unwrap().json();
    assert_eq!((r["in_flight"].as_u64(), r["drained"].as_bool()), (Some(0), Some(true)));
    assert_eq!(slow.await.unwrap().status, 200, "the drained server's in-flight request completed");

    assert_eq!(
        send(admin, Method::DELETE, &format!("/services/default/servers/{b}"), &[], "").await.unwrap().status,
        200
    );
    assert_eq!(
        send(
            admin,
            Method::PUT,
            &format!("/services/default/servers/{a}"),
            &[("content-type", "application/json")],
            r#"{"weight":7}"#
        )
        .await
        .unwrap()
        .json()["weight"],
        7
    );
    assert_eq!(get(admin, "/services/nope").await.status, 404);
    let metrics = String::from_utf8(get(admin, "/metrics").await.body.to_vec()).unwrap();
    assert!(
        metrics.contains(&format!("nonstop_requests_total{{service=\"default\",server=\"{a}\",status=\"200\"}}")),
        "{metrics}"
    );
    assert!(metrics.contains("nonstop_request_duration_seconds_bucket{service=\"default\""), "{metrics}");
    assert!(metrics.contains("nonstop_in_flight_requests{service=\"default\""), "{metrics}");
    assert!(metrics.contains("nonstop_pool_idle_connections{service=\"default\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_required_when_configured() {
    let dir = TempDir::new("token");
    let backend = echo::start("e").await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"s\"\n[services.s]\n\
         servers = [{{ addr = \"{backend}\" }}]\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n"
    );
    let (p, _) = serve_file(&dir, &toml);
    let admin = p.addr_after("admin").unwrap();
    assert_eq!(get(admin, "/services").await.status, 401);
    let r = send(admin, Method::GET, "/services", &[("authorization", "Bearer s3cret")], "").await.unwrap();
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_switches_servers_without_dropping_a_request() {
    let dir = TempDir::new("reload");
    let (old, new) = (echo::start("old").await, echo::start("new").await);
    let config = |to: std::net::SocketAddr| {
        format!(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"s\"\n[services.s]\n\
             servers = [{{ addr = \"{to}\" }}]\n[admin]\nlisten = \"127.0.0.1:0\"\n[access_log]\nenabled = false\n"
        )
    };
    let (p, path) = serve_file(&dir, &config(old));
    let admin = p.addr_after("admin").unwrap();
    let addr = p.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut statuses, mut servers) = (BTreeMap::new(), BTreeMap::new());
                let mut conn = Conn::open(addr).await.unwrap();
                let deadline = Instant::now() + Duration::from_secs(20);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                    let r = conn.send(Method::GET, "/", &[], "").await.expect("no dropped request or connection");
                    *statuses.entry(r.status).or_insert(0usize) += 1;
                    *servers.entry(r.header("x-nonstop-instance").unwrap_or("?").to_string()).or_insert(0usize) += 1;
                }
                (statuses, servers)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(&path, config(new)).unwrap();
    p.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A bad config is rejected with its errors and the running one stays.
    std::fs::write(&path, "[[listeners]]\nlisten = \"nope\"\n").unwrap();
    let r = send(admin, Method::POST, "/config/reload", &[], "").await.unwrap();
    assert_eq!(r.status, 422);
    assert!(r.json()["error"].as_str().unwrap().contains("line 2"), "{:?}", r.body);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut servers_seen = BTreeMap::new();
    for l in loops {
        let (statuses, servers) = l.await.unwrap();
        assert_eq!(statuses.keys().copied().collect::<Vec<_>>(), [200], "{statuses:?}");
        for (k, v) in servers {
            *servers_seen.entry(k).or_insert(0) += v;
        }
    }
    assert!(servers_seen.contains_key("old") && servers_seen.contains_key("new"), "{servers_seen:?}");
    assert_eq!(get(p.addr, "/").await.header("x-nonstop-instance"), Some("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let backend = echo::start("e").await;
    let mut p = quick(&[backend.to_string()], "round_robin");
    let addr = p.addr;
    let slow = tokio::spawn(async move { get(addr, "/slow?ms=800").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting after SIGTERM");
    assert_eq!(slow.await.unwrap().status, 200);
    let status = tokio::task::spawn_blocking(move || p.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_style_upgrade_is_bridged() {
    let backend = echo::start("e").await;
    let p = quick(&[backend.to_string()], "round_robin");
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: echo\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for msg in [&b"hello"[..], b"second frame", &[0u8, 1, 2, 255]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_client_in_front_of_http1_server() {
    let backend = echo::start("e").await;
    let p = quick(&[backend.to_string()], "round_robin");
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::builder()
            .uri(format!("http://{}/headers", p.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["via"], "2 nonstop");
        assert_eq!(seen["host"], p.addr.to_string(), "the HTTP/1.1 server gets a Host header");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_servers_long_lived_responses_end_cleanly_at_the_drain_deadline() {
    let dir = TempDir::new("drain-deadline");
    let backend = echo::start("sse").await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"s\"\n\
         [services.s]\ndrain_deadline_ms = 700\nservers = [{{ addr = \"{backend}\" }}]\n"
    );
    let (p, _) = serve_file(&dir, &toml);
    let admin = p.addr_after("admin").expect("admin address");
    let addr = p.addr;
    let events = tokio::spawn(async move { get(addr, "/events").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!events.is_finished(), "the event stream runs until the drain deadline");
    let started = std::time::Instant::now();
    let drained = send(admin, Method::POST, &format!("/services/s/servers/{backend}/drain?wait_ms=5000"), &[], "")
        .await
        .unwrap()
        .json();
    assert_eq!(drained["drained"], true, "{drained}");
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(600), "the stream was cut before its deadline ({waited:?})");
    let r = tokio::time::timeout(Duration::from_secs(5), events).await.expect("the stream ended").unwrap();
    assert_eq!(r.status, 200);
    let body = String::from_utf8_lossy(&r.body);
    assert!(body.starts_with("data: tick 0") && body.contains("tick 5"), "a complete, cleanly ended stream: {body}");
}

/// One response read off a raw socket: status, lower-case headers, body (decoded when chunked).
struct RawResp {
    status: u16,
    headers: BTreeMap<String, String>,
    body: Vec<u8>,
}

/// Reads one response from `stream`, keeping what follows it in `buf`; `head_only` for an answer to HEAD.
async fn read_raw(stream: &mut TcpStream, buf: &mut Vec<u8>, head_only: bool) -> RawResp {
    async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) {
        let mut chunk = [0u8; 16384];
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await.expect("answer in time");
        let n = n.expect("read");
        assert!(n > 0, "closed mid-response; have {:?}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(stream, buf).await;
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    buf.drain(..head_end);
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = Vec::new();
    if head_only || status == 100 {
        return RawResp { status, headers, body };
    }
    if let Some(n) = headers.get("content-length") {
        let n: usize = n.parse().unwrap();
        while buf.len() < n {
            fill(stream, buf).await;
        }
        body = buf.drain(..n).collect();
    } else if headers.get("transfer-encoding").is_some_and(|t| t.contains("chunked")) {
        loop {
            let line_end = loop {
                if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(stream, buf).await;
            };
            let size = usize::from_str_radix(std::str::from_utf8(&buf[..line_end]).unwrap().trim(), 16).unwrap();
            buf.drain(..line_end + 2);
            while buf.len() < size + 2 {
                fill(stream, buf).await;
            }
            body.extend(buf.drain(..size));
            buf.drain(..2);
            if size == 0 {
                break;
            }
        }
    }
    RawResp { status, headers, body }
}

/// Whether the peer closes `stream` (with no further byte) within `limit`.
async fn closes_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(tokio::time::timeout(limit, stream.read(&mut byte)).await, Ok(Ok(0)) | Ok(Err(_)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_http1_server_keeps_every_exchange_framed() {
    let dir = TempDir::new("h1down");
    let backend = echo::start("e1").await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout_ms = 1000\n\
         [[routes]]\npath_prefix = \"/\"\nbody_bytes_max = 100000\nservice = \"s\"\n\
         [services.s]\nservers = [{{ addr = \"{backend}\" }}]\n"
    );
    let (p, _) = serve_file(&dir, &toml);
    let mut s = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = Vec::new();

    // Two pipelined requests in one write: two answers, in order, with the forwarding headers.
    s.write_all(b"GET /slow?ms=50 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /headers HTTP/1.1\r\nHost: a.test\r\n\r\n")
        .await
        .unwrap();
    let first = read_raw(&mut s, &mut buf, false).await;
    assert_eq!((first.status, first.body.as_slice()), (200, &b"{\"server\":\"e1\"}"[..]));
    assert!(first.headers.contains_key("date"), "{:?}", first.headers);
    let second = read_raw(&mut s, &mut buf, false).await;
    let seen: serde_json::Value = serde_json::from_slice(&second.body).unwrap();
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-host"], "a.test");
    assert_eq!(seen["forwarded"], "for=127.0.0.1;proto=http;host=\"a.test\"");
    assert_eq!(seen["via"], "1.1 nonstop");

    // A body that arrives in pieces is read to its declared end.
    s.write_all(b"POST /count HTTP/1.1\r\nHost: a.test\r\nContent-Length: 30000\r\n\r\n").await.unwrap();
    s.write_all(&[b'x'; 10000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.write_all(&[b'x'; 20000]).await.unwrap();
    let r = read_raw(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"{\"bytes\":30000}"[..]));

    // HEAD: a length but no body, and the connection goes on.
    s.write_all(b"HEAD / HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    let r = read_raw(&mut s, &mut buf, true).await;
    assert_eq!(r.status, 200);
    // A streamed answer of unknown length is sent chunked.
    s.write_all(b"GET /stream?bytes=200000 HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    let r = read_raw(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.body.len()), (200, 200_000));
    assert_eq!(r.headers.get("transfer-encoding").map(String::as_str), Some("chunked"));

    // A chunked request body is hyper's to read: the connection is handed over, and keeps serving.
    s.write_all(b"POST /count HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        .await
        .unwrap();
    let r = read_raw(&mut s, &mut buf, false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"{\"bytes\":5}"[..]));
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    assert_eq!(read_raw(&mut s, &mut buf, false).await.status, 200);
    assert!(buf.is_empty());

    // Idle past the header read timeout: closed without a word (a 408 is for a head that started).
    let mut idle = TcpStream::connect(p.addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    let mut ibuf = Vec::new();
    assert_eq!(read_raw(&mut idle, &mut ibuf, false).await.status, 200);
    let started = Instant::now();
    assert!(closes_within(&mut idle, Duration::from_secs(5)).await);
    assert!(started.elapsed() >= Duration::from_millis(800), "closed after {:?}", started.elapsed());

    // An answer sent before the body was read (413 on the declared length) closes the connection: the unread
    // bytes are never taken for a next request.
    let mut big = TcpStream::connect(p.addr).await.unwrap();
    big.write_all(b"POST /count HTTP/1.1\r\nHost: a.test\r\nContent-Length: 200000\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut bbuf = Vec::new();
    let r = read_raw(&mut big, &mut bbuf, false).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.headers.get("connection").map(String::as_str), Some("close"));
    assert!(closes_within(&mut big, Duration::from_secs(5)).await);

    // HTTP/1.0 and Expect: 100-continue are served (by hyper, after the hand-over).
    let mut old = TcpStream::connect(p.addr).await.unwrap();
    old.write_all(b"GET / HTTP/1.0\r\nHost: a.test\r\n\r\n").await.unwrap();
    let mut obuf = Vec::new();
    let r = read_raw(&mut old, &mut obuf, false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"{\"server\":\"e1\"}"[..]));
    let mut expect = TcpStream::connect(p.addr).await.unwrap();
    expect
        .write_all(b"POST /count HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        .await
        .unwrap();
    let mut ebuf = Vec::new();
    assert_eq!(read_raw(&mut expect, &mut ebuf, false).await.status, 100);
    expect.write_all(b"abcd").await.unwrap();
    let r = read_raw(&mut expect, &mut ebuf, false).await;
    assert_eq!((r.status, r.body.as_slice()), (200, &b"{\"bytes\":4}"[..]));
}
