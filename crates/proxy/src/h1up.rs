//! The proxy's own HTTP/1.1 client for servers: the request head is written straight from the rewritten
//! `http` parts, the client's body is pumped with its framing, the response head is parsed in place with
//! httparse, and the response body is read off the socket by the client connection's own task. No connection
//! task, no channel between tasks, no per-request timer beyond the response timeout.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::upstream::ReqBody;

/// Largest response head accepted from a server.
pub const HEAD_BYTES_MAX: usize = 64 * 1024;
/// Most response headers accepted from a server.
const HEADERS_MAX: usize = 128;
/// A request body kept for replay up to this size is written with its head.
const SMALL_BODY_BYTES: usize = 16 * 1024;
/// Read buffer growth step.
const READ_CHUNK: usize = 16 * 1024;

/// A connection to a server, with what was read but not yet consumed.
pub struct RawConn {
    pub stream: TcpStream,
    buf: BytesMut,
    /// The request head being written (kept to reuse its allocation).
    out: Vec<u8>,
    /// Exchanges completed on this connection (0: a fresh one).
    pub reused: u32,
}

/// How the exchange failed, and whether the server can have seen the request.
#[derive(Debug)]
pub enum ExchangeError {
    /// Writing the request failed before any byte of it was accepted by the socket.
    Unsent(io::Error),
    /// The request was (at least partly) sent, then the connection failed or the response was malformed.
    Failed(io::Error),
    /// A reused keep-alive connection was closed or reset with not one byte of response: the classic race with a
    /// server closing an idle connection (or dying). The request was written, so only a request that is safe to
    /// repeat may be retried.
    Stale(io::Error),
    /// A fresh connection was closed or reset with not one byte of response: the server died, or it dropped this
    /// request (see `ProxyError::UpstreamIo::dropped`).
    Dropped(io::Error),
    /// The client's body exceeded the route's limit.
    BodyTooLarge,
    /// Reading the client's body failed (the client's fault, not the server's).
    ClientBody(io::Error),
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl RawConn {
    pub fn new(stream: TcpStream) -> RawConn {
        RawConn { stream, buf: BytesMut::with_capacity(READ_CHUNK), out: Vec::new(), reused: 0 }
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(READ_CHUNK);
        }
        let n = self.stream.read_buf(&mut self.buf).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed the connection before answering"));
        }
        Ok(())
    }
}

/// Header names common in requests and responses, with their lower-case text, by length: a name from the wire is
/// lower-cased and compared a word at a time against the few of its length (`header_name`). Measured under load,
/// this saves little over `HeaderName::from_bytes` (about 0.6 % of a request's instructions).
const KNOWN_NAMES: [&[(&[u8], HeaderName)]; 18] = {
    use http::header::*;
    [
        &[],
        &[],
        &[],
        &[],
        &[(b"date", DATE), (b"host", HOST), (b"etag", ETAG), (b"vary", VARY)],
        &[],
        &[(b"server", SERVER), (b"accept", ACCEPT), (b"cookie", COOKIE), (b"origin", ORIGIN)],
        &[(b"expires", EXPIRES), (b"referer", REFERER), (b"upgrade", UPGRADE), (b"trailer", TRAILER)],
        &[(b"location", LOCATION)],
        &[],
        &[(b"connection", CONNECTION), (b"set-cookie", SET_COOKIE), (b"user-agent", USER_AGENT)],
        &[],
        &[(b"content-type", CONTENT_TYPE)],
        &[
            (b"cache-control", CACHE_CONTROL),
            (b"last-modified", LAST_MODIFIED),
            (b"accept-ranges", ACCEPT_RANGES),
            (b"authorization", AUTHORIZATION),
        ],
        &[(b"content-length", CONTENT_LENGTH)],
        &[(b"accept-encoding", ACCEPT_ENCODING), (b"accept-language", ACCEPT_LANGUAGE)],
        &[(b"content-encoding", CONTENT_ENCODING)],
        &[(b"transfer-encoding", TRANSFER_ENCODING), (b"if-modified-since", IF_MODIFIED_SINCE)],
    ]
};

