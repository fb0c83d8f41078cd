//! Integration tests of the durable queue, with both backends (the embedded store, and the RabbitMQ on
//! 127.0.0.1:5672): real `nonstop serve` and `nonstop app` processes on loopback, a route `POST /orders` marked
//! `queue = NAME`, and the app's SQLite file as the database. The RabbitMQ tests run one at a time (one of them
//! restarts the broker), each on queues of its own.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nonstop_testkit::{get, post_json, Conn, Method, Proc, TempDir};
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn app(dir: &TempDir, listen: &str, extra: &[&str]) -> Proc {
    let db = format!("sqlite://{}", dir.path().join("orders.db").display());
    let mut args = vec!["app", "--listen", listen, "--db", &db];
    args.extend_from_slice(extra);
    Proc::start(bin(), &args)
}

/// An address nothing listens on yet: an app started on port 0, then stopped.
fn free_backend_addr(dir: &TempDir) -> SocketAddr {
    app(dir, "127.0.0.1:0", &[]).addr
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Store {
    Embedded,
    Rabbit,
}

static RABBIT: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Serialises the RabbitMQ tests; the embedded ones run freely.
fn exclusive(store: Store) -> Option<std::sync::MutexGuard<'static, ()>> {
    (store == Store::Rabbit).then(|| RABBIT.lock().unwrap_or_else(|e| e.into_inner()))
}

/// A queue name of its own for each test (the broker's queues outlive the test).
fn queue_name(tag: &str) -> String {
    format!("{tag}{}", std::process::id())
}

fn config(dir: &TempDir, backend: SocketAddr, store: Store, queue: &str, queue_extra: &str) -> std::path::PathBuf {
    let store_line = match store {
        Store::Embedded => String::new(),
        Store::Rabbit => "store = \"rabbitmq\"\n".to_string(),
    };
    let text = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[access_log]\nenabled = false\n\n\
         [[routes]]\npath_prefix = \"/orders\"\nmethods = [\"POST\"]\nservice = \"app\"\nqueue = \"{queue}\"\n\n\
         [[routes]]\nservice = \"app\"\n\n\
         [services.app]\nservers = [{{ addr = \"{backend}\" }}]\n[services.app.health]\npath = \"/health\"\n\n\
         [queues.{queue}]\n{store_line}path = \"{path}\"\nbackoff_base_ms = 100\nbackoff_max_ms = 1000\n{queue_extra}\n",
        path = dir.path().join("nonstop-data").display(),
    );
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn serve(config: &Path) -> (Proc, SocketAddr) {
    let p = Proc::start(bin(), &["serve", "--config", config.to_str().unwrap()]);
    let admin = p.addr_after("admin").expect("admin address");
    (p, admin)
}

const ORDER: &str = r#"{"item":"book","qty":1}"#;

