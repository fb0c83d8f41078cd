//! Integration tests of `nonstop serve` protocols and transfers: TLS with ALPN (certificate generated at test time),
//! HTTP/2 to servers, 100 MB bodies streamed each way without memory growth, and connect timeouts.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nonstop_testkit::{echo, get, Proc, TempDir};
use tokio::net::TcpStream;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn serve(dir: &TempDir, toml: &str) -> Proc {
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, toml).unwrap();
    Proc::start(bin(), &["serve", "--config", path.to_str().unwrap(), "--threads", "2"])
}

async fn body_json(resp: http::Response<hyper::body::Incoming>) -> serde_json::Value {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

fn get_req(path: &str, authority: &str) -> http::Request<http_body_util::Empty<Bytes>> {
    http::Request::builder()
        .uri(format!("https://{authority}{path}"))
        .header("host", authority)
        .body(Default::default())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_alpn_serves_http1_and_http2() {
    let dir = TempDir::new("tls");
    let cert = nonstop_testkit::tls::make_cert(&dir);
    let backend = echo::start("e").await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n\
         [[routes]]\nservice = \"s\"\n[services.s]\nservers = [{{ addr = \"{backend}\" }}]\n",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    );
    let p = serve(&dir, &toml);

    let tls = nonstop_testkit::tls::connect(p.addr, &cert, b"http/1.1").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(get_req("/headers", "localhost")).await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = body_json(resp).await;
    assert_eq!(seen["x-forwarded-proto"], "https");
    assert!(seen["forwarded"].as_str().unwrap().contains("proto=https"), "{seen}");

    let tls = nonstop_testkit::tls::connect(p.addr, &cert, b"h2").await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(get_req("/headers", "localhost")).await.unwrap();
    assert_eq!((resp.status(), resp.version()), (http::StatusCode::OK, http::Version::HTTP_2));
    assert_eq!(body_json(resp).await["via"], "2 nonstop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_certificate_fails_start_with_a_clear_error() {
    let dir = TempDir::new("tls-missing");
    let toml = "[[listeners]]\nlisten = \"127.0.0.1:0\"\ntls = { cert = \"/nonexistent/cert.pem\", key = \"/nonexistent/key.pem\" }\n\
                [[routes]]\nservice = \"s\"\n[services.s]\nservers = [{ addr = \"127.0.0.1:9\" }]\n";
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, toml).unwrap();
    let out = std::process::Command::new(bin()).args(["serve", "--config", path.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read certificate /nonexistent/cert.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_to_servers() {
    let dir = TempDir::new("h2up");
    let backend = echo::start("e").await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"s\"\n[services.s]\nprotocol = \"h2\"\n\
         servers = [{{ addr = \"{backend}\" }}]\n[admin]\nlisten = \"127.0.0.1:0\"\n"
    );
    let p = serve(&dir, &toml);
    let tasks: Vec<_> = (0..20).map(|_| tokio::spawn(async move { get(p.addr, "/headers").await })).collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["via"], "1.1 nonstop");
    }
    // Twenty concurrent requests were multiplexed over few connections, not one each.
    let admin = p.addr_after("admin").unwrap();
    let connects = get(admin, "/services/s").await.json()["servers"][0]["connects"].as_u64().unwrap();
    assert!(connects <= 2, "{connects} connections for 20 multiplexed requests");
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB").parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_body_streams_each_way_without_memory_growth() {
    const TOTAL: u64 = 100 * 1024 * 1024;
    let dir = TempDir::new("stream");
    let backend = echo::start("e").await;
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nbody_bytes_max = {}\nservice = \"s\"\n\
         [services.s]\nservers = [{{ addr = \"{backend}\" }}]\n",
        TOTAL * 2
    );
    let p = serve(&dir, &toml);
    assert_eq!(get(p.addr, "/").await.status, 200);
    let baseline = rss_kib(p.pid());

    // Upload: 100 MB produced chunk by chunk, never held whole by the client either.
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let chunk = Bytes::from(vec![b'u'; 64 * 1024]);
    let chunks = futures_lite::stream::iter(
        (0..TOTAL / chunk.len() as u64).map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone()))),
    );
    let req = http::Request::post("/count").header("host", "x").body(StreamBody::new(chunks)).unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let counted = body_json(resp).await["bytes"].as_u64().unwrap();
    assert_eq!(counted, TOTAL);
    let after_upload = rss_kib(p.pid());

    // Download: read frame by frame, counting.
    let stream = TcpStream::connect(p.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("/stream?bytes={TOTAL}"))
        .header("host", "x")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let mut body = sender.send_request(req).await.unwrap().into_body();
    let mut received = 0u64;
    let mut peak = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
        if received % (16 * 1024 * 1024) < 64 * 1024 {
            peak = peak.max(rss_kib(p.pid()));
        }
    }
    assert_eq!(received, TOTAL);
    let after_download = rss_kib(p.pid()).max(peak);
    // Streaming means the proxy's memory does not grow with the body: allow 20 MB of slack for buffers and
    // allocator behaviour, against a body five times that.
    for (what, kib) in [("upload", after_upload), ("download", after_download)] {
        assert!(kib < baseline + 20 * 1024, "{what}: RSS grew from {baseline} KiB to {kib} KiB");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_never_accepts_gives_504_connect_timeout() {
    use socket2::{Domain, Socket, Type};
    // A listener with a backlog of 0 that never accepts: once its queue is full, further SYNs go unanswered.
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&"127.0.0.1:0".parse::<std::net::SocketAddr>().unwrap().into()).unwrap();
    sock.listen(0).unwrap();
    let black_hole = sock.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(black_hole)).await {
            fillers.push(s);
        }
    }
    let dir = TempDir::new("connect-timeout");
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"s\"\n[services.s]\nconnect_timeout_ms = 300\n\
         servers = [{{ addr = \"{black_hole}\" }}]\n[services.s.admission]\nqueue_wait_ms_max = 0\n"
    );
    let p = serve(&dir, &toml);
    let r = get(p.addr, "/").await;
    assert_eq!(r.status, 504, "{:?}", r.body);
    assert!(r.json()["error"].as_str().unwrap().starts_with("connect timeout"), "{:?}", r.body);
    drop(sock);
}
