//! Integration tests of the durable queue against the findings of a security review (issue 17): delivery keys
//! that repeat across nodes and wiped stores, guessable status ids that hand out other clients' answers, request
//! bodies read with no deadline and no bound, store files readable by anyone, and queue names that leave the data
//! directory; and the ids an operator is given to read and replay requests by, and what the public status lets out.
//! Real `nonstop serve`, `nonstop app`, `nonstop check` and `nonstop queue` processes on loopback, the embedded
//! store, the app's SQLite file as the database.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nonstop_testkit::{get, post_json, send, Method, Proc, TempDir};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

const QUEUE: &str = "orders";

fn app(db: &Path) -> Proc {
    app_on(db, "127.0.0.1:0", &[])
}

fn app_on(db: &Path, listen: &str, extra: &[&str]) -> Proc {
    let db = format!("sqlite://{}", db.display());
    let mut args = vec!["app", "--listen", listen, "--db", &db, "--workers", "8"];
    args.extend_from_slice(extra);
    Proc::start(bin(), &args)
}

/// A proxy config with its own data directory; `listener_extra` goes in the listener, `queue_extra` in the queue
/// and in the route that uses it (the keys of either are told apart by their section).
fn config(dir: &Path, tag: &str, backend: SocketAddr, listener_extra: &str, queue_extra: &[&str]) -> PathBuf {
    let is_route_key = |k: &&&str| k.starts_with("body_bytes_max");
    let route_extra: Vec<&str> = queue_extra.iter().filter(is_route_key).copied().collect();
    let queue_extra: Vec<&str> = queue_extra.iter().filter(|k| !is_route_key(k)).copied().collect();
    let (route_extra, queue_extra) = (route_extra.join("\n"), queue_extra.join("\n"));
    let text = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n{listener_extra}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [access_log]\nenabled = false\n\n\
         [[routes]]\npath_prefix = \"/orders\"\nmethods = [\"POST\"]\nservice = \"app\"\nqueue = \"{QUEUE}\"\n{route_extra}\n\n\
         [[routes]]\nservice = \"app\"\n\n\
         [services.app]\nservers = [{{ addr = \"{backend}\" }}]\n[services.app.health]\npath = \"/health\"\n\n\
         [queues.{QUEUE}]\npath = \"{path}\"\nbackoff_base_ms = 100\nbackoff_max_ms = 1000\n{queue_extra}\n",
        path = data_dir(dir, tag).display(),
    );
    let path = dir.join(format!("{tag}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn data_dir(dir: &Path, tag: &str) -> PathBuf {
    dir.join(format!("{tag}-data"))
}

fn serve(config: &Path) -> (Proc, SocketAddr) {
    let p = Proc::start(bin(), &["serve", "--config", config.to_str().unwrap()]);
    let admin = p.addr_after("admin").expect("admin address");
    (p, admin)
}

/// Posts a distinct order (`qty`); returns the 202's id and Location.
async fn accept(proxy: SocketAddr, qty: u32) -> (String, String) {
    let r = post_json(proxy, "/orders", &[], &format!(r#"{{"item":"book","qty":{qty}}}"#)).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let location = r.header("location").unwrap().to_string();
    assert_eq!(location, format!("/_nonstop/requests/{id}"));
    (id, location)
}

/// Waits (bounded) until the request's public status is no longer queued; returns it.
async fn settled(proxy: SocketAddr, location: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = get(proxy, location).await;
        assert_eq!(r.status, 200, "{location}: {:?}", r.body);
        let s = r.json();
        if s["status"] == "done" || s["status"] == "failed" || s["status"] == "dead" {
            return s;
        }
        assert!(Instant::now() < deadline, "{location} never delivered: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rows(db: &Path) -> Vec<(String, i64)> {
    let db = rusqlite::Connection::open(db).unwrap();
    let mut q = db.prepare("SELECT idempotency_key, qty FROM orders").unwrap();
    q.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))).unwrap().map(Result::unwrap).collect()
}

/// Every accepted order was delivered once with 201 (none deduplicated into another's row, none refused 422),
/// and the database holds exactly one row per order (those of `accepted`, and `earlier` ones), each under a key
/// of its own.
async fn each_202_is_one_row(accepted: &[(SocketAddr, String, u32)], earlier: &[u32], db: &Path) {
    for (proxy, location, qty) in accepted {
        let s = settled(*proxy, location).await;
        assert_eq!(s["status"], "done", "order qty={qty} at {location}: {s}");
        assert_eq!(s["response"]["status"], 201, "order qty={qty} at {location} was stored as a new row: {s}");
    }
    let rows = rows(db);
    let keys: std::collections::HashSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(keys.len(), rows.len(), "no key twice: {rows:?}");
    let mut qtys: Vec<i64> = rows.iter().map(|r| r.1).collect();
    qtys.sort();
    let mut want: Vec<i64> = accepted.iter().map(|a| a.2).chain(earlier.iter().copied()).map(i64::from).collect();
    want.sort();
    assert_eq!(qtys, want, "one row per 202: {rows:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_in_front_of_one_database_lose_no_accepted_write() {
    let dir = TempDir::new("hostile-two-nodes");
    let db = dir.path().join("orders.db");
    let app = app(&db);
    let (a, _) = serve(&config(dir.path(), "a", app.addr, "", &[]));
    let (b, _) = serve(&config(dir.path(), "b", app.addr, "", &[]));
    let mut accepted = Vec::new();
    for qty in 1..=4 {
        for (proxy, qty) in [(a.addr, qty), (b.addr, qty + 10)] {
            let (_, location) = accept(proxy, qty).await;
            accepted.push((proxy, location, qty));
        }
    }
    each_202_is_one_row(&accepted, &[], &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_with_a_wiped_store_loses_no_accepted_write() {
    let dir = TempDir::new("hostile-wiped");
    let db = dir.path().join("orders.db");
    let app = app(&db);
    let cfg = config(dir.path(), "p", app.addr, "", &[]);
    let mut accepted = Vec::new();
    {
        let (p, _) = serve(&cfg);
        for qty in 1..=3 {
            let (_, location) = accept(p.addr, qty).await;
            accepted.push((p.addr, location, qty));
        }
        each_202_is_one_row(&accepted, &[], &db).await;
    }
    std::fs::remove_dir_all(data_dir(dir.path(), "p")).unwrap();
    let (p, _) = serve(&cfg);
    // The first run's statuses went with the store: only the second run's orders can be read back.
    let mut second = Vec::new();
    for qty in 11..=13 {
        let (_, location) = accept(p.addr, qty).await;
        second.push((p.addr, location, qty));
    }
    let first: Vec<u32> = accepted.iter().map(|a| a.2).collect();
    each_202_is_one_row(&second, &first, &db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_id_is_unguessable_and_the_public_status_has_no_answer_body() {
    let dir = TempDir::new("hostile-status");
    let db = dir.path().join("orders.db");
    let app = app(&db);
    let (p, admin) = serve(&config(dir.path(), "p", app.addr, "", &[]));
    let (id, location) = accept(p.addr, 7).await;
    let secret = id.strip_prefix(&format!("{QUEUE}.")).unwrap_or_else(|| panic!("{id} is QUEUE.KEY"));
    assert_eq!(secret.len(), 32, "128 bits, in hex: {id}");
    assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    let s = settled(p.addr, &location).await;
    assert_eq!(s["status"], "done", "{s}");
    assert_eq!(s["id"], id.as_str(), "{s}");
    assert_eq!(s["response"]["status"], 201, "{s}");
    assert!(s["response"].get("body").is_none(), "the order is not in the public status: {s}");
    assert!(!s.to_string().contains("\"qty\""), "{s}");
    // The request is number 1 of its queue: that number reads nothing from the public status.
    for guess in [format!("{QUEUE}.1"), format!("{QUEUE}.0"), format!("{QUEUE}.{}", "0".repeat(32))] {
        let r = get(p.addr, &format!("/_nonstop/requests/{guess}")).await;
        assert_eq!(r.status, 404, "{guess}: {:?}", r.body);
        assert!(r.json()["error"].is_string());
    }
    // The operator sees the whole record on the admin API, under the number, with the client's id beside it.
    let r = get(admin, &format!("/queues/{QUEUE}/requests/{QUEUE}.1")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let full = r.json();
    assert_eq!(full["key"], id.as_str(), "{full}");
    let order: Value = serde_json::from_str(full["response"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(order["qty"], 7, "{full}");
    let out = Command::new(bin())
        .args(["queue", "--admin", &admin.to_string(), "show", &format!("{QUEUE}.1")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id), "{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_status_body_shows_the_answer_in_the_public_status() {
    let dir = TempDir::new("hostile-status-body");
    let db = dir.path().join("orders.db");
    let app = app(&db);
    let (p, _) = serve(&config(dir.path(), "p", app.addr, "", &["status_body = true"]));
    let (_, location) = accept(p.addr, 9).await;
    let s = settled(p.addr, &location).await;
    let order: Value = serde_json::from_str(s["response"]["body"].as_str().expect("a body")).unwrap();
    assert_eq!(order["qty"], 9, "{s}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TempDir::new("hostile-modes");
    let db = dir.path().join("orders.db");
    let app = app(&db);
    let (p, _) = serve(&config(dir.path(), "p", app.addr, "", &[]));
    let r = post_json(p.addr, "/orders", &[("authorization", "Bearer secret")], r#"{"item":"book","qty":1}"#).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let data = data_dir(dir.path(), "p");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "{}", data.display());
    let file = data.join(format!("{QUEUE}.redb"));
    assert_eq!(mode(&file), 0o600, "{}", file.display());
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path) & 0o077, 0, "{}", path.display());
    }
}

#[test]
fn a_queue_name_that_leaves_the_data_directory_is_a_config_error() {
    let dir = TempDir::new("hostile-name");
    let escape = dir.path().join("escaped");
    for name in ["../escaped", "a/b", "", "x.y", &"q".repeat(65)] {
        let text = format!(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
             [[routes]]\nservice = \"app\"\nqueue = \"{name}\"\n\n\
             [services.app]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n\n\
             [queues.\"{name}\"]\npath = \"{}\"\n",
            dir.path().join("data").display()
        );
        let cfg = dir.path().join("bad.toml");
        std::fs::write(&cfg, &text).unwrap();
        let out = Command::new(bin()).args(["check", "--config", cfg.to_str().unwrap()]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name:?} was accepted: {stderr}");
        let line = text.lines().position(|l| l.starts_with("[queues.")).unwrap() + 1;
        assert!(stderr.contains(&format!("line {line}")), "{name:?}: {stderr}");
        assert!(stderr.contains("queues.") && stderr.contains("A-Za-z0-9_-"), "{name:?}: {stderr}");
    }
    assert!(!escape.with_extension("redb").exists());
    // The same config with a plain name is fine.
    let good = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nservice = \"app\"\nqueue = \"Orders_2-b\"\n\n\
         [services.app]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n\n[queues.Orders_2-b]\npath = \"{}\"\n",
        dir.path().join("data").display()
    );
    let cfg = dir.path().join("good.toml");
    std::fs::write(&cfg, good).unwrap();
    let out = Command::new(bin()).args(["check", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Opens a connection and sends a POST head declaring `length` body bytes, and `sent` of them.
async fn stalled_post(proxy: SocketAddr, length: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let head = format!(
        "POST /orders HTTP/1.1\r\nhost: {proxy}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b' '; sent]).await.unwrap();
    s
}

/// Reads an answer's status and body off a raw connection, within `limit` (None: no answer in time).
async fn answer(s: &mut TcpStream, limit: Duration) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let deadline = Instant::now() + limit;
    loop {
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse::<usize>().ok());
            if length.is_some_and(|n| body.len() >= n) {
                let status = head.split_whitespace().nth(1)?.parse().ok()?;
                return Some((status, body.to_string()));
            }
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_queue_body_gets_408() {
    let dir = TempDir::new("hostile-stall");
    let db = dir.path().join("orders.db");
    let app = app(&db);
    let (p, _) = serve(&config(dir.path(), "p", app.addr, "header_read_timeout_ms = 1000", &[]));
    let mut s = stalled_post(p.addr, 100_000, 10).await;
    let (status, body) = answer(&mut s, Duration::from_secs(10)).await.expect("an answer to a stalled body");
    assert_eq!(status, 408, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert!(v["error"].as_str().unwrap().contains("1000 ms"), "{v}");
    // The proxy still takes whole requests.
    accept(p.addr, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_bodies_in_flight_are_bounded_across_connections() {
    let dir = TempDir::new("hostile-in-flight");
    let db = dir.path().join("orders.db");
    let app = app(&db);
    let cfg = config(
        dir.path(),
        "p",
        app.addr,
        "header_read_timeout_ms = 5000",
        &["body_bytes_in_flight_max = 300000", "body_bytes_max = 100000"],
    );
    let (p, _) = serve(&cfg);
    // Three bodies of 100,000 bytes take the whole bound while they trickle in.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(stalled_post(p.addr, 100_000, 1000).await);
    }
    let mut refused = None;
    for _ in 0..100 {
        // A small POST held for a moment can make a stalled body that arrives just then find the bound taken (a
        // 503 for it): such a stalled request is sent again, until the three hold the whole bound.
        for s in stalled.iter_mut() {
            let mut probe = [0u8; 1];
            if !matches!(s.try_read(&mut probe), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock) {
                *s = stalled_post(p.addr, 100_000, 1000).await;
            }
        }
        let r = post_json(p.addr, "/orders", &[], r#"{"item":"book","qty":1}"#).await;
        if r.status == 503 {
            refused = Some(r);
            break;
        }
        assert_eq!(r.status, 202, "{:?}", r.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = refused.expect("a 503 while the bound is taken");
    assert!(r.header("retry-after").is_some());
    let error = r.json()["error"].as_str().unwrap().to_string();
    assert!(error.contains("body_bytes_in_flight_max") && error.contains("300000"), "{error}");
    // A body of unknown length (chunked) is counted as it arrives: its first chunk finds the bound taken.
    let mut chunked = TcpStream::connect(p.addr).await.unwrap();
    let order = r#"{"item":"book","qty":1}"#;
    let req = format!(
        "POST /orders HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
         {:x}\r\n{order}\r\n0\r\n\r\n",
        p.addr,
        order.len()
    );
    chunked.write_all(req.as_bytes()).await.unwrap();
    let (status, body) = answer(&mut chunked, Duration::from_secs(10)).await.expect("an answer to a chunked body");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("body_bytes_in_flight_max"), "{body}");
    // Once the stalled bodies are given up (408), their bytes are free again.
    for s in &mut stalled {
        let (status, body) = answer(s, Duration::from_secs(15)).await.expect("an answer to a stalled body");
        assert_eq!(status, 408, "{body}");
    }
    drop(stalled);
    let r = post_json(p.addr, "/orders", &[], r#"{"item":"book","qty":2}"#).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
}

/// `nonstop queue --admin ADMIN ARGS...`: its exit code, stdout and stderr.
fn queue_cli(admin: SocketAddr, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin()).arg("queue").args(args).args(["--admin", &admin.to_string()]).output().unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code(), text(&out.stdout), text(&out.stderr))
}

async fn admin_post(admin: SocketAddr, path: &str) -> nonstop_testkit::Resp {
    send(admin, Method::POST, path, &[], "").await.unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_and_nonstop_queue_show_read_a_request_by_the_id_its_client_got() {
    let dir = TempDir::new("hostile-admin-key");
    let db = dir.path().join("orders.db");
    let app = app(&db);
    let (p, admin) = serve(&config(dir.path(), "p", app.addr, "", &[]));
    let (id, location) = accept(p.addr, 5).await;
    let key = id.strip_prefix(&format!("{QUEUE}.")).unwrap().to_string();
    settled(p.addr, &location).await;
    // By the client's id, with or without the queue's name, in either case: the whole record, number and key.
    for given in [id.clone(), key.clone(), id.to_ascii_uppercase().replacen(&QUEUE.to_ascii_uppercase(), QUEUE, 1)] {
        let r = get(admin, &format!("/queues/{QUEUE}/requests/{given}")).await;
        assert_eq!(r.status, 200, "{given}: {:?}", r.body);
        let v = r.json();
        assert_eq!((v["id"].as_str(), v["key"].as_str()), (Some(&*format!("{QUEUE}.1")), Some(&*id)), "{v}");
        assert_eq!(v["status"], "done", "{v}");
        let order: Value = serde_json::from_str(v["response"]["body"].as_str().unwrap()).unwrap();
        assert_eq!(order["qty"], 5, "{v}");
    }
    // The number still reads it, bare or as QUEUE.N.
    for given in ["1".to_string(), format!("{QUEUE}.1")] {
        let r = get(admin, &format!("/queues/{QUEUE}/requests/{given}")).await;
        assert_eq!((r.status, r.json()["key"].as_str()), (200, Some(&*id)), "{given}: {:?}", r.body);
    }
    // An unknown key is a 404 and a malformed id a 400, each naming the id.
    let unknown = format!("{QUEUE}.{}", "ab".repeat(16));
    let r = get(admin, &format!("/queues/{QUEUE}/requests/{unknown}")).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains(&unknown), "{:?}", r.body);
    for bad in
        [format!("{QUEUE}.{}", "a".repeat(31)), format!("{QUEUE}.{}g", "a".repeat(31)), "x.1".into(), "+1".into()]
    {
        let r = get(admin, &format!("/queues/{QUEUE}/requests/{bad}")).await;
        assert_eq!(r.status, 400, "{bad}: {:?}", r.body);
        let error = r.json()["error"].as_str().unwrap().to_string();
        assert!(error.contains(&bad) && error.contains("32 hex digits"), "{bad}: {error}");
    }
    // nonstop queue show takes the 202's id as well as the number.
    for given in [&id, &format!("{QUEUE}.1")] {
        let (code, out, err) = queue_cli(admin, &["show", given, "--json"]);
        assert_eq!(code, Some(0), "show {given}: {err}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!((v["id"].as_str(), v["key"].as_str()), (Some(&*format!("{QUEUE}.1")), Some(&*id)), "{v}");
    }
    let (code, _, err) = queue_cli(admin, &["show", &unknown]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("404") && err.contains(&unknown), "{err}");
    for bad in ["nonsense", "orders.", "orders.1x", &format!("{QUEUE}.{}", "a".repeat(33)), "a/b.1"] {
        let (code, _, err) = queue_cli(admin, &["show", bad]);
        assert_eq!(code, Some(2), "{bad}: {err}");
        assert!(err.contains(bad) && err.contains("QUEUE.N") && err.contains("QUEUE.KEY"), "{bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_with_their_key_and_replayed_by_it() {
    let dir = TempDir::new("hostile-dead-key");
    let db = dir.path().join("orders.db");
    let failing = app_on(&db, "127.0.0.1:0", &["--fail-rate", "1"]);
    let backend = failing.addr;
    let (p, admin) = serve(&config(dir.path(), "p", backend, "", &["attempts_max = 1"]));
    let (first, first_at) = accept(p.addr, 1).await;
    let (second, second_at) = accept(p.addr, 2).await;
    for at in [&first_at, &second_at] {
        assert_eq!(settled(p.addr, at).await["status"], "dead");
    }
    // The dead list shows each record's number and, beside it, the id its client got.
    let r = get(admin, &format!("/queues/{QUEUE}/dead")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let listed = r.json();
    let pairs: Vec<(&str, &str)> = listed["dead"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["id"].as_str().unwrap_or("-"), d["key"].as_str().unwrap_or("-")))
        .collect();
    let (one, two) = (format!("{QUEUE}.1"), format!("{QUEUE}.2"));
    assert_eq!(pairs, [(&*one, &*first), (&*two, &*second)], "{listed}");
    let (code, out, err) = queue_cli(admin, &["dead", QUEUE]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(&first) && out.contains(&second), "{out}");
    // The backend is fixed; one dead letter is replayed by its key on the admin API, the other with nonstop queue.
    drop(failing);
    let fixed = app_on(&db, &backend.to_string(), &[]);
    let r = admin_post(admin, &format!("/queues/{QUEUE}/dead/{first}/replay")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!((r.json()["id"].as_str(), r.json()["key"].as_str()), (Some(&*one), Some(&*first)), "{:?}", r.body);
    let (code, out, err) = queue_cli(admin, &["replay", &second]);
    assert_eq!(code, Some(0), "{out}{err}");
    for at in [&first_at, &second_at] {
        let s = settled(p.addr, at).await;
        assert_eq!((s["status"].as_str(), s["response"]["status"].as_u64()), (Some("done"), Some(201)), "{s}");
    }
    assert_eq!(get(fixed.addr, "/orders/count").await.json()["count"], 2);
    // A request that is no dead letter any more is a 409, and an unknown key a 404, each naming the id.
    let r = admin_post(admin, &format!("/queues/{QUEUE}/dead/{first}/replay")).await;
    assert_eq!(r.status, 409, "{:?}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains(&first), "{:?}", r.body);
    let unknown = format!("{QUEUE}.{}", "0".repeat(32));
    let r = admin_post(admin, &format!("/queues/{QUEUE}/dead/{unknown}/replay")).await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    assert!(r.json()["error"].as_str().unwrap().contains(&unknown), "{:?}", r.body);
    let (code, _, err) = queue_cli(admin, &["replay", &second]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("409") && err.contains(&second), "{err}");
}

/// A server that answers its health checks and hangs up on every other request, unanswered.
async fn hanging_up_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                if head.starts_with(b"GET /health") {
                    let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
                    let _ = s.write_all(ok.as_bytes()).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_public_status_names_no_server_without_status_body() {
    let dir = TempDir::new("hostile-status-error");
    let backend = hanging_up_server().await;
    let (plain, admin) = serve(&config(dir.path(), "plain", backend, "", &["attempts_max = 1"]));
    let (open, _) = serve(&config(dir.path(), "open", backend, "", &["attempts_max = 1", "status_body = true"]));
    let server = backend.to_string();
    let (id, location) = accept(plain.addr, 1).await;
    let s = settled(plain.addr, &location).await;
    assert_eq!(s["status"], "dead", "{s}");
    assert_eq!(s["error"], "no answer", "only the outcome's class: {s}");
    assert!(!s.to_string().contains(&server) && !s.to_string().contains("127.0.0.1"), "{s}");
    // The operator's record has the whole error, which names the server.
    let r = get(admin, &format!("/queues/{QUEUE}/requests/{id}")).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let error = r.json()["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains(&server), "{:?}", r.body);
    // A queue with status_body = true shows it to the client too.
    let (_, location) = accept(open.addr, 2).await;
    let s = settled(open.addr, &location).await;
    assert_eq!(s["status"], "dead", "{s}");
    assert!(s["error"].as_str().unwrap_or_default().contains(&server), "{s}");
}