/// A header name from the wire, in any case: the same `HeaderName` as `HeaderName::from_bytes` gives.
pub(crate) fn header_name(name: &[u8]) -> Result<HeaderName, http::header::InvalidHeaderName> {
    if let Some(&known) = KNOWN_NAMES.get(name.len()) {
        if !known.is_empty() {
            let (a, b, c) = words(name);
            let lowered = (ascii_lower(a), ascii_lower(b), ascii_lower(c));
            for (text, header) in known {
                if words(text) == lowered {
                    return Ok(header.clone());
                }
            }
        }
    }
    HeaderName::from_bytes(name)
}

/// A name of 4 to 24 bytes as three little-endian words that together cover every byte (they may overlap):
/// equal words mean equal names of the same length.
fn words(b: &[u8]) -> (u64, u64, u64) {
    let n = b.len();
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"));
    let half = |at: usize| u64::from(u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes")));
    match n {
        4..=7 => (half(0), half(n - 4), 0),
        8..=16 => (word(0), word(n - 8), 0),
        _ => (word(0), word(n - 8), word(8)),
    }
}

/// Lower-cases the ASCII letters among eight bytes at once; other bytes are unchanged.
fn ascii_lower(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = ONES * 0x80;
    let low7 = x & !HIGH;
    // Per byte, no carry crosses into the next: the high bit is set where the low seven bits are >= 'A', > 'Z'.
    let from_a = low7 + ONES * (0x80 - u64::from(b'A'));
    let past_z = low7 + ONES * (0x80 - u64::from(b'Z') - 1);
    let upper = from_a & !past_z & !x & HIGH;
    x | (upper >> 2)
}

/// Writes one `name: value` header line.
pub(crate) fn put_header(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Serialises a request head.
fn head_bytes(
    out: &mut Vec<u8>,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    added: &[(HeaderName, HeaderValue)],
    framing: &RequestFraming,
) {
    out.clear();
    out.reserve(256 + headers.len() * 32);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if name == http::header::CONTENT_LENGTH && !matches!(framing, RequestFraming::Length) {
            continue;
        }
        put_header(out, name, value);
    }
    for (name, value) in added {
        put_header(out, name, value);
    }
    match framing {
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        RequestFraming::Empty if matches!(*method, Method::POST | Method::PUT | Method::PATCH) => {
            out.extend_from_slice(b"content-length: 0\r\n")
        }
        _ => {}
    }
    out.extend_from_slice(b"\r\n");
}

enum RequestFraming {
    Empty,
    /// The client gave a Content-Length, forwarded as is.
    Length,
    Chunked,
}

/// What the response body is framed by.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Framing {
    None,
    Length(u64),
    /// Chunked: bytes left in the current chunk (0 = a line is next), whether the last chunk was seen, and
    /// whether the next line is the empty one that ends a chunk's data.
    Chunked {
        left: u64,
        last: bool,
        crlf: bool,
    },
    UntilClose,
}