/// Waits until the queue has had nothing left to deliver for a while (the broker's depth is read every second).
async fn drained(admin: SocketAddr, queue: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    let mut quiet_since: Option<Instant> = None;
    loop {
        let q = get(admin, &format!("/queues/{queue}")).await.json();
        if q["depth"] == 0 && q["delivering"] == 0 {
            let since = *quiet_since.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_millis(2500) {
                return q;
            }
        } else {
            quiet_since = None;
        }
        assert!(Instant::now() < deadline, "the queue did not drain: {q}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn order_count(backend: SocketAddr) -> u64 {
    get(backend, "/orders/count").await.json()["count"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_accepted_while_the_backend_is_down_then_delivered_exactly_once() {
    backend_down(Store::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_accepted_while_the_backend_is_down_then_delivered_exactly_once() {
    backend_down(Store::Rabbit).await;
}

async fn backend_down(store: Store) {
    let _one = exclusive(store);
    let dir = TempDir::new("queue-down");
    let queue = queue_name("down");
    let backend = free_backend_addr(&dir);
    let (p, admin) = serve(&config(&dir, backend, store, &queue, ""));
    // 2,000 POSTs over 10 s while the backend is down: every one is accepted.
    let json = dir.path().join("load.json");
    let out = Command::new(bin())
        .args(["load", &format!("http://{}/orders", p.addr), "--rate", "200", "--duration", "10s"])
        .args(["-X", "POST", "-H", "content-type: application/json", "--body", ORDER, "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success() || out.status.code() == Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["requests"]["scheduled"], 2000, "{doc}");
    assert_eq!(doc["status"]["202"], 2000, "every POST got a 202: {}", doc["status"]);
    let q = get(admin, &format!("/queues/{queue}")).await.json();
    assert_eq!(q["accepted_total"], 2000, "{q}");

    let app = app(&dir, &backend.to_string(), &["--workers", "8"]);
    let q = drained(admin, &queue, Duration::from_secs(90)).await;
    assert_eq!(order_count(app.addr).await, 2000, "all 2,000 in the database, each once: {q}");
    assert_eq!(q["dead_letters"], 0, "{q}");
    let commits = q["commits_total"].as_u64().unwrap();
    let ops = q["committed_ops_total"].as_u64().unwrap();
    assert!(ops > commits, "group commit: several operations per fsync ({ops} in {commits} commits)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_kill_9_of_the_proxy_loses_no_accepted_request() {
    burst_with_a_fault(Store::Embedded, Fault::KillProxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_kill_9_of_the_proxy_loses_no_accepted_request() {
    burst_with_a_fault(Store::Rabbit, Fault::KillProxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarted_during_a_burst_loses_no_accepted_request() {
    burst_with_a_fault(Store::Rabbit, Fault::RestartBroker).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    KillProxy,
    RestartBroker,
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl").args(args).output().expect("rabbitmqctl");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

async fn burst_with_a_fault(store: Store, fault: Fault) {
    let _one = exclusive(store);
    let dir = TempDir::new("queue-burst");
    let queue = queue_name(if fault == Fault::KillProxy { "kill" } else { "restart" });
    let app = app(&dir, "127.0.0.1:0", &["--workers", "8"]);
    let cfg = config(&dir, app.addr, store, &queue, "");
    let (first, _) = serve(&cfg);
    let proxy = first.addr;
    let mut running = Some(first);
    // A burst of up to 10,000 POSTs on 64 connections; the proxy is killed in the middle of it.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let accepted = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (next, accepted) = (next.clone(), accepted.clone());
            tokio::spawn(async move {
                let Ok(mut conn) = Conn::open(proxy).await else { return };
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 10_000 {
                    let headers = [("content-type", "application/json")];
                    match conn.send(Method::POST, "/orders", &headers, ORDER).await {
                        Ok(r) if r.status == 202 => {
                            let id = r.json()["id"].as_str().unwrap().to_string();
                            assert_eq!(r.header("location"), Some(format!("/_nonstop/requests/{id}").as_str()));
                            accepted.lock().unwrap().push(id);
                        }
                        // While the broker is away, a request it could not confirm is refused, never accepted.
                        Ok(r) if r.status == 503 && fault == Fault::RestartBroker => {
                            assert!(r.header("retry-after").is_some());
                        }
                        Ok(r) => panic!("unexpected answer {}: {:?}", r.status, r.body),
                        Err(_) => return, // the proxy died
                    }
                }
            })
        })
        .collect();
    while next.load(std::sync::atomic::Ordering::Relaxed) < 3000 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match fault {
        Fault::KillProxy => drop(running.take()), // SIGKILL
        Fault::RestartBroker => {
            rabbitmqctl(&["stop_app"]);
            tokio::time::sleep(Duration::from_secs(1)).await;
            rabbitmqctl(&["start_app"]);
        }
    }
    for c in clients {
        c.await.unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    assert!(accepted.len() >= 2000, "{} accepted", accepted.len());
    let p = match running {
        Some(p) => p,
        None => serve(&cfg).0,
    };
    let admin = p.addr_after("admin").unwrap();
    drained(admin, &queue, Duration::from_secs(120)).await;
    // Every request that got a 202 was delivered, and the database holds each exactly once: as many rows as
    // requests the store holds (some may have been persisted without their 202 getting out; none is lost). The
    // store's requests are read on the admin API by number, up to a long run of numbers it does not hold (with
    // RabbitMQ, a request whose publish was not confirmed is forgotten, and leaves a gap).
    let mut persisted = 0u64;
    let (mut n, mut misses) = (0u64, 0u32);
    while misses < 500 {
        n += 1;
        let r = get(admin, &format!("/queues/{queue}/requests/{queue}.{n}")).await;
        if r.status == 404 {
            misses += 1;
            continue;
        }
        misses = 0;
        assert_eq!(r.json()["status"], "done", "{}", r.json());
        persisted += 1;
    }
    for id in &accepted {
        let r = get(p.addr, &format!("/_nonstop/requests/{id}")).await;
        assert_eq!(r.json()["status"], "done", "accepted {id} was delivered: {}", r.json());
    }
    assert!(persisted >= accepted.len() as u64);
    // Each delivery carries Idempotency-Key: the request's id (QUEUE.KEY), so the database tells which requests it
    // holds, and how often.
    let db = rusqlite::Connection::open(dir.path().join("orders.db")).unwrap();
    let keys: Vec<String> = db
        .prepare("SELECT idempotency_key FROM orders")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let distinct: std::collections::HashSet<&str> = keys.iter().map(String::as_str).collect();
    assert_eq!(distinct.len(), keys.len(), "no request is in the database twice");
    for id in &accepted {
        assert!(distinct.contains(id.as_str()), "accepted {id} is in the database");
    }
    assert_eq!(order_count(app.addr).await, keys.len() as u64);
    if fault == Fault::RestartBroker {
        // A publish whose confirm was lost with the broker is answered 503 and forgotten locally, yet the broker
        // may have kept it: such a request can still be delivered (once). Nothing accepted is lost or doubled.
        assert!(keys.len() as u64 >= persisted, "{} rows, {persisted} persisted", keys.len());
    } else {
        assert_eq!(keys.len() as u64, persisted, "each persisted request is in the database exactly once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_request_always_rejected_becomes_a_dead_letter_and_can_be_replayed() {
    dead_letter(Store::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_a_request_always_rejected_becomes_a_dead_letter_and_can_be_replayed() {
    dead_letter(Store::Rabbit).await;
}

async fn dead_letter(store: Store) {
    let _one = exclusive(store);
    let dir = TempDir::new("queue-dead");
    let queue = queue_name("dead");
    let failing = app(&dir, "127.0.0.1:0", &["--fail-rate", "1"]);
    let backend = failing.addr;
    let (p, admin) = serve(&config(&dir, backend, store, &queue, "attempts_max = 3\n"));
    let r = post_json(p.addr, "/orders", &[], ORDER).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let location = r.header("location").unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = get(p.addr, &location).await.json();
        if s["status"] == "dead" {
            break s;
        }
        assert!(Instant::now() < deadline, "never dead: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["attempts"], 3, "{status}");
    assert_eq!(status["response"]["status"], 500, "{status}");

    let cli = |args: &[&str]| {
        let out =
            Command::new(bin()).args(["queue", "--json", "--admin", &admin.to_string()]).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, listed) = cli(&["dead", &queue]);
    assert_eq!(code, Some(0));
    // The list shows the operator's id (QUEUE.N) and the client's (QUEUE.KEY) beside it; either reads the record.
    let listed: Value = serde_json::from_str(&listed).unwrap();
    let number = listed["dead"][0]["id"].as_str().unwrap_or_else(|| panic!("{listed}")).to_string();
    assert_eq!(listed["dead"][0]["key"], id.as_str(), "{listed}");
    for given in [&number, &id] {
        let (code, shown) = cli(&["show", given]);
        assert_eq!(code, Some(0), "show {given}");
        let shown: Value = serde_json::from_str(&shown).unwrap();
        assert_eq!((&shown["id"], &shown["key"]), (&Value::from(&*number), &Value::from(&*id)), "{shown}");
    }
    // The tables a person reads, from the same records: the queue, its dead letter by both ids, the record.
    let table = |args: &[&str]| {
        let out = Command::new(bin()).args(["queue", "--admin", &admin.to_string()]).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, queues) = table(&["list"]);
    assert_eq!(code, Some(0), "{queues}");
    let row: Vec<&str> = queues
        .lines()
        .find(|l| l.starts_with(&queue))
        .unwrap_or_else(|| panic!("{queues}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[6], "1", "one dead letter in the list's dead column: {queues}");
    let (code, dead) = table(&["dead", &queue]);
    assert_eq!(code, Some(0), "{dead}");
    assert!(dead.starts_with(&format!("queue {queue}: 1 dead letters\n")), "{dead}");
    let row: Vec<&str> = dead.lines().nth(2).unwrap_or_else(|| panic!("{dead}")).split_whitespace().collect();
    assert_eq!((row[0], row[1], row[2], row[4]), (number.as_str(), id.as_str(), "3", "500"), "{dead}");
    let (code, record) = table(&["show", &id]);
    assert_eq!(code, Some(0), "{record}");
    for want in [
        format!("id            {number}"),
        format!("client's id   {id}"),
        "status        dead".into(),
        "answer        500".into(),
    ] {
        assert!(record.contains(&want), "missing {want:?} in:\n{record}");
    }
    // A second dead letter, to be purged rather than replayed.
    let second = post_json(p.addr, "/orders", &[], ORDER).await;
    assert_eq!(second.status, 202, "{:?}", second.body);
    let second_location = second.header("location").unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(p.addr, &second_location).await.json()["status"] != "dead" {
        assert!(Instant::now() < deadline, "the second never became dead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The backend is fixed; the dead letter is replayed, by the client's id, and delivered.
    drop(failing);
    let fixed = app(&dir, &backend.to_string(), &[]);
    let (code, replayed) = cli(&["replay", &id]);
    assert_eq!(code, Some(0), "{replayed}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = get(p.addr, &location).await.json();
        if s["status"] == "done" {
            assert_eq!(s["response"]["status"], 201, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "replay never delivered: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(order_count(fixed.addr).await, 1);
    let (code, shown) = cli(&["show", &number]);
    assert_eq!(code, Some(0));
    assert!(shown.contains("\"done\""), "{shown}");
    assert_eq!(cli(&["replay", &number]).0, Some(1), "only a dead letter can be replayed");
    assert_eq!(cli(&["show", "nonsense"]).0, Some(2));
    let (code, purged) = table(&["purge", &queue]);
    assert_eq!((code, purged), (Some(0), format!("purged 1 dead letters of queue {queue}\n")));
    assert_eq!(order_count(fixed.addr).await, 1, "a purged request is never delivered");
    let (code, none) = table(&["dead", &queue]);
    assert_eq!((code, none.as_str()), (Some(0), format!("queue {queue}: no dead letters\n").as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_a_full_queue_answers_503_with_retry_after() {
    full(Store::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_a_full_queue_answers_503_with_retry_after() {
    full(Store::Rabbit).await;
}

async fn full(store: Store) {
    let _one = exclusive(store);
    let dir = TempDir::new("queue-full");
    let queue = queue_name("full");
    let backend = free_backend_addr(&dir);
    let (p, _) = serve(&config(&dir, backend, store, &queue, "length_max = 3\n"));
    for _ in 0..3 {
        assert_eq!(post_json(p.addr, "/orders", &[], ORDER).await.status, 202);
    }
    let r = post_json(p.addr, "/orders", &[], ORDER).await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    assert!(r.header("retry-after").is_some());
    assert!(r.json()["error"].as_str().unwrap().contains(&format!("queue \"{queue}\"")), "{:?}", r.body);
    assert_eq!(get(p.addr, &format!("/_nonstop/requests/{queue}.999")).await.status, 404);
    assert_eq!(get(p.addr, &format!("/_nonstop/requests/{queue}.1")).await.status, 404, "numbers are not ids");
}

/// A backend on a raw socket: `GET /health` is 200; each `POST` gets `first` the first time, 201 after that.
fn backend_failing_once(first: u16) -> SocketAddr {
    use std::io::{BufRead, BufReader, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let posts = Arc::new(std::sync::atomic::AtomicU64::new(0));
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let posts = posts.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut w = s;
                loop {
                    let (mut line, mut len, mut start) = (String::new(), 0usize, String::new());
                    loop {
                        line.clear();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if start.is_empty() {
                            start = line.clone();
                        } else if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let status = if !start.starts_with("POST") {
                        200
                    } else if posts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                        first
                    } else {
                        201
                    };
                    let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 2\r\n\r\nok");
                    if w.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_failed_requests_are_listed_and_replayed_and_finished_ones_kept_within_the_retention() {
    failed_requests(Store::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_failed_requests_are_listed_and_replayed_and_finished_ones_kept_within_the_retention() {
    failed_requests(Store::Rabbit).await;
}

async fn failed_requests(store: Store) {
    let _one = exclusive(store);
    let dir = TempDir::new("queue-failed");
    let queue = queue_name("failed");
    let backend = backend_failing_once(409);
    let (p, admin) = serve(&config(&dir, backend, store, &queue, "finished_keep_max = 2\n"));
    let settled = |location: String, want: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let s = get(p.addr, &location).await.json();
            if s["status"] == want {
                return s;
            }
            assert!(Instant::now() < deadline, "never {want}: {s}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let r = post_json(p.addr, "/orders", &[], ORDER).await;
    assert_eq!(r.status, 202, "{:?}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let first = r.header("location").unwrap().to_string();
    let s = settled(first.clone(), "failed").await;
    assert_eq!(s["response"]["status"], 409, "{s}");

    let cli = |args: &[&str]| {
        let out =
            Command::new(bin()).args(["queue", "--json", "--admin", &admin.to_string()]).args(args).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, listed) = cli(&["failed", &queue]);
    assert_eq!(code, Some(0), "{listed}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["failed"][0]["key"], id.as_str(), "{listed}");
    assert_eq!(listed["failed"].as_array().unwrap().len(), 1, "{listed}");
    // Without --json, tables for people: the failed request's row has both ids, its attempts and the answer.
    let table = |args: &[&str]| {
        let out = Command::new(bin()).args(["queue", "--admin", &admin.to_string()]).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let failed = table(&["failed", &queue]);
    assert!(failed.starts_with(&format!("queue {queue}: 1 failed requests\n")), "{failed}");
    let row: Vec<&str> = failed.lines().nth(2).unwrap_or_else(|| panic!("{failed}")).split_whitespace().collect();
    assert_eq!((row[1], row[2], row[4]), (id.as_str(), "1", "409"), "{failed}");
    let number = row[0].to_string();
    let list = table(&["list"]);
    let header: Vec<&str> = list.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header[..4], ["queue", "service", "store", "depth"], "{list}");
    let row = list.lines().find(|l| l.starts_with(&format!("{queue} "))).unwrap_or_else(|| panic!("{list}"));
    let row: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        (row[2], row[3], row[header.iter().position(|h| *h == "failed").unwrap()]),
        (if store == Store::Rabbit { "rabbitmq" } else { "embedded" }, "0", "1"),
        "{list}"
    );
    let shown = table(&["show", &number]);
    for want in [
        format!("id            {number}\n"),
        format!("client's id   {id}\n"),
        "status        failed\n".into(),
        "answer        409\n".into(),
    ] {
        assert!(shown.contains(&want), "{want:?} in {shown}");
    }
    assert!(shown.contains("created       20") && shown.contains(" UTC ("), "{shown}");
    // Replayed (the service would now take it), it is delivered again, from its stored request.
    let (code, replayed) = cli(&["replay", &id]);
    assert_eq!(code, Some(0), "{replayed}");
    let s = settled(first.clone(), "done").await;
    assert_eq!(s["response"]["status"], 201, "{s}");
    let (_, listed) = cli(&["failed", &queue]);
    assert_eq!(serde_json::from_str::<Value>(&listed).unwrap()["failed"], serde_json::json!([]), "{listed}");
    assert_eq!(cli(&["replay", &id]).0, Some(1), "a done request is not replayed");

    // Two more finish: only the newest two finished statuses are kept, so the first one is gone.
    let mut later = Vec::new();
    for _ in 0..2 {
        let r = post_json(p.addr, "/orders", &[], ORDER).await;
        assert_eq!(r.status, 202);
        later.push(r.header("location").unwrap().to_string());
    }
    for l in &later {
        settled(l.clone(), "done").await;
    }
    assert_eq!(get(p.addr, &first).await.status, 404, "past finished_keep_max, the oldest finished status goes");
}
