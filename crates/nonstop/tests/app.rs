//! Integration tests of `nonstop app` on SQLite: the real binary on 127.0.0.1 with an OS-assigned port.

use std::path::Path;
use std::time::{Duration, Instant};

use nonstop_testkit::{
    concurrent_keyed_posts, get, post_json, send, wait_for_status, Conn, Method, Proc, Resp, TempDir,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn app(db: &Path, extra: &[&str]) -> Proc {
    let db = format!("sqlite://{}", db.display());
    let mut args = vec!["app", "--listen", "127.0.0.1:0", "--db", &db];
    args.extend_from_slice(extra);
    Proc::start(bin(), &args)
}

async fn stats(p: &Proc) -> serde_json::Value {
    get(p.addr, "/stats").await.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_reports_version_instance_and_pid_in_body_and_headers() {
    let dir = TempDir::new("root");
    let p = app(&dir.path().join("a.db"), &["--version", "v7", "--instance", "blue-1"]);
    let r = get(p.addr, "/").await;
    assert_eq!(r.status, 200);
    let body = r.json();
    assert_eq!(body["version"], "v7");
    assert_eq!(body["instance"], "blue-1");
    assert_eq!(body["pid"], p.pid());
    assert_eq!(r.header("x-nonstop-version"), Some("v7"));
    assert_eq!(r.header("x-nonstop-instance"), Some("blue-1"));
    // Every response carries the headers, errors included.
    let r = get(p.addr, "/nope").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-nonstop-version"), Some("v7"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_runs_n_queues_m_and_refuses_the_rest_at_once() {
    let dir = TempDir::new("overload");
    let p = app(&dir.path().join("a.db"), &["--workers", "2", "--accept-queue", "2", "--work-ms", "300"]);
    let start = Instant::now();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(10));
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (addr, barrier) = (p.addr, barrier.clone());
            tokio::spawn(async move {
                let mut conn = Conn::open(addr).await.expect("connect");
                barrier.wait().await;
                let r = conn.send(Method::GET, "/", &[], "").await.expect("answer");
                (r, start.elapsed())
            })
        })
        .collect();
    let mut results: Vec<(Resp, Duration)> = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let ok: Vec<_> = results.iter().filter(|(r, _)| r.status == 200).collect();
    let refused: Vec<_> = results.iter().filter(|(r, _)| r.status == 503).collect();
    assert_eq!(
        (ok.len(), refused.len()),
        (4, 6),
        "statuses: {:?}",
        results.iter().map(|r| r.0.status).collect::<Vec<_>>()
    );
    let first_ok = ok.iter().map(|(_, t)| *t).min().unwrap();
    for (r, t) in &refused {
        // Immediate: refused before even the first admitted request finished its 300 ms of work.
        assert!(*t < first_ok, "503 after {t:?}, first 200 after {first_ok:?}");
        assert_eq!(r.header("retry-after"), Some("1"));
        assert!(r.json()["error"].as_str().unwrap().contains("accept queue of 2 is full"), "{:?}", r.body);
    }
    let s = stats(&p).await;
    assert_eq!(s["requests"]["rejected_queue_full"], 6);
    assert_eq!(s["requests"]["rejected_queue_timeout"], 0);
    assert_eq!(s["requests"]["status"]["200"], 4);
    assert_eq!(s["requests"]["status"]["503"], 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_past_the_queue_timeout_get_503() {
    let dir = TempDir::new("qtimeout");
    let p = app(
        &dir.path().join("a.db"),
        &["--workers", "1", "--accept-queue", "5", "--work-ms", "1000", "--queue-timeout-ms", "200"],
    );
    let tasks: Vec<_> = (0..3).map(|_| tokio::spawn(async move { get(p.addr, "/").await })).collect();
    let mut statuses = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == 503 {
            assert!(r.json()["error"].as_str().unwrap().starts_with("queue timeout"), "{:?}", r.body);
            assert_eq!(r.header("retry-after"), Some("1"));
        }
        statuses.push(r.status);
    }
    statuses.sort();
    assert_eq!(statuses, [200, 503, 503]);
    let s = stats(&p).await;
    assert_eq!(s["requests"]["rejected_queue_timeout"], 2);
    assert_eq!(s["requests"]["rejected_queue_full"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_are_created_read_and_counted() {
    let dir = TempDir::new("orders");
    let p = app(&dir.path().join("a.db"), &[]);
    let r = post_json(p.addr, "/orders", &[], r#"{"item":"book","qty":3}"#).await;
    assert_eq!(r.status, 201);
    let order = r.json();
    let id = order["id"].as_i64().unwrap();
    assert_eq!(r.header("location"), Some(format!("/orders/{id}").as_str()));
    assert_eq!((order["item"].as_str(), order["qty"].as_i64()), (Some("book"), Some(3)));
    let r = get(p.addr, &format!("/orders/{id}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), order);
    assert_eq!(get(p.addr, "/orders/count").await.json()["count"], 1);
    assert_eq!(get(p.addr, "/orders/99999").await.status, 404);
    assert_eq!(get(p.addr, "/orders/abc").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_error_names_its_field() {
    let dir = TempDir::new("validate");
    let p = app(&dir.path().join("a.db"), &[]);
    let long_item = format!(r#"{{"item":"{}","qty":1}}"#, "x".repeat(201));
    let cases: Vec<(&str, &str)> = vec![
        ("{", "body"),
        ("", "body"),
        ("[1,2]", "body"),
        (r#""book""#, "body"),
        (r#"{"qty":1}"#, "item"),
        (r#"{"item":"","qty":1}"#, "item"),
        (r#"{"item":"   ","qty":1}"#, "item"),
        (r#"{"item":5,"qty":1}"#, "item"),
        (r#"{"item":null,"qty":1}"#, "item"),
        (&long_item, "item"),
        (r#"{"item":"book"}"#, "qty"),
        (r#"{"item":"book","qty":0}"#, "qty"),
        (r#"{"item":"book","qty":-3}"#, "qty"),
        (r#"{"item":"book","qty":2.5}"#, "qty"),
        (r#"{"item":"book","qty":"2"}"#, "qty"),
        (r#"{"item":"book","qty":99999999999999999999}"#, "qty"),
        (r#"{"item":"book","qty":1,"price":9}"#, "price"),
    ];
    for (body, field) in cases {
        let r = post_json(p.addr, "/orders", &[], body).await;
        assert_eq!(r.status, 400, "body {body:?}");
        let j = r.json();
        assert_eq!(j["field"], field, "body {body:?}: {j}");
        assert!(j["error"].as_str().unwrap().starts_with(field), "body {body:?}: {j}");
    }
    let r = post_json(p.addr, "/orders", &[("idempotency-key", &"k".repeat(256))], r#"{"item":"a","qty":1}"#).await;
    assert_eq!((r.status, r.json()["field"].as_str()), (400, Some("Idempotency-Key")));

    // Over 64 KiB: 413, whether announced by Content-Length or not.
    let big = format!(r#"{{"item":"{}","qty":1}}"#, "x".repeat(64 * 1024));
    let r = post_json(p.addr, "/orders", &[], &big).await;
    assert_eq!(r.status, 413);
    assert!(r.json()["error"].as_str().unwrap().contains("65536 bytes"));

    // The same body sent chunked, without a Content-Length: the limit is enforced while reading.
    let mut raw = TcpStream::connect(p.addr).await.unwrap();
    let head = "POST /orders HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
    raw.write_all(head.as_bytes()).await.unwrap();
    for chunk in big.as_bytes().chunks(8192) {
        let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), chunk, b"\r\n"].concat();
        if raw.write_all(&framed).await.is_err() {
            break; // the server may answer and close before the whole body is sent
        }
    }
    let _ = raw.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "chunked oversized body: {answer}");

    let r = send(p.addr, Method::PUT, "/orders", &[], "{}").await.unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));
    let r = send(p.addr, Method::DELETE, "/orders/1", &[], "").await.unwrap();
    assert_eq!((r.status, r.header("allow")), (405, Some("GET")));

    // Nothing invalid was written.
    assert_eq!(get(p.addr, "/orders/count").await.json()["count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_holds_across_two_instances_sharing_one_database() {
    let dir = TempDir::new("idem");
    let db = dir.path().join("shared.db");
    let a = app(&db, &["--instance", "a"]);
    let b = app(&db, &["--instance", "b"]);
    let body = r#"{"item":"lamp","qty":2}"#;
    let answers = concurrent_keyed_posts(&[a.addr, b.addr], "/orders", "order-42", body, 20).await;
    let mut ids = std::collections::BTreeSet::new();
    let mut replayed = 0;
    for r in answers {
        assert_eq!(r.status, 201, "{:?}", r.body);
        ids.insert(r.json()["id"].as_i64().unwrap());
        replayed += usize::from(r.header("idempotent-replayed") == Some("true"));
    }
    assert_eq!(ids.len(), 1, "every answer carries the first order's id: {ids:?}");
    assert_eq!(replayed, 19);
    assert_eq!(get(a.addr, "/orders/count").await.json()["count"], 1);

    // The same key with another body is a client error, and writes nothing.
    let r = post_json(b.addr, "/orders", &[("idempotency-key", "order-42")], r#"{"item":"lamp","qty":3}"#).await;
    assert_eq!((r.status, r.json()["field"].as_str()), (422, Some("Idempotency-Key")));
    // The key survives a restart.
    drop(a);
    let a = app(&db, &["--instance", "a2"]);
    let r = post_json(a.addr, "/orders", &[("idempotency-key", "order-42")], body).await;
    assert_eq!((r.status, r.json()["id"].as_i64()), (201, ids.first().copied()));
    assert_eq!(get(b.addr, "/orders/count").await.json()["count"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_rate_one_answers_500_and_writes_nothing() {
    let dir = TempDir::new("fail");
    let p = app(&dir.path().join("a.db"), &["--fail-rate", "1"]);
    for _ in 0..5 {
        let r = post_json(p.addr, "/orders", &[], r#"{"item":"a","qty":1}"#).await;
        assert_eq!(r.status, 500);
        assert!(r.json()["error"].as_str().unwrap().contains("injected failure"));
    }
    assert_eq!(get(p.addr, "/health").await.status, 200, "health is not subject to injected failures");
    assert_eq!(stats(&p).await["requests"]["injected_failures"], 5);
    drop(p);
    let p = app(&dir.path().join("a.db"), &[]);
    assert_eq!(get(p.addr, "/orders/count").await.json()["count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_ready_after() {
    let dir = TempDir::new("ready");
    let p = app(&dir.path().join("a.db"), &["--ready-after-ms", "1500"]);
    let r = get(p.addr, "/health").await;
    assert_eq!((r.status, r.json()["status"].as_str()), (503, Some("starting")));
    assert!(wait_for_status(p.addr, "/health", 200, Duration::from_secs(10)).await);
    assert_eq!(get(p.addr, "/health").await.json()["status"], "ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let dir = TempDir::new("drain");
    let mut p = app(&dir.path().join("a.db"), &["--work-ms", "800"]);
    let addr = p.addr;
    // An idle keep-alive connection, as a proxy's pool would hold.
    let mut idle = Conn::open(addr).await.unwrap();
    assert_eq!(idle.send(Method::GET, "/health", &[], "").await.unwrap().status, 200);

    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(async move {
                let body = format!(r#"{{"item":"drain-{i}","qty":1}}"#);
                post_json(addr, "/orders", &[], &body).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.signal(libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Not ready from the moment SIGTERM arrives, and the connection is closed after the answer.
    let r = idle.send(Method::GET, "/health", &[], "").await.unwrap();
    assert_eq!((r.status, r.json()["status"].as_str()), (503, Some("draining")));
    assert_eq!(r.header("connection"), Some("close"));
    // No new connections are accepted.
    assert!(TcpStream::connect(addr).await.is_err(), "listener still accepting after SIGTERM");

    for t in in_flight {
        assert_eq!(t.await.unwrap().status, 201, "an in-flight request was dropped by the drain");
    }
    let status = tokio::task::spawn_blocking(move || p.wait_exit(Duration::from_secs(10))).await.unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(0));

    let conn = rusqlite::Connection::open(dir.path().join("a.db")).unwrap();
    let n: i64 = conn.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0)).unwrap();
    assert_eq!(n, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_1000_concurrent_posts_leaves_a_consistent_database() {
    let dir = TempDir::new("sigkill");
    let db = dir.path().join("a.db");
    let p = app(&db, &["--workers", "64", "--accept-queue", "2000", "--work-ms", "20"]);
    let addr = p.addr;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..1000 {
        let tx = tx.clone();
        tokio::spawn(async move {
            let body = format!(r#"{{"item":"burst-{i}","qty":1}}"#);
            let headers = [("content-type", "application/json")];
            let r = send(addr, Method::POST, "/orders", &headers, body).await.map(|r| r.status);
            let _ = tx.send(r.ok());
        });
    }
    drop(tx);
    let (mut created, mut other, mut unanswered, mut seen) = (0u64, 0u64, 0u64, 0);
    let mut killed = false;
    while let Some(outcome) = rx.recv().await {
        seen += 1;
        match outcome {
            Some(201) => created += 1,
            Some(_) => other += 1,
            None => unanswered += 1,
        }
        if created >= 100 && !killed {
            p.signal(libc::SIGKILL);
            killed = true;
        }
    }
    assert_eq!(seen, 1000);
    eprintln!("SIGKILL burst: {created} created, {other} other answers, {unanswered} unanswered");
    assert!(killed, "the burst finished before 100 orders were created");
    assert!(unanswered > 0, "the kill did not land mid-burst (created {created}, other {other})");

    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn.query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
    assert_eq!(check, "ok");
    let rows: i64 = conn.query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0)).unwrap();
    let rows = rows as u64;
    assert!(
        created <= rows && rows <= created + unanswered,
        "rows {rows} not within [{created}, {}] (other answers: {other})",
        created + unanswered
    );
    drop(conn);
    // And the service starts again on it.
    let p2 = app(&db, &[]);
    assert_eq!(get(p2.addr, "/orders/count").await.json()["count"].as_u64(), Some(rows));
}
