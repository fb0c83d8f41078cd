//! Hostile input to `nonstop serve`, table-driven, over real sockets: request smuggling (Content-Length and
//! Transfer-Encoding variants, obs-fold, NUL and CR bytes), Host confusion, malicious server responses, early
//! answers from servers, and idle or stalled connections of every kind. Each case asserts what the server
//! received and what the client got. The backend (`testkit::raw`) frames leniently on purpose, like the servers
//! smuggling exploits: bytes forwarded under a length it cannot read show up as an extra request.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use nonstop_testkit::raw::{answers, exchange, ok, RawBackend, Reply, Seen};
use nonstop_testkit::{get, Proc, TempDir};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

/// A request that asks the proxy to close after it: sent right behind every case, it is served only when the
/// proxy took the case as one well-framed request.
const END: &str = "GET /__end HTTP/1.1\r\nHost: victim\r\nConnection: close\r\n\r\n";

/// The header read timeout of the proxies here: idle connections must be closed soon after it.
const IDLE_MS: u64 = 1000;

/// `nonstop serve` with one listener in front of `to`, one worker thread, health checks off (the backends here
/// record every connection's bytes), and `extra` TOML appended (more listener keys first, before any table).
fn proxy(dir: &TempDir, to: SocketAddr, listener_extra: &str, extra: &str) -> Proc {
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout_ms = {IDLE_MS}\nheader_bytes_max = 4096\n\
         {listener_extra}\n[[routes]]\nservice = \"raw\"\n[services.raw]\nservers = [{{ addr = \"{to}\" }}]\n\
         [services.raw.health]\nenabled = false\n[access_log]\nenabled = false\n{extra}"
    );
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, toml).unwrap();
    Proc::start(bin(), &["serve", "--config", path.to_str().unwrap(), "--threads", "1"])
}

/// Every request the backend saw, but the closing `/__end` one, as request lines.
fn lines(seen: &[Seen]) -> Vec<String> {
    seen.iter().map(|s| s.line().to_string()).filter(|l| !l.contains("/__end")).collect()
}

/// Sends `case` then [`END`] on one connection to the proxy; returns the statuses the client got, what came after
/// the last complete response, and what the backend saw.
fn run_case(case: &[u8]) -> (Vec<u16>, Vec<u8>, Vec<Seen>, Vec<nonstop_testkit::raw::Answer>) {
    let backend = RawBackend::start(|_| ok());
    let dir = TempDir::new("hostile");
    let p = proxy(&dir, backend.addr, "", "");
    let mut bytes = case.to_vec();
    bytes.extend_from_slice(END.as_bytes());
    let got = exchange(p.addr, &bytes, Duration::from_secs(5));
    let (answers, rest) = answers(&got);
    let statuses = answers.iter().map(|a| a.status).collect();
    // The backend has its requests once the proxy answered; a moment for a smuggled one to arrive.
    std::thread::sleep(Duration::from_millis(50));
    (statuses, rest, backend.seen(), answers)
}

/// A request smuggled in a body: what a backend that misreads the length takes for the next request.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

fn post_with(headers: &str, body: &str) -> Vec<u8> {
    format!("POST / HTTP/1.1\r\nHost: victim\r\n{headers}\r\n{body}").into_bytes()
}

