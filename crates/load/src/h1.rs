//! A minimal HTTP/1.1 client connection for load generation: writes prepared request bytes, parses the response
//! head in place with httparse, and skips the body by Content-Length, chunked framing, or connection close. One
//! task per connection and no allocation per response beyond the tracked header's value.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted.
pub const HEAD_BYTES_MAX: usize = 64 * 1024;
/// Most body bytes kept when a caller asks for the body (checks and captures).
pub const BODY_KEPT_MAX: usize = 1024 * 1024;
/// Most response headers parsed.
const HEADERS_MAX: usize = 64;

/// How an exchange failed after the connection was up.
#[derive(Debug)]
pub enum ExchangeError {
    /// The connection broke (reset, closed early, or a malformed response).
    Broken(io::Error),
    /// The connection broke before one byte of the answer arrived (the write failed, or the server closed or reset
    /// it before answering): on a reused connection, the server may have closed it as idle just as the request
    /// left, so the request can be sent again on a fresh one.
    NoAnswer(io::Error),
}

impl ExchangeError {
    /// True when no byte of the answer arrived.
    pub fn no_answer(&self) -> bool {
        matches!(self, ExchangeError::NoAnswer(_))
    }
}

impl From<io::Error> for ExchangeError {
    fn from(e: io::Error) -> ExchangeError {
        ExchangeError::Broken(e)
    }
}

fn malformed(what: &str) -> ExchangeError {
    ExchangeError::Broken(io::Error::new(io::ErrorKind::InvalidData, what.to_string()))
}

/// The parts of a response the generator records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub tracked: Option<String>,
    /// The body, when asked for (up to [`BODY_KEPT_MAX`] bytes).
    pub body: Option<Vec<u8>>,
    /// False when the server asked to close the connection (or the body ran to the close).
    pub reusable: bool,
}

pub struct H1Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    pos: usize,
}

enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

impl H1Conn {
    pub async fn connect(addr: std::net::SocketAddr) -> io::Result<H1Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(H1Conn { stream, buf: Vec::with_capacity(16 * 1024), pos: 0 })
    }

    /// True when the server closed the connection (or sent something unasked) while it sat idle: it must not be
    /// reused, or the next request would fail on a connection the server already gave up.
    pub fn closed_while_idle(&self) -> bool {
        let mut probe = [0u8; 1];
        !matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// The connection's own address (for logs).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.local_addr().ok()
    }

    /// The socket's descriptor, for the timeout watchdog.
    pub fn raw_fd(&self) -> i32 {
        std::os::fd::AsRawFd::as_raw_fd(&self.stream)
    }

    /// Reads more bytes into the buffer; an early EOF is an error.
    async fn fill(&mut self) -> Result<(), ExchangeError> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(ExchangeError::Broken(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            )));
        }
        Ok(())
    }

    /// Sends one request (complete bytes) and reads the whole response. `head_only` is for HEAD requests.
    pub async fn exchange(
        &mut self,
        request: &[u8],
        head_only: bool,
        track: Option<&str>,
    ) -> Result<Answer, ExchangeError> {
        self.exchange_keeping(request, head_only, track, false).await
    }

    /// [`H1Conn::exchange`], also returning the body when `keep_body`.
    pub async fn exchange_keeping(
        &mut self,
        request: &[u8],
        head_only: bool,
        track: Option<&str>,
        keep_body: bool,
    ) -> Result<Answer, ExchangeError> {
        let mut kept: Option<Vec<u8>> = keep_body.then(Vec::new);
        self.stream.write_all(request).await.map_err(ExchangeError::NoAnswer)?;
        // Parse the head.
        let (status, framing, tracked, mut reusable, head_len) = loop {
            let mut headers = [httparse::EMPTY_HEADER; HEADERS_MAX];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf[self.pos..]) {
                Ok(httparse::Status::Complete(len)) => {
                    let status = resp.code.unwrap_or(0);
                    let (mut length, mut chunked, mut close) = (None, false, resp.version == Some(0));
                    let mut tracked = None;
                    for h in resp.headers.iter() {
                        if h.name.eq_ignore_ascii_case("content-length") {
                            length = std::str::from_utf8(h.value).ok().and_then(|v| v.trim().parse::<u64>().ok());
                        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                            chunked = h.value.windows(7).any(|w| w.eq_ignore_ascii_case(b"chunked"));
                        } else if h.name.eq_ignore_ascii_case("connection") {
                            close = h.value.windows(5).any(|w| w.eq_ignore_ascii_case(b"close"));
                        }
                        if track.is_some_and(|t| h.name.eq_ignore_ascii_case(t)) {
                            tracked = Some(String::from_utf8_lossy(h.value).into_owned());
                        }
                    }
                    let framing = if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
                        Framing::None
                    } else if chunked {
                        Framing::Chunked
                    } else if let Some(n) = length {
                        Framing::Length(n)
                    } else {
                        Framing::UntilClose
                    };
                    break (status, framing, tracked, !close, len);
                }
                Ok(httparse::Status::Partial) => {
                    if self.buf.len() - self.pos > HEAD_BYTES_MAX {
                        return Err(malformed("response head too large"));
                    }
                    let nothing_yet = self.pos == self.buf.len();
                    match self.fill().await {
                        Ok(()) => {}
                        Err(ExchangeError::Broken(e)) if nothing_yet => return Err(ExchangeError::NoAnswer(e)),
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(malformed(&format!("bad response head: {e}"))),
            }
        };
        self.pos += head_len;
        match framing {
            Framing::None => {}
            Framing::Length(n) => self.consume(n, n, kept.as_mut()).await?,
            Framing::Chunked => self.skip_chunked(kept.as_mut()).await?,
            Framing::UntilClose => {
                reusable = false;
                loop {
                    if let Some(k) = kept.as_mut() {
                        let room = BODY_KEPT_MAX.saturating_sub(k.len()).min(self.buf.len() - self.pos);
                        k.extend_from_slice(&self.buf[self.pos..self.pos + room]);
                    }
                    self.pos = self.buf.len();
                    match self.fill().await {
                        Ok(()) => {}
                        Err(_) => break,
                    }
                }
            }
        }
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        Ok(Answer { status, tracked, reusable, body: kept })
    }

    /// Skips a chunked body, trailers included.
    async fn skip_chunked(&mut self, mut kept: Option<&mut Vec<u8>>) -> Result<(), ExchangeError> {
        loop {
            // A size line.
            let line_end = loop {
                if let Some(i) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                    break self.pos + i;
                }
                if self.buf.len() - self.pos > 1024 {
                    return Err(malformed("chunk size line too long"));
                }
                self.fill().await?;
            };
            let line = std::str::from_utf8(&self.buf[self.pos..line_end]).map_err(|_| malformed("bad chunk size"))?;
            let size = u64::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| malformed("bad chunk size"))?;
            self.pos = line_end + 2;
            if size == 0 {
                // Trailers, up to an empty line.
                loop {
                    let end = loop {
                        if let Some(i) = self.buf[self.pos..].windows(2).position(|w| w == b"\r\n") {
                            break self.pos + i;
                        }
                        if self.buf.len() - self.pos > HEAD_BYTES_MAX {
                            return Err(malformed("trailers too large"));
                        }
                        self.fill().await?;
                    };
                    let empty = end == self.pos;
                    self.pos = end + 2;
                    if empty {
                        return Ok(());
                    }
                }
            }
            // The chunk's data, kept if asked, then its closing CRLF.
            self.consume(size + 2, size, kept.as_deref_mut()).await?;
        }
    }

    /// Consumes the next `total` body bytes, reading as needed, and keeps (up to [`BODY_KEPT_MAX`]) the first
    /// `data` of them.
    async fn consume(&mut self, total: u64, data: u64, mut kept: Option<&mut Vec<u8>>) -> Result<(), ExchangeError> {
        let mut done = 0u64;
        while done < total {
            if self.pos == self.buf.len() {
                self.fill().await?;
            }
            let take = ((self.buf.len() - self.pos) as u64).min(total - done);
            if let Some(k) = kept.as_deref_mut() {
                let keep = take.min(data.saturating_sub(done)) as usize;
                let room = BODY_KEPT_MAX.saturating_sub(k.len()).min(keep);
                k.extend_from_slice(&self.buf[self.pos..self.pos + room]);
            }
            self.pos += take as usize;
            done += take;
        }
        Ok(())
    }
}

