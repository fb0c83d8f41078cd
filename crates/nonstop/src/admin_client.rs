//! A small blocking client of the admin API (plain HTTP/1.1 over loopback), for `nonstop queue`, `deploy`,
//! `rollback`, `status` and `demo`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long a plain call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a followed deploy may stay silent (its longest step is bounded by the app's timeouts).
const STREAM_SILENCE_MAX: Duration = Duration::from_secs(3600);

fn send(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    // The admin API refuses a body of any other type (a web page could send it one), and a Host that is not its
    // own address (DNS rebinding): name the address actually reached, 127.0.0.1 rather than 0.0.0.0.
    let kind = if body.is_empty() { "" } else { "Content-Type: application/json\r\n" };
    let host = s.peer_addr().unwrap_or(addr);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}{kind}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(s)
}

/// One request; the status and the whole body.
pub fn call(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = send(addr, token, method, path, body)?;
    s.set_read_timeout(Some(CALL_TIMEOUT))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

/// One request whose 2xx answer is a stream of lines (chunked), handed to `on_line` as they come. A non-2xx
/// answer's body is returned whole as the error text.
pub fn stream(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
    mut on_line: impl FnMut(&str),
) -> std::io::Result<Result<(), (u16, String)>> {
    let s = send(addr, token, method, path, body)?;
    s.set_read_timeout(Some(STREAM_SILENCE_MAX))?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    if !(200..300).contains(&status) || !chunked {
        let mut rest = String::new();
        r.read_to_string(&mut rest)?;
        let text = if chunked { dechunk(&rest) } else { rest };
        if (200..300).contains(&status) {
            text.lines().for_each(&mut on_line);
            return Ok(Ok(()));
        }
        return Ok(Err((status, text)));
    }
    let mut pending = String::new();
    loop {
        let mut size = String::new();
        if r.read_line(&mut size)? == 0 {
            break;
        }
        let n = usize::from_str_radix(size.trim(), 16).map_err(|_| std::io::Error::other("bad chunk size"))?;
        if n == 0 {
            break;
        }
        let mut data = vec![0u8; n + 2];
        r.read_exact(&mut data)?;
        pending.push_str(&String::from_utf8_lossy(&data[..n]));
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            on_line(line.trim_end());
        }
    }
    if !pending.trim().is_empty() {
        on_line(pending.trim_end());
    }
    Ok(Ok(()))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}