#[test]
fn requests_another_parser_could_frame_differently_are_refused_and_never_reach_the_server() {
    let n = SMUGGLED.len();
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("CL with a plus sign", post_with(&format!("Content-Length: +{n}\r\n"), SMUGGLED), 400),
        ("CL with a minus sign", post_with(&format!("Content-Length: -{n}\r\n"), SMUGGLED), 400),
        ("CL with a no-break space", post_with(&format!("Content-Length: {n}\u{a0}\r\n"), SMUGGLED), 400),
        ("CL in hex", post_with(&format!("Content-Length: 0x{n:x}\r\n"), SMUGGLED), 400),
        ("CL with an exponent", post_with("Content-Length: 3e1\r\n", SMUGGLED), 400),
        (
            "CL of two differing values",
            post_with(&format!("Content-Length: {n}\r\nContent-Length: 0\r\n"), SMUGGLED),
            400,
        ),
        ("CL list of differing values", post_with(&format!("Content-Length: {n}, 0\r\n"), SMUGGLED), 400),
        ("CL with a space before the colon", post_with(&format!("Content-Length : {n}\r\n"), SMUGGLED), 400),
        ("TE xchunked", post_with("Transfer-Encoding: xchunked\r\n", "0\r\n\r\n"), 400),
        ("TE chunked not last", post_with("Transfer-Encoding: chunked, identity\r\n", "0\r\n\r\n"), 400),
        ("TE with a space before the colon", post_with("Transfer-Encoding : chunked\r\n", "0\r\n\r\n"), 400),
        ("TE in HTTP/1.0", b"POST / HTTP/1.0\r\nHost: v\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(), 400),
        (
            "HTTP/1.0 CL with a plus sign",
            format!("POST / HTTP/1.0\r\nHost: v\r\nContent-Length: +{n}\r\n\r\n{SMUGGLED}").into_bytes(),
            400,
        ),
        ("obs-fold", post_with(&format!("X-A: a\r\n b\r\nContent-Length: {n}\r\n"), SMUGGLED), 400),
        ("obs-fold of CL", post_with(&format!("X-A: a\r\nContent-Length:\r\n {n}\r\n"), SMUGGLED), 400),
        ("NUL in a header value", post_with(&format!("X-A: a\0b\r\nContent-Length: {n}\r\n"), SMUGGLED), 400),
        ("bare CR in a header value", post_with(&format!("X-A: a\rb\r\nContent-Length: {n}\r\n"), SMUGGLED), 400),
        ("space in a header name", post_with(&format!("X A: b\r\nContent-Length: {n}\r\n"), SMUGGLED), 400),
        ("two Host headers", b"GET / HTTP/1.1\r\nHost: victim\r\nHost: attacker\r\n\r\n".to_vec(), 400),
        (
            "head over header_bytes_max",
            format!("GET / HTTP/1.1\r\nHost: v\r\nX-Big: {}\r\n\r\n", "a".repeat(5000)).into_bytes(),
            431,
        ),
    ];
    let mut failures = Vec::new();
    for (name, case, status) in &cases {
        let (statuses, _, seen, answers) = run_case(case);
        let problems = [
            (statuses != [*status]).then(|| format!("client got {statuses:?}, want [{status}] and a close")),
            (!seen.is_empty())
                .then(|| format!("the server received {:?}", seen.iter().map(Seen::line).collect::<Vec<_>>())),
            answers
                .first()
                .filter(|a| !String::from_utf8_lossy(&a.body).contains("\"error\"") && a.status != 400)
                .map(|a| format!("no JSON error naming the problem: {:?}", String::from_utf8_lossy(&a.body))),
        ];
        for p in problems.into_iter().flatten() {
            failures.push(format!("{name}: {p}"));
        }
    }
    assert!(failures.is_empty(), "{} failures in {} cases:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[test]
fn lengths_the_proxy_accepts_reach_the_server_in_its_own_canonical_spelling() {
    let body = "{\"item\":\"x\"}";
    let n = body.len();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("leading zeros", post_with(&format!("Content-Length: 000{n}\r\n"), body)),
        ("two equal CL headers", post_with(&format!("Content-Length: {n}\r\nContent-Length: {n}\r\n"), body)),
        ("a list of equal values", post_with(&format!("Content-Length: {n}, {n}\r\n"), body)),
    ];
    let mut failures = Vec::new();
    for (name, case) in &cases {
        let (statuses, _, seen, _) = run_case(case);
        if statuses != [200, 200] {
            failures.push(format!("{name}: client got {statuses:?}, want [200, 200]"));
        }
        let posts: Vec<&Seen> = seen.iter().filter(|s| s.line().starts_with("POST")).collect();
        match posts.as_slice() {
            [post] => {
                if post.headers("content-length") != [n.to_string()] {
                    failures
                        .push(format!("{name}: the server got Content-Length {:?}", post.headers("content-length")));
                }
                if post.body != body.as_bytes() {
                    failures.push(format!("{name}: the server got body {:?}", String::from_utf8_lossy(&post.body)));
                }
            }
            _ => failures.push(format!("{name}: the server got {:?}", lines(&seen))),
        }
        if lines(&seen).len() != 1 {
            failures.push(format!("{name}: the server got {:?}", lines(&seen)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Both Content-Length and chunked: the chunked framing wins, the length never reaches the server, and the
    // smuggled bytes stay inside the body.
    let case = post_with(
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        &format!("{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n", SMUGGLED.len()),
    );
    let (statuses, _, seen, _) = run_case(&case);
    assert_eq!(lines(&seen), ["POST / HTTP/1.1"], "{seen:?}");
    assert!(seen[0].headers("content-length").is_empty(), "{:?}", seen[0].head);
    assert_eq!(seen[0].body, SMUGGLED.as_bytes());
    assert_eq!(statuses.first(), Some(&200), "{statuses:?}");
}

#[test]
fn the_server_sees_the_authority_the_request_was_routed_by() {
    // Absolute form: the target's authority is the request's (RFC 9112 §3.2.2), whatever Host says.
    let (statuses, _, seen, _) = run_case(b"GET http://routed.example/p?q=1 HTTP/1.1\r\nHost: other.example\r\n\r\n");
    assert_eq!(statuses, [200, 200]);
    assert_eq!(seen[0].line(), "GET /p?q=1 HTTP/1.1");
    assert_eq!(seen[0].headers("host"), ["routed.example"], "{}", seen[0].head);
    assert_eq!(seen[0].headers("x-forwarded-host"), ["routed.example"], "{}", seen[0].head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_by_host_uses_the_same_authority_the_server_sees() {
    // Two services by host: a request for a.example with Host: b.example must reach a's server, with Host a.
    let a = RawBackend::start(|_| Reply::Bytes(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\na".to_vec()));
    let b = RawBackend::start(|_| Reply::Bytes(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nb".to_vec()));
    let dir = TempDir::new("hostile-host");
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nhost = \"a.example\"\nservice = \"a\"\n\
         [[routes]]\nhost = \"b.example\"\nservice = \"b\"\n\
         [services.a]\nservers = [{{ addr = \"{}\" }}]\n[services.a.health]\nenabled = false\n\
         [services.b]\nservers = [{{ addr = \"{}\" }}]\n[services.b.health]\nenabled = false\n\
         [access_log]\nenabled = false\n",
        a.addr, b.addr
    );
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, toml).unwrap();
    let p = Proc::start(bin(), &["serve", "--config", path.to_str().unwrap(), "--threads", "1"]);

    let got = exchange(
        p.addr,
        b"GET http://a.example/ HTTP/1.1\r\nHost: b.example\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    let (resp, _) = answers(&got);
    assert_eq!(resp.iter().map(|r| r.body.clone()).collect::<Vec<_>>(), [b"a".to_vec()]);
    assert!(b.seen().is_empty(), "b got {:?}", b.seen());
    assert_eq!(a.seen()[0].headers("host"), ["a.example"]);

    // HTTP/2: `:authority` a.example with a `host` header of b.example.
    let tcp = TcpStream::connect(p.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = http::Request::builder()
        .uri("http://a.example/h2")
        .header("host", "b.example")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    match h2.send_request(req).await {
        Ok(resp) => {
            // Routed by :authority, and the server sees the same.
            assert_eq!(resp.status(), 200);
            assert!(b.seen().is_empty(), "b got {:?}", b.seen());
            let h2_seen: Vec<Seen> = a.seen().into_iter().filter(|s| s.line().contains("/h2")).collect();
            assert_eq!(h2_seen.len(), 1, "{:?}", a.seen());
            assert_eq!(h2_seen[0].headers("host"), ["a.example"], "{}", h2_seen[0].head);
        }
        // A client library or the proxy refusing the mismatch outright is as good.
        Err(e) => assert!(b.seen().is_empty(), "refused ({e}), yet b got {:?}", b.seen()),
    }
}

#[test]
fn malicious_server_responses_become_502_and_never_reach_the_client() {
    let cases: Vec<(&str, &'static [u8])> = vec![
        ("two different lengths", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 40\r\n\r\nok"),
        ("a length list of differing values", b"HTTP/1.1 200 OK\r\ncontent-length: 2, 40\r\n\r\nok"),
        ("a length with a sign", b"HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\nok"),
        ("CL with TE", b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        ("TE xchunked", b"HTTP/1.1 200 OK\r\ntransfer-encoding: xchunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        ("TE chunked not last", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n2\r\nok\r\n0\r\n\r\n"),
        ("101 to a request that asked for no upgrade", b"HTTP/1.1 101 Switching Protocols\r\nupgrade: evil\r\nconnection: upgrade\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nforged"),
        ("a NUL in a header", b"HTTP/1.1 200 OK\r\nx-a: a\0b\r\ncontent-length: 2\r\n\r\nok"),
    ];
    let mut failures = Vec::new();
    for (name, reply) in &cases {
        let reply = reply.to_vec();
        let backend =
            RawBackend::start(move |s| if s.line().contains("/__end") { ok() } else { Reply::Bytes(reply.clone()) });
        let dir = TempDir::new("hostile-resp");
        let p = proxy(&dir, backend.addr, "", "");
        let mut bytes = b"GET / HTTP/1.1\r\nHost: victim\r\n\r\n".to_vec();
        bytes.extend_from_slice(END.as_bytes());
        let got = exchange(p.addr, &bytes, Duration::from_secs(5));
        let (resp, rest) = answers(&got);
        let statuses: Vec<u16> = resp.iter().map(|a| a.status).collect();
        if statuses != [502, 200] {
            failures.push(format!("{name}: client got {statuses:?}, want [502, 200]"));
        }
        let text = String::from_utf8_lossy(&got);
        if text.contains("forged") || text.contains("evil") || !rest.is_empty() {
            failures.push(format!("{name}: the server's bytes reached the client: {text:?}"));
        }
    }
    assert!(failures.is_empty(), "{} failures in {} cases:\n{}", failures.len(), cases.len(), failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_from_a_server_that_will_not_read_the_body_reaches_the_client() {
    // The server answers 413 as soon as it has the head, and closes without reading the 4 MB body.
    let refusal = b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!".to_vec();
    let backend =
        RawBackend::start(
            move |s| {
                if s.line().starts_with("POST") {
                    Reply::EarlyThenClose(refusal.clone())
                } else {
                    ok()
                }
            },
        );
    let dir = TempDir::new("hostile-early");
    // Past retry.body_bytes_max the body is streamed, as the server reads it; eject after 2 failures.
    let p = proxy(
        &dir,
        backend.addr,
        "",
        "[services.raw.retry]\nbody_bytes_max = 1024\n[services.raw.eject]\nconsecutive_failures = 2\n\
         [admin]\nlisten = \"127.0.0.1:0\"\n",
    );
    let body = vec![b'x'; 4 << 20];
    for i in 0..4 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let head = format!("POST /upload HTTP/1.1\r\nHost: v\r\nContent-Length: {}\r\n\r\n", body.len());
        s.write_all(head.as_bytes()).await.unwrap();
        // The client keeps sending while the answer comes back; a reset of its upload is fine, the answer counts.
        let (mut r, mut w) = s.into_split();
        let body = body.clone();
        let writer = tokio::spawn(async move {
            let _ = w.write_all(&body).await;
        });
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got)).await;
        writer.abort();
        let (resp, _) = answers(&got);
        assert_eq!(
            resp.first().map(|a| (a.status, a.body.clone())),
            Some((413, b"too big!".to_vec())),
            "upload {i}: the client got {:?}",
            String::from_utf8_lossy(&got[..got.len().min(300)])
        );
    }
    // Not one of them counted against the server: it is still up, never ejected, and serves.
    let admin = p.addr_after("admin").unwrap_or_else(|| panic!("no admin address in {:?}", p.banner));
    let r = get(p.addr, "/").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let svc = get(admin, "/services/raw").await.json();
    assert_eq!(svc["ejections_total"], 0, "{svc}");
    assert_eq!(svc["servers"][0]["state"], "active", "{svc}");
}

/// Connects and sends `bytes`, then waits for the proxy to close the connection; returns how long it took and
/// what the proxy sent, or panics when it is still open after `limit`.
async fn closed_within(addr: SocketAddr, bytes: &[u8], limit: Duration) -> (Duration, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    if !bytes.is_empty() {
        s.write_all(bytes).await.unwrap();
    }
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), s.read(&mut chunk)).await {
            Err(_) => panic!("still open after {limit:?}, having sent {:?}", String::from_utf8_lossy(bytes)),
            Ok(Ok(0)) | Ok(Err(_)) => return (start.elapsed(), got),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// An HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// HPACK: :method GET, :scheme http, :path / (static table), :authority "v" (literal, indexed name).
const HPACK_GET: &[u8] = &[0x82, 0x86, 0x84, 0x41, 0x01, b'v'];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_stalled_connections_of_every_kind_are_closed() {
    let backend = RawBackend::start(|_| ok());
    let dir = TempDir::new("hostile-idle");
    let p = proxy(&dir, backend.addr, "", "");
    let settings = frame(0x4, 0, 0, &[]);
    let mut preface_settings = PREFACE.to_vec();
    preface_settings.extend_from_slice(&settings);
    let mut open_headers = preface_settings.clone();
    open_headers.extend_from_slice(&frame(0x1, 0x1, 1, HPACK_GET)); // END_STREAM, no END_HEADERS
    let mut idle_after_request = preface_settings.clone();
    idle_after_request.extend_from_slice(&frame(0x1, 0x5, 1, HPACK_GET)); // a whole request, then nothing
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a TCP connection that sends nothing", Vec::new()),
        ("a partial HTTP/1.1 head", b"GET / HTTP/1.1\r\nHost: v\r\n".to_vec()),
        ("an HTTP/1.1 keep-alive connection left idle", b"GET / HTTP/1.1\r\nHost: v\r\n\r\n".to_vec()),
        ("a partial HTTP/2 preface", b"PRI * HTTP/2.0\r\n".to_vec()),
        ("the preface alone", PREFACE.to_vec()),
        ("the preface and an empty SETTINGS frame", preface_settings),
        ("HEADERS without END_HEADERS", open_headers),
        ("an HTTP/2 connection idle after its request", idle_after_request),
        ("HTTP/1.0 keep-alive left idle", b"GET / HTTP/1.0\r\nHost: v\r\nConnection: keep-alive\r\n\r\n".to_vec()),
    ];
    // The limit is the header read timeout, plus a second of grace for a client told to go away.
    let limit = Duration::from_millis(IDLE_MS * 4);
    let mut tasks = Vec::new();
    for (name, bytes) in cases {
        let addr = p.addr;
        tasks.push(tokio::spawn(async move { (name, closed_within(addr, &bytes, limit).await) }));
    }
    for t in tasks {
        // Each task panics, naming its case, when its connection is still open past the limit.
        t.await.unwrap_or_else(|e| panic!("{e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_cannot_hold_every_slot() {
    let backend = RawBackend::start(|_| ok());
    let dir = TempDir::new("hostile-slots");
    let p = proxy(&dir, backend.addr, "max_connections = 4", "");
    let mut idle = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(p.addr).await.unwrap();
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&frame(0x4, 0, 0, &[]));
        s.write_all(&bytes).await.unwrap();
        idle.push(s);
    }
    // The slots are freed once the idle ones time out, and a real request is served.
    let start = Instant::now();
    let served = tokio::time::timeout(Duration::from_millis(IDLE_MS * 8), get(p.addr, "/")).await;
    let r = served.unwrap_or_else(|_| panic!("no slot freed after {:?}", start.elapsed()));
    assert_eq!(r.status, 200);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_followed_by_nothing_is_closed() {
    let backend = RawBackend::start(|_| ok());
    let dir = TempDir::new("hostile-tls");
    let cert = nonstop_testkit::tls::make_cert(&dir);
    let p = proxy(&dir, backend.addr, &nonstop_testkit::tls::listener_line(&dir), "");
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let mut stream = nonstop_testkit::tls::connect(p.addr, &cert, alpn).await;
        let start = Instant::now();
        let mut chunk = [0u8; 1024];
        let limit = Duration::from_millis(IDLE_MS * 4);
        loop {
            match tokio::time::timeout(limit.saturating_sub(start.elapsed()), stream.read(&mut chunk)).await {
                Err(_) => panic!("ALPN {:?}: still open after {limit:?}", String::from_utf8_lossy(alpn)),
                Ok(Ok(0)) | Ok(Err(_)) => break,
                Ok(Ok(_)) => {}
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_floods_leave_the_proxy_serving() {
    let backend = RawBackend::start(|_| ok());
    let dir = TempDir::new("hostile-h2");
    let p = proxy(&dir, backend.addr, "", "");
    // CONTINUATION flood: HEADERS without END_HEADERS, then CONTINUATION frames without end, 10 MB in all.
    let flood = tokio::spawn({
        let addr = p.addr;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut bytes = PREFACE.to_vec();
            bytes.extend_from_slice(&frame(0x4, 0, 0, &[]));
            bytes.extend_from_slice(&frame(0x1, 0x1, 1, HPACK_GET));
            s.write_all(&bytes).await.unwrap();
            let cont = frame(0x9, 0, 1, &[0x40, 0x03, b'x', b'-', b'a', 0x7f, 0x7f, 0x7f, 0x7f].repeat(1800));
            let mut sent = 0usize;
            while sent < 10 << 20 {
                if s.write_all(&cont).await.is_err() {
                    return true; // the proxy cut it off
                }
                sent += cont.len();
            }
            let mut rest = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await.is_ok()
        }
    });
    // Rapid reset: HEADERS then RST_STREAM, 2,000 streams on one connection.
    let rapid = tokio::spawn({
        let addr = p.addr;
        async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let mut bytes = PREFACE.to_vec();
            bytes.extend_from_slice(&frame(0x4, 0, 0, &[]));
            for i in 0..2000u32 {
                let id = 2 * i + 1;
                bytes.extend_from_slice(&frame(0x1, 0x5, id, HPACK_GET));
                bytes.extend_from_slice(&frame(0x3, 0, id, &8u32.to_be_bytes()));
            }
            let _ = s.write_all(&bytes).await;
            let mut rest = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        }
    });
    assert!(flood.await.unwrap(), "the CONTINUATION flood's connection was never closed");
    rapid.await.unwrap();
    let r = get(p.addr, "/").await;
    assert_eq!(r.status, 200, "the proxy still serves");
    // The resets were not passed on as thousands of requests to the server.
    assert!(backend.seen().len() < 2000, "the server got {} requests", backend.seen().len());
}
