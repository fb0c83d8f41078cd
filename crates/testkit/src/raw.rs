//! A byte-exact HTTP/1.1 backend for hostile-input tests: it records every request exactly as it arrived on the
//! wire and answers with whatever bytes a test scripts, including answers no honest server would send. Its own
//! framing is deliberately lenient, like the servers that smuggling exploits: a Content-Length it cannot read
//! counts as 0, so bytes a proxy forwarded under a bad length show up as an extra request.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the backend received it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which connection it came on (0, 1, … in accept order).
    pub conn: usize,
    /// The head, exactly as sent, up to and including the blank line.
    pub head: String,
    pub body: Vec<u8>,
}

impl Seen {
    /// Every value of header `name` (case-insensitive), in order.
    pub fn headers(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    /// The request line.
    pub fn line(&self) -> &str {
        self.head.split("\r\n").next().unwrap_or_default()
    }
}

/// What the backend does with a request.
#[derive(Clone)]
pub enum Reply {
    /// These bytes, then the connection stays open for the next request.
    Bytes(Vec<u8>),
    /// These bytes, then close.
    BytesThenClose(Vec<u8>),
    /// These bytes as soon as the head arrived, before reading any of the body, then close (like a server that
    /// refuses a body it will not read: an early 413).
    EarlyThenClose(Vec<u8>),
}

/// A 200 with a small body, keep-alive.
pub fn ok() -> Reply {
    Reply::Bytes(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A running raw backend (on 127.0.0.1, unless started on another address); its threads end with the test process.
pub struct RawBackend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl RawBackend {
    /// Starts a backend that answers every request by `script`.
    pub fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> RawBackend {
        RawBackend::start_on("127.0.0.1:0".parse().expect("an address"), script)
    }

    /// Starts one on `addr` (another loopback address, a chosen port).
    pub fn start_on(addr: SocketAddr, script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> RawBackend {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind raw backend on {addr}: {e}"));
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        let record = seen.clone();
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { continue };
                let (record, script) = (record.clone(), script.clone());
                std::thread::spawn(move || serve(n, stream, &record, &*script));
            }
        });
        RawBackend { addr, seen }
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
}

fn serve(conn: usize, mut stream: TcpStream, record: &Mutex<Vec<Seen>>, script: &Script) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    loop {
        let Some(head_len) = read_head(&mut stream, &mut buf) else { return };
        let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
        buf.drain(..head_len);
        let mut seen = Seen { conn, head, body: Vec::new() };
        if let Reply::EarlyThenClose(bytes) = script(&seen) {
            record.lock().expect("lock").push(seen);
            let _ = stream.write_all(&bytes);
            return; // closed with the body unread: the kernel resets the connection
        }
        let chunked = seen.headers("transfer-encoding").iter().any(|v| v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            read_chunked(&mut stream, &mut buf)
        } else {
            // Lenient on purpose: an unreadable length counts as no body.
            let n = seen
                .headers("content-length")
                .first()
                .filter(|v| v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            read_exact(&mut stream, &mut buf, n)
        };
        let Some(body) = body else { return };
        seen.body = body;
        let reply = script(&seen);
        record.lock().expect("lock").push(seen);
        match reply {
            Reply::Bytes(bytes) => {
                if stream.write_all(&bytes).is_err() {
                    return;
                }
            }
            Reply::BytesThenClose(bytes) | Reply::EarlyThenClose(bytes) => {
                let _ = stream.write_all(&bytes);
                return;
            }
        }
    }
}

fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    match stream.read(&mut chunk) {
        Ok(0) | Err(_) => false,
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
    }
}

fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        if buf.len() > 1 << 20 || !fill(stream, buf) {
            return None;
        }
    }
}

fn read_exact(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Option<Vec<u8>> {
    while buf.len() < n {
        if !fill(stream, buf) {
            return None;
        }
    }
    Some(buf.drain(..n).collect())
}

fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = buf.drain(..i + 2).take(i).collect();
            return Some(line);
        }
        if !fill(stream, buf) {
            return None;
        }
    }
}

fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(stream, buf)?;
        let text = String::from_utf8_lossy(&line);
        let size = usize::from_str_radix(text.split(';').next().unwrap_or("").trim(), 16).ok()?;
        if size == 0 {
            // Trailers, up to the blank line.
            while !read_line(stream, buf)?.is_empty() {}
            return Some(body);
        }
        body.extend(read_exact(stream, buf, size)?);
        read_line(stream, buf)?;
    }
}

/// Sends `bytes` on a new connection to `addr` and reads until the peer closes or `limit` passes; returns what
/// arrived.
pub fn exchange(addr: SocketAddr, bytes: &[u8], limit: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(limit)).expect("timeout");
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
    out
}

/// One response parsed off a client connection's bytes.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Every complete response in `bytes`, in order, framed by Content-Length or chunked; what follows the last
/// complete one (a truncated response) is returned as the rest.
pub fn answers(mut bytes: &[u8]) -> (Vec<Answer>, Vec<u8>) {
    let mut out = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(len)) = resp.parse(bytes) else { return (out, bytes.to_vec()) };
        let status = resp.code.unwrap_or(0);
        let headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).to_string()))
            .collect();
        let find = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let rest = &bytes[len..];
        let (body, used) = if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            match dechunk(rest) {
                Some(x) => x,
                None => return (out, bytes.to_vec()),
            }
        } else {
            let n = find("content-length").and_then(|v| v.parse::<usize>().ok()).unwrap_or(0);
            if rest.len() < n {
                return (out, bytes.to_vec());
            }
            (rest[..n].to_vec(), n)
        };
        out.push(Answer { status, headers, body });
        bytes = &rest[used..];
        if bytes.is_empty() {
            return (out, Vec::new());
        }
    }
}

fn dechunk(mut rest: &[u8]) -> Option<(Vec<u8>, usize)> {
    let total = rest.len();
    let mut body = Vec::new();
    loop {
        let i = rest.windows(2).position(|w| w == b"\r\n")?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..i]).split(';').next()?.trim(), 16).ok()?;
        rest = &rest[i + 2..];
        if size == 0 {
            let end = rest.windows(2).position(|w| w == b"\r\n")?;
            rest = &rest[end + 2..];
            return Some((body, total - rest.len()));
        }
        if rest.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}