/// Sends one request over `conn` and reads the response head. The response body keeps the connection; it is
/// handed to `done` when the body ends cleanly with the connection reusable.
pub async fn exchange(
    mut conn: RawConn,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    added: &[(HeaderName, HeaderValue)],
    mut body: ReqBody,
    done: Box<dyn FnOnce(RawConn) + Send>,
) -> Result<Response<RawBody>, ExchangeError> {
    let framing = if body.is_end_stream() {
        RequestFraming::Empty
    } else if headers.contains_key(http::header::CONTENT_LENGTH) {
        RequestFraming::Length
    } else {
        RequestFraming::Chunked
    };
    let chunked = matches!(framing, RequestFraming::Chunked);
    let mut out = std::mem::take(&mut conn.out);
    head_bytes(&mut out, method, path, headers, added, &framing);
    // A small body kept for replay leaves with its head, in one write.
    let mut body_sent = false;
    if let (RequestFraming::Length, ReqBody::Full(Some(data))) = (&framing, &body) {
        if data.len() <= SMALL_BODY_BYTES {
            out.extend_from_slice(data);
            body_sent = true;
        }
    }
    // The first write tells whether the server can have seen anything: a failure here sent nothing.
    let written = conn.stream.write_all(&out).await;
    if out.capacity() <= 2 * SMALL_BODY_BYTES {
        conn.out = out;
    }
    written.map_err(ExchangeError::Unsent)?;
    let body_done = if !matches!(framing, RequestFraming::Empty) && !body_sent {
        send_body(&mut conn, &mut body, chunked, method).await?
    } else {
        true
    };

    loop {
        match parse_head(&conn.buf, method).map_err(ExchangeError::Failed)? {
            Some(Head::Informational(len)) => {
                // 100 Continue and friends: the final response follows.
                conn.buf.advance(len);
            }
            Some(Head::Final(head)) => {
                let bytes = conn.buf.split_to(head.len).freeze();
                let mut map = HeaderMap::with_capacity(head.headers.len());
                for (name, (v0, v1)) in head.headers {
                    // SAFETY: httparse accepted the value, which rules out the bytes a header value may not hold.
                    let value = unsafe { HeaderValue::from_maybe_shared_unchecked(bytes.slice(v0..v1)) };
                    map.append(name, value);
                }
                let mut out = Response::new(RawBody {
                    conn: Some(conn),
                    framing: head.framing,
                    // Unless the whole request went out, the server may still be reading it: never reused.
                    reusable: !head.close && body_done,
                    done: Some(done),
                });
                *out.status_mut() = head.status;
                *out.version_mut() = Version::HTTP_11;
                *out.headers_mut() = map;
                return Ok(out);
            }
            None => {
                if conn.buf.len() > HEAD_BYTES_MAX {
                    return Err(ExchangeError::Failed(bad("response head too large")));
                }
                let nothing_yet = conn.buf.is_empty();
                let reused = conn.reused > 0;
                conn.fill().await.map_err(|e| {
                    let gone = matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset);
                    match (nothing_yet && gone, reused) {
                        (true, true) => ExchangeError::Stale(e),
                        (true, false) => ExchangeError::Dropped(e),
                        (false, _) => ExchangeError::Failed(e),
                    }
                })?;
            }
        }
    }
}

/// Writes the request body while watching the connection for an early answer. `Ok(true)`: the body went out in
/// full. `Ok(false)`: the server answered before it read the whole body, and its final response head is in
/// `conn.buf`; the rest is not sent. A server that refuses a body (a 413 before reading it) and closes is
/// answering, not failing: its answer goes to the client, and a write error after a complete response head is
/// not a failure of the server. An early answer below 400 (a server streaming its answer while it reads) lets the
/// body go on.
async fn send_body(
    conn: &mut RawConn,
    body: &mut ReqBody,
    chunked: bool,
    method: &Method,
) -> Result<bool, ExchangeError> {
    let RawConn { stream, buf, .. } = conn;
    let (mut rd, mut wr) = stream.split();
    let pump = async {
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(f) => f,
                Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
                    return Err(ExchangeError::BodyTooLarge)
                }
                Err(e) => return Err(ExchangeError::ClientBody(io::Error::other(e.to_string()))),
            };
            if let Ok(data) = frame.into_data() {
                if data.is_empty() {
                    continue;
                }
                if chunked {
                    let size = format!("{:x}\r\n", data.len());
                    wr.write_all(size.as_bytes()).await.map_err(ExchangeError::Failed)?;
                    wr.write_all(&data).await.map_err(ExchangeError::Failed)?;
                    wr.write_all(b"\r\n").await.map_err(ExchangeError::Failed)?;
                } else {
                    wr.write_all(&data).await.map_err(ExchangeError::Failed)?;
                }
            }
        }
        if chunked {
            wr.write_all(b"0\r\n\r\n").await.map_err(ExchangeError::Failed)?;
        }
        Ok(())
    };
    tokio::pin!(pump);
    let mut watching = true;
    loop {
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(READ_CHUNK);
        }
        tokio::select! {
            sent = &mut pump => return match sent {
                Ok(()) => Ok(true),
                Err(ExchangeError::Failed(e)) => {
                    // The server may have answered, then closed: what it said is read to the end of its head.
                    loop {
                        if early_answer(buf, method).is_some() {
                            return Ok(false);
                        }
                        match rd.read_buf(buf).await {
                            Ok(n) if n > 0 && buf.len() <= HEAD_BYTES_MAX => {}
                            _ => return Err(ExchangeError::Failed(e)),
                        }
                    }
                }
                Err(e) => Err(e),
            },
            read = rd.read_buf(buf), if watching => match read {
                // Closed or failed: the body's next write tells, and a head already read still counts.
                Ok(0) | Err(_) => watching = false,
                Ok(_) => match early_answer(buf, method) {
                    Some(status) if status.as_u16() >= 400 => return Ok(false),
                    Some(_) => watching = false,
                    None if buf.len() > HEAD_BYTES_MAX => watching = false,
                    None => {}
                },
            },
        }
    }
}