/// Builds the bytes of one request.
pub fn request_bytes(
    method: &str,
    path: &str,
    authority: &str,
    headers: &[(String, String)],
    body: &[u8],
    close: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(authority.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS") {
        out.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A one-connection server that answers each request with the next canned response.
    async fn canned(responses: Vec<&'static [u8]>) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            for r in responses {
                let _ = s.read(&mut buf).await;
                // Dribble the response in small pieces to exercise partial parsing.
                for piece in r.chunks(7) {
                    s.write_all(piece).await.unwrap();
                    s.flush().await.unwrap();
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn parses_length_chunked_and_close_framing() {
        let addr = canned(vec![
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-V: v2\r\n\r\nhello",
            b"HTTP/1.1 503 Busy\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n10;x=y\r\n0123456789abcdef\r\n0\r\nT: 1\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
        ])
        .await;
        let mut c = H1Conn::connect(addr).await.unwrap();
        let req = request_bytes("GET", "/", "x", &[], b"", false);
        let a = c.exchange(&req, false, Some("x-v")).await.unwrap();
        assert_eq!(a, Answer { status: 200, tracked: Some("v2".into()), reusable: true, body: None });
        let a = c.exchange_keeping(&req, false, None, true).await.unwrap();
        assert_eq!((a.status, a.reusable), (503, true));
        assert_eq!(a.body.as_deref(), Some(&b"abc0123456789abcdef"[..]));
        assert_eq!(c.exchange(&req, false, None).await.unwrap().status, 204);
        let a = c.exchange(&req, false, None).await.unwrap();
        assert_eq!((a.status, a.reusable), (201, false));
        assert!(c.exchange(&req, false, None).await.is_err(), "the server has closed");
    }

    /// A reset before one byte of the answer is told apart from one after part of it: only the first may be sent
    /// again.
    #[tokio::test]
    async fn a_reset_before_any_answer_byte_is_no_answer() {
        for (partial, no_answer) in [(&b""[..], true), (&b"HTTP/1.1 200 OK\r\n"[..], false)] {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            tokio::spawn(async move {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await.unwrap();
                // The next request arrives and is left unread: closing then resets the connection.
                let _ = s.peek(&mut buf).await;
                s.write_all(partial).await.unwrap();
                if !partial.is_empty() {
                    // Let the client read those bytes before the reset, which would discard them.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            });
            let mut c = H1Conn::connect(addr).await.unwrap();
            let req = request_bytes("GET", "/", "x", &[], b"", false);
            assert_eq!(c.exchange(&req, false, None).await.unwrap().status, 200);
            let e = c.exchange(&req, false, None).await.unwrap_err();
            assert_eq!(e.no_answer(), no_answer, "{e:?} after {partial:?}");
        }
    }

    #[test]
    fn builds_requests() {
        let r = request_bytes("POST", "/orders", "h:1", &[("idempotency-key".into(), "k".into())], b"{}", true);
        assert_eq!(
            String::from_utf8(r).unwrap(),
            "POST /orders HTTP/1.1\r\nhost: h:1\r\nidempotency-key: k\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
        );
    }
}