/// The status of the final response head at the start of `buf` (after any 1xx), once it is complete; a head
/// that does not parse counts too, for the exchange to report.
fn early_answer(buf: &[u8], method: &Method) -> Option<StatusCode> {
    let mut at = 0;
    loop {
        match parse_head(&buf[at..], method) {
            Ok(Some(Head::Informational(len))) => at += len,
            Ok(Some(Head::Final(head))) => return Some(head.status),
            Ok(None) => return None,
            Err(_) => return Some(StatusCode::BAD_GATEWAY),
        }
    }
}

/// A parsed response head.
enum Head {
    /// A 1xx other than 101, of this many bytes.
    Informational(usize),
    Final(FinalHead),
}

struct FinalHead {
    len: usize,
    status: StatusCode,
    /// Names, and where the values lie in the head; hop-by-hop headers the proxy handles itself are left out.
    headers: Vec<(HeaderName, (usize, usize))>,
    framing: Framing,
    close: bool,
}

/// Parses a response head at the start of `buf`; `None` while it is incomplete.
fn parse_head(buf: &[u8], method: &Method) -> io::Result<Option<Head>> {
    let mut slots = [const { MaybeUninit::<httparse::Header>::uninit() }; HEADERS_MAX];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(bad(format!("bad response head: {e}"))),
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| bad(format!("bad status {code}")))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Some(Head::Informational(len)));
    }
    let base = buf.as_ptr() as usize;
    let mut headers = Vec::with_capacity(resp.headers.len());
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // Upgrades go through hyper's client: this client never asks for one, so a 101 here would turn the rest
        // of the connection into bytes nobody framed.
        return Err(bad("101 Switching Protocols to a request that asked for no upgrade"));
    }
    let (mut length, mut close) = (None, resp.version == Some(0));
    let mut codings: Vec<&[u8]> = Vec::new();
    let mut length_at = None;
    for h in resp.headers.iter() {
        let name = header_name(h.name.as_bytes()).map_err(|_| bad("bad header name"))?;
        if name == http::header::CONTENT_LENGTH {
            let n = crate::framing::content_length(h.value).ok_or_else(|| bad("bad Content-Length"))?;
            if length.replace(n).is_some_and(|m| m != n) {
                return Err(bad("two different Content-Length values"));
            }
            // The proxy writes the client's framing itself, from the body's length; only a response without a
            // body (to HEAD, a 304) passes its length on, canonical.
            if crate::framing::is_canonical_length(h.value) {
                let start = h.value.as_ptr() as usize - base;
                length_at = Some((start, start + h.value.len()));
            }
            continue;
        } else if name == http::header::TRANSFER_ENCODING {
            codings.push(h.value);
            continue;
        } else if name == http::header::CONNECTION {
            let mut only_own = true;
            for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    only_own = false;
                }
            }
            // A Connection header naming other headers stays, so that the proxy strips those too.
            if only_own {
                continue;
            }
        } else if name.as_str() == "keep-alive" {
            continue;
        }
        let start = h.value.as_ptr() as usize - base;
        headers.push((name, (start, start + h.value.len())));
    }
    let chunked = !codings.is_empty();
    if chunked {
        if length.is_some() {
            return Err(bad("both Content-Length and Transfer-Encoding"));
        }
        if crate::framing::transfer_coding(codings.iter().copied()) != crate::framing::TransferCoding::Chunked {
            return Err(bad("a Transfer-Encoding that does not end in chunked"));
        }
    }
    let no_body = *method == Method::HEAD || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    if let (true, Some(at)) = (no_body && status != StatusCode::NO_CONTENT, length_at) {
        headers.push((http::header::CONTENT_LENGTH, at));
    }
    let framing = if no_body {
        Framing::None
    } else if chunked {
        Framing::Chunked { left: 0, last: false, crlf: false }
    } else if let Some(n) = length {
        Framing::Length(n)
    } else {
        close = true;
        Framing::UntilClose
    };
    Ok(Some(Head::Final(FinalHead { len, status, headers, framing, close })))
}

/// For `fuzzing`: the status and declared length of a final response head that this client accepts.
pub(crate) fn parse_for_fuzzing(buf: &[u8], method: &Method) -> Option<(u16, Option<u64>)> {
    match parse_head(buf, method) {
        Ok(Some(Head::Final(h))) => {
            let length = if let Framing::Length(n) = h.framing { Some(n) } else { None };
            Some((h.status.as_u16(), length))
        }
        _ => None,
    }
}

/// For `fuzzing`: decodes a chunked body fed `piece` bytes at a time. `Ok(Some(body))` at its end, `Ok(None)`
/// when the bytes ran out first, `Err` when the decoder refused them.
pub(crate) fn dechunk_for_fuzzing(data: &[u8], piece: usize) -> Result<Option<Vec<u8>>, String> {
    let mut framing = Framing::Chunked { left: 0, last: false, crlf: false };
    let mut buf = BytesMut::new();
    let mut body = Vec::new();
    let mut fed = 0;
    // Every step consumes bytes or ends; the bound only stops a decoder that would not.
    for _ in 0..(4 * data.len() + 16) {
        match chunked_step(&mut buf, &mut framing).map_err(|e| e.to_string())? {
            Chunk::Data(d) => body.extend_from_slice(&d),
            Chunk::Line => {}
            Chunk::End => return Ok(Some(body)),
            Chunk::More if fed >= data.len() => return Ok(None),
            Chunk::More => {
                let end = (fed + piece).min(data.len());
                buf.extend_from_slice(&data[fed..end]);
                fed = end;
            }
        }
    }
    panic!("the chunked decoder made no progress");
}

/// What one step of the chunked decoder gave.
#[derive(Debug)]
pub(crate) enum Chunk {
    /// Body bytes.
    Data(Bytes),
    /// A line was consumed (a size line, the CRLF after a chunk, a trailer): step again.
    Line,
    /// The body ended (the last chunk and its trailers).
    End,
    /// More bytes are needed from the connection.
    More,
}

/// One step of the chunked decoder over the buffered bytes, a pure state machine: `framing` (which must be
/// `Framing::Chunked`) says where in the body it is, and is updated. Strict: a chunk's data must be followed by
/// exactly CRLF, a size line is hex digits with optional extensions (`framing::chunk_size`), and no line may be
/// longer than a response head.
pub(crate) fn chunked_step(buf: &mut BytesMut, framing: &mut Framing) -> io::Result<Chunk> {
    let Framing::Chunked { left, last, crlf } = *framing else {
        return Err(io::Error::other("not a chunked body"));
    };
    if left > 0 {
        if buf.is_empty() {
            return Ok(Chunk::More);
        }
        let n = (buf.len() as u64).min(left);
        let rest = left - n;
        *framing = Framing::Chunked { left: rest, last, crlf: rest == 0 };
        return Ok(Chunk::Data(buf.split_to(n as usize).freeze()));
    }
    let Some(i) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > HEAD_BYTES_MAX {
            return Err(bad("chunk line too long"));
        }
        return Ok(Chunk::More);
    };
    // A line: the CRLF ending a chunk's data, a size line, or (after the last chunk) trailers.
    let line = buf.split_to(i + 2);
    let text = &line[..i];
    if last {
        // A trailer line is dropped; the empty line ends the body.
        return Ok(if text.is_empty() { Chunk::End } else { Chunk::Line });
    }
    if crlf {
        if !text.is_empty() {
            return Err(bad("chunk data longer than its size"));
        }
        *framing = Framing::Chunked { left: 0, last, crlf: false };
        return Ok(Chunk::Line);
    }
    *framing = match crate::framing::chunk_size(text) {
        Some(0) => Framing::Chunked { left: 0, last: true, crlf: false },
        Some(n) => Framing::Chunked { left: n, last: false, crlf: false },
        None => return Err(bad("bad chunk size")),
    };
    Ok(Chunk::Line)
}

/// Up to `left` buffered body bytes, without copying, and how many remain after them; `None` when none are buffered.
fn take_data(conn: &mut RawConn, left: u64) -> Option<(Bytes, u64)> {
    if conn.buf.is_empty() {
        return None;
    }
    let n = (conn.buf.len() as u64).min(left);
    Some((conn.buf.split_to(n as usize).freeze(), left - n))
}

/// A server's response body read straight off its socket.
pub struct RawBody {
    conn: Option<RawConn>,
    framing: Framing,
    reusable: bool,
    done: Option<Box<dyn FnOnce(RawConn) + Send>>,
}

impl RawBody {
    fn finish(&mut self) {
        self.framing = Framing::None;
        if let (Some(conn), Some(done)) = (self.conn.take(), self.done.take()) {
            if self.reusable && conn.buf.is_empty() {
                done(conn);
            }
        }
    }

    /// Reads more of the body: `None` when bytes arrived, the error when the read failed or the server closed.
    fn poll_more(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Error>> {
        Poll::Ready(match std::task::ready!(self.poll_fill(cx)) {
            Ok(0) => Some(io::Error::new(io::ErrorKind::UnexpectedEof, "server closed mid-body")),
            Ok(_) => None,
            Err(e) => Some(e),
        })
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let conn = self.conn.as_mut().expect("reading a finished body");
        if conn.buf.capacity() - conn.buf.len() < 4096 {
            conn.buf.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf)
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            match this.framing {
                Framing::None => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(0) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(left) => {
                    let conn = this.conn.as_mut().expect("body has its connection");
                    if let Some((data, rest)) = take_data(conn, left) {
                        this.framing = Framing::Length(rest);
                        if rest == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    if let Some(e) = std::task::ready!(this.poll_more(cx)) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
                Framing::UntilClose => {
                    let conn = this.conn.as_mut().expect("body has its connection");
                    if !conn.buf.is_empty() {
                        let data = conn.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    match std::task::ready!(this.poll_fill(cx)) {
                        Ok(0) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                }
                Framing::Chunked { .. } => {
                    let conn = this.conn.as_mut().expect("body has its connection");
                    match chunked_step(&mut conn.buf, &mut this.framing) {
                        Ok(Chunk::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Ok(Chunk::Line) => continue,
                        Ok(Chunk::End) => {
                            this.finish();
                            return Poll::Ready(None);
                        }
                        Ok(Chunk::More) => {}
                        Err(e) => return Poll::Ready(Some(Err(e))),
                    }
                    if let Some(e) = std::task::ready!(this.poll_more(cx)) {
                        return Poll::Ready(Some(Err(e)));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::None | Framing::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::None => SizeHint::with_exact(0),
            Framing::Length(n) => SizeHint::with_exact(n),
            _ => SizeHint::default(),
        }
    }
}

impl Drop for RawBody {
    fn drop(&mut self) {
        // A body with nothing left to read may never be polled: it still ended cleanly.
        if matches!(self.framing, Framing::None | Framing::Length(0)) {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_names_are_filed_under_their_length() {
        for (len, names) in KNOWN_NAMES.iter().enumerate() {
            for (text, name) in *names {
                assert_eq!(text.len(), len, "{name}");
                assert_eq!(*text, name.as_str().as_bytes());
            }
        }
    }

    #[test]
    fn header_names_match_the_http_crate_in_any_case() {
        let mut cases: Vec<String> = KNOWN_NAMES.iter().flat_map(|n| n.iter()).map(|(_, n)| n.to_string()).collect();
        cases.extend(
            ["x-request-id", "keep-alive", "Content-Lengthy", "dat", "x", "a-very-long-custom-header-name"]
                .map(String::from),
        );
        for name in cases {
            for variant in [name.clone(), name.to_ascii_uppercase(), {
                let mut c = name.clone();
                c[..1].make_ascii_uppercase();
                c
            }] {
                let ours = header_name(variant.as_bytes()).unwrap();
                let theirs = HeaderName::from_bytes(variant.as_bytes()).unwrap();
                assert_eq!(ours, theirs, "{variant}");
                assert_eq!(ours.as_str(), name.to_ascii_lowercase());
            }
        }
        // Near misses of every known name: one byte changed, at each position.
        for (text, name) in KNOWN_NAMES.iter().flat_map(|n| n.iter()) {
            for i in 0..text.len() {
                for swap in [b'x', b'-', b'_', b'0', b'@', b'[', b'`', b'{', 0xC3] {
                    let mut near = text.to_vec();
                    if near[i] == swap {
                        continue;
                    }
                    near[i] = swap;
                    let ours = header_name(&near);
                    assert!(
                        ours.as_ref().map_or(true, |n| n != name),
                        "{:?} taken for {name}",
                        String::from_utf8_lossy(&near)
                    );
                    assert_eq!(ours.ok(), HeaderName::from_bytes(&near).ok());
                }
            }
        }
        let mut every = [0u8; 8];
        for b in 0..=255u8 {
            every.fill(b);
            assert_eq!(
                ascii_lower(u64::from_le_bytes(every)),
                u64::from_le_bytes(every.map(|c| c.to_ascii_lowercase()))
            );
        }
        for bad in ["", "bad name", "da te", "conte\u{0}t-type"] {
            assert!(header_name(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn response_heads_drop_the_hop_by_hop_headers() {
        let text = b"HTTP/1.1 200 OK\r\nServer: x\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nContent-Length: 3\r\n\r\nok\n";
        let Some(Head::Final(head)) = parse_head(text, &Method::GET).unwrap() else { panic!("no final head") };
        let names: Vec<&str> = head.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["server"], "the length is written by the proxy, from the body");
        assert!(matches!(head.framing, Framing::Length(3)));
        let text = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n";
        let Some(Head::Final(head)) = parse_head(text, &Method::HEAD).unwrap() else { panic!("no final head") };
        let names: Vec<&str> = head.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-length"], "a HEAD response keeps the length of what GET would send");
        assert!(!head.close);
        let text = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close, x-secret\r\n\r\n";
        let Some(Head::Final(head)) = parse_head(text, &Method::GET).unwrap() else { panic!("no final head") };
        let names: Vec<&str> = head.headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["connection"], "a Connection header naming others stays, for the proxy to strip those");
        assert!(matches!(head.framing, Framing::Chunked { .. }));
        assert!(head.close);
    }

    #[test]
    fn response_framing_another_parser_could_read_differently_is_refused() {
        for (text, why) in [
            ("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "two different"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\n", "bad Content-Length"),
            ("HTTP/1.1 200 OK\r\nContent-Length: +3\r\n\r\n", "bad Content-Length"),
            ("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\n", "does not end in chunked"),
            ("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "does not end in chunked"),
            ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", "asked for no upgrade"),
        ] {
            let e = parse_head(text.as_bytes(), &Method::GET).err().unwrap_or_else(|| panic!("accepted {text:?}"));
            assert!(e.to_string().contains(why), "{text:?}: {e}");
        }
        let same = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n";
        let Some(Head::Final(head)) = parse_head(same, &Method::GET).unwrap() else { panic!("no final head") };
        assert!(matches!(head.framing, Framing::Length(3)), "equal lengths are merged");
    }
}
