//! The proxy's own HTTP/1.1 server for plaintext client connections: request heads are parsed in place with
//! httparse, the response head and a small body leave in one write, and one timer per connection bounds the wait
//! for each head. Whatever it does not handle itself (HTTP/2 prior knowledge, HTTP/1.0, upgrades, chunked request
//! bodies, `Expect`, malformed or oversized heads) is handed, with the bytes already read, to hyper's server.

use std::future::{poll_fn, Future};
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::forward::{handle, ConnCtx, RespBody};
use crate::h1up::{header_name, put_header};
use crate::io::REQUEST_TIMEOUT_RESPONSE;

/// hyper's own limit on request headers (see `listener`), and the size of the stack array heads are parsed into.
const STACK_HEADERS: usize = 100;
/// Read buffer growth step.
const READ_CHUNK: usize = 8 * 1024;
/// Body data up to this size is copied next to the response head (one write); larger data is written as is.
const COALESCE_BYTES_MAX: usize = 16 * 1024;
/// How long a closing connection keeps reading (and dropping) what its client still sends.
const LINGER: Duration = Duration::from_secs(2);
/// How much a closing connection reads and drops at most.
const LINGER_BYTES_MAX: usize = 1024 * 1024;
/// A request body is read off the socket in pieces of at most this size.
const BODY_CHUNK_MAX: usize = 64 * 1024;

/// A client's request body: from hyper's server, or from this one.
pub enum ClientBody {
    Hyper(Incoming),
    Empty,
    Fixed(FixedBody),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map(|o| o.map(|r| r.map_err(Into::into))),
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Fixed(b) => b.poll_data(cx).map(|o| o.map(|r| r.map(Frame::data).map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Hyper(b) => b.is_end_stream(),
            ClientBody::Empty => true,
            ClientBody::Fixed(b) => b.first.is_none() && b.conn.body_left.load(Ordering::Relaxed) == 0,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Hyper(b) => b.size_hint(),
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Fixed(b) => SizeHint::with_exact(
                b.first.as_ref().map_or(0, |f| f.len() as u64) + b.conn.body_left.load(Ordering::Relaxed),
            ),
        }
    }
}

/// One client connection's socket, shared by the connection's loop and the request body being read.
struct Conn {
    stream: TcpStream,
    /// Body bytes of the current request still to be read off the socket.
    body_left: AtomicU64,
}

/// A request body with a Content-Length, read straight off the client's socket.
pub struct FixedBody {
    conn: Arc<Conn>,
    /// Body bytes that arrived with the head.
    first: Option<Bytes>,
}

impl FixedBody {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<io::Result<Bytes>>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let left = self.conn.body_left.load(Ordering::Relaxed);
        if left == 0 {
            return Poll::Ready(None);
        }
        let want = (left as usize).min(BODY_CHUNK_MAX);
        let mut buf = BytesMut::with_capacity(want);
        loop {
            if let Err(e) = std::task::ready!(self.conn.stream.poll_read_ready(cx)) {
                return Poll::Ready(Some(Err(e)));
            }
            match self.conn.stream.try_read_buf(&mut (&mut buf).limit(want)) {
                Ok(0) => {
                    let e = io::Error::new(io::ErrorKind::UnexpectedEof, "client closed the connection mid-body");
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(n) => {
                    self.conn.body_left.store(left - n as u64, Ordering::Relaxed);
                    return Poll::Ready(Some(Ok(buf.freeze())));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

/// The listener's limits that this server applies itself.
#[derive(Clone, Copy)]
pub struct Limits {
    pub header_read_timeout: Duration,
    pub header_bytes_max: usize,
    pub header_count_max: usize,
}

/// How a connection served here ended.
pub enum Ended {
    /// Closed (by either side, after a timeout, or for shutdown).
    Closed,
    /// A request this server does not handle: the socket and the bytes read so far go to hyper.
    HandOff(HandOff),
}

/// A connection handed to hyper: reads first return what was already read.
pub struct HandOff {
    conn: Arc<Conn>,
    rewind: Bytes,
    /// Set when bytes arrive, cleared when a request head is complete (as [`crate::io::TrackedIo`]).
    head_pending: Arc<AtomicBool>,
}

impl HandOff {
    pub fn stream(&self) -> &TcpStream {
        &self.conn.stream
    }
}

impl AsyncRead for HandOff {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.rewind.is_empty() {
            let n = self.rewind.len().min(buf.remaining());
            buf.put_slice(&self.rewind[..n]);
            self.rewind.advance(n);
            self.head_pending.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        loop {
            std::task::ready!(self.conn.stream.poll_read_ready(cx))?;
            // SAFETY: try_read writes only initialised bytes into the unfilled part, and we advance by its count.
            let unfilled = unsafe { &mut *(buf.unfilled_mut() as *mut [MaybeUninit<u8>] as *mut [u8]) };
            match self.conn.stream.try_read(unfilled) {
                Ok(n) => {
                    // SAFETY: `n` bytes were just written by the read.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    if n > 0 {
                        self.head_pending.store(true, Ordering::Relaxed);
                    }
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for HandOff {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.conn.stream.poll_write_ready(cx))?;
            match self.conn.stream.try_write(data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.conn.stream.poll_write_ready(cx))?;
            match self.conn.stream.try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&self.conn.stream).shutdown(std::net::Shutdown::Write))
    }
}

async fn write_all(stream: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Where a parsed head's parts lie in the read buffer.
struct Head {
    method: Method,
    target: (usize, usize),
    headers: Vec<((usize, usize), (usize, usize))>,
    len: usize,
    content_length: u64,
    close: bool,
}

/// What parsing the buffered bytes gave.
enum Parsed {
    Head(Head),
    Partial,
    /// Not for this server: hyper's.
    Other,
    /// Refused with this status and message, and the connection closed: nothing after it can be framed.
    Refused(StatusCode, &'static str),
}

fn parse(buf: &[u8], limits: &Limits) -> Parsed {
    let mut stack = [const { MaybeUninit::<httparse::Header>::uninit() }; STACK_HEADERS];
    // A limit above hyper's default costs a heap array per request, as it does in hyper.
    let mut heap = Vec::new();
    let slots: &mut [MaybeUninit<httparse::Header>] = if limits.header_count_max <= STACK_HEADERS {
        &mut stack[..limits.header_count_max]
    } else {
        heap.resize_with(limits.header_count_max, MaybeUninit::uninit);
        &mut heap[..]
    };
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Other,
    };
    if len > limits.header_bytes_max {
        return Parsed::Refused(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "request head larger than header_bytes_max",
        );
    }
    if req.version != Some(1) {
        return Parsed::Other;
    }
    let Ok(method) = Method::from_bytes(req.method.unwrap_or("").as_bytes()) else { return Parsed::Other };
    let base = buf.as_ptr() as usize;
    let at = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start, start + s.len())
    };
    let target = at(req.path.unwrap_or("").as_bytes());
    let mut headers = Vec::with_capacity(req.headers.len());
    let (mut content_length, mut close) = (None, false);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            // Only `1*DIGIT` (RFC 9110): a sign, Unicode white space or differing values could be read otherwise
            // by a server, and the body taken for the next request. The server gets the proxy's own spelling.
            let Some(n) = crate::framing::content_length(h.value) else {
                return Parsed::Refused(StatusCode::BAD_REQUEST, "Content-Length must be digits only");
            };
            if content_length.replace(n).is_some_and(|m| m != n) {
                return Parsed::Refused(StatusCode::BAD_REQUEST, "two different Content-Length values");
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Parsed::Other;
        } else if name.eq_ignore_ascii_case(b"connection") {
            close |= h.value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
        headers.push((at(name), at(h.value)));
    }
    Parsed::Head(Head { method, target, headers, len, content_length: content_length.unwrap_or(0), close })
}

/// For `fuzzing`: the head's length and body length when this server takes `buf` as a request head (and builds
/// the request from it).
pub(crate) fn parse_for_fuzzing(buf: &[u8], limits: &Limits) -> Option<(usize, u64)> {
    match parse(buf, limits) {
        Parsed::Head(h) => {
            let bytes = Bytes::copy_from_slice(&buf[..h.len]);
            let _ = request(&h, &bytes);
            Some((h.len, h.content_length))
        }
        _ => None,
    }
}

/// Builds the request from its head; `head` is the head's bytes, which the header values share.
fn request(parsed: &Head, head: &Bytes) -> Option<Request<()>> {
    let uri = Uri::from_maybe_shared(head.slice(parsed.target.0..parsed.target.1)).ok()?;
    // The forwarding headers travel beside the map (`forward::Added`); one spare slot is for an Idempotency-Key.
    // (A map sized far beyond its headers costs a large block per request.)
    let mut map = HeaderMap::with_capacity(parsed.headers.len() + 1);
    for &((n0, n1), (v0, v1)) in &parsed.headers {
        let name = header_name(&head[n0..n1]).ok()?;
        // SAFETY: httparse accepted the value, which rules out the bytes a header value may not hold.
        let value = unsafe { HeaderValue::from_maybe_shared_unchecked(head.slice(v0..v1)) };
        map.append(name, value);
    }
    let mut req = Request::new(());
    *req.method_mut() = parsed.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = map;
    Some(req)
}

thread_local! {
    /// The `Date` header value, remade once a second.
    static DATE: std::cell::RefCell<(u64, HeaderValue)> =
        const { std::cell::RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
}

fn date() -> HeaderValue {
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let text = httpdate::fmt_http_date(now);
            d.1 = HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(""));
            d.0 = secs;
        }
        d.1.clone()
    })
}

/// How the response body goes on the wire.
#[derive(PartialEq, Eq, Clone, Copy)]
enum Out {
    /// No body bytes (HEAD, 204, 304): the body is still read out, so that its server connection is reused.
    Nothing,
    Length(u64),
    Chunked,
}

/// Writes the status line and headers into `out`, and says how the body follows.
fn encode_head(out: &mut Vec<u8>, resp: &Response<RespBody>, head_request: bool, close: bool) -> Out {
    let status = resp.status();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let (mut dated, mut declared) = (false, None);
    for (name, value) in resp.headers() {
        if *name == header::DATE {
            dated = true;
        } else if *name == header::CONTENT_LENGTH {
            declared = std::str::from_utf8(value.as_bytes()).ok().and_then(|v| v.trim().parse::<u64>().ok());
        }
        put_header(out, name, value);
    }
    if !dated {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    let bodyless = head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if bodyless {
        Out::Nothing
    } else if let Some(n) = declared {
        Out::Length(n)
    } else if let Some(n) = resp.body().size_hint().exact() {
        let mut digits = itoa::Buffer::new();
        out.extend_from_slice(b"content-length: ");
        out.extend_from_slice(digits.format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
        Out::Length(n)
    } else {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Out::Chunked
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// Writes a response; `Ok(true)` when the connection may carry another request.
async fn write_response(
    stream: &TcpStream,
    out: &mut Vec<u8>,
    resp: Response<RespBody>,
    head_request: bool,
    close: bool,
) -> io::Result<bool> {
    out.clear();
    let close = close || resp.headers().get(header::CONNECTION).is_some_and(|v| v.as_bytes() == b"close");
    let framing = encode_head(out, &resp, head_request, close);
    let mut body = resp.into_body();
    let mut left = match framing {
        Out::Length(n) => n,
        _ => u64::MAX,
    };
    loop {
        // Take what the body has at once; write what is buffered before waiting for more.
        let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                write_all(stream, out).await?;
                out.clear();
                poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => {
                // The server failed mid-body: the client cannot be told but by closing.
                write_all(stream, out).await?;
                tracing::debug!(error = %e, "response body failed");
                return Ok(false);
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => d,
                Err(_) => continue, // trailers are not forwarded over HTTP/1.1
            },
        };
        if data.is_empty() || framing == Out::Nothing {
            continue;
        }
        if framing == Out::Length(0) || (matches!(framing, Out::Length(_)) && data.len() as u64 > left) {
            // More than the declared length: what fits is sent, and the connection closed.
            let fit = left.min(data.len() as u64) as usize;
            out.extend_from_slice(&data[..fit]);
            write_all(stream, out).await?;
            return Ok(false);
        }
        if framing == Out::Chunked {
            let mut hex = [0u8; 16];
            let n = hex_len(data.len(), &mut hex);
            out.extend_from_slice(&hex[..n]);
            out.extend_from_slice(b"\r\n");
        } else {
            left -= data.len() as u64;
        }
        if out.len() + data.len() <= COALESCE_BYTES_MAX {
            out.extend_from_slice(&data);
        } else {
            write_all(stream, out).await?;
            out.clear();
            write_all(stream, &data).await?;
        }
        if framing == Out::Chunked {
            out.extend_from_slice(b"\r\n");
        }
    }
    if framing == Out::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    write_all(stream, out).await?;
    out.clear();
    // A body shorter than its declared length leaves the client waiting for bytes that never come: close.
    Ok(!close && !matches!(framing, Out::Length(_) if left != 0))
}

/// Writes `n` in hexadecimal; returns the digits' count.
fn hex_len(mut n: usize, out: &mut [u8; 16]) -> usize {
    let mut digits = [0u8; 16];
    let mut i = 0;
    loop {
        digits[i] = b"0123456789abcdef"[n & 15];
        i += 1;
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    for (j, d) in digits[..i].iter().rev().enumerate() {
        out[j] = *d;
    }
    i
}

/// Serves requests on one plaintext client connection until it closes, or until a request needs hyper.
pub async fn serve(stream: TcpStream, ctx: Arc<ConnCtx>, limits: Limits, shutdown: watch::Receiver<bool>) -> Ended {
    let conn = Arc::new(Conn { stream, body_left: AtomicU64::new(0) });
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(READ_CHUNK);
    let timer = tokio::time::sleep(limits.header_read_timeout);
    tokio::pin!(timer);
    // Ready once the proxy shuts down (or its shutdown sender is gone): an idle connection then closes.
    let mut stop_rx = shutdown.clone();
    let stopping = async move {
        let _ = stop_rx.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stopping);
    loop {
        // The next head must be complete within the header read timeout (idle keep-alive time included).
        timer.as_mut().reset(tokio::time::Instant::now() + limits.header_read_timeout);
        let head = loop {
            match if buf.is_empty() { Parsed::Partial } else { parse(&buf, &limits) } {
                Parsed::Head(h) => break h,
                Parsed::Other => return hand_off(conn, buf, &ctx),
                Parsed::Refused(status, why) => return Box::pin(refuse(&conn.stream, &mut out, status, why)).await,
                Parsed::Partial if buf.len() > limits.header_bytes_max => {
                    let why = "request head larger than header_bytes_max";
                    let status = StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
                    return Box::pin(refuse(&conn.stream, &mut out, status, why)).await;
                }
                Parsed::Partial => {}
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(READ_CHUNK);
            }
            let read = match conn.stream.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // One hand-written poll rather than `select!`: read readiness is watched through the
                    // stream's own waker slot (no waiter list), and the shutdown signal is one long-lived
                    // future. (No other task polls this socket's readiness while a head is awaited: a request
                    // body still being read at this point has made the connection close instead.)
                    let idle = buf.is_empty();
                    if idle && buf.capacity() > 0 {
                        // Waiting for the next request: the buffers go back while the connection is idle (nginx
                        // frees its own then too), and the next read takes a fresh one. An idle keep-alive
                        // connection holds no buffer.
                        buf = BytesMut::new();
                        out = Vec::new();
                    }
                    let woke = poll_fn(|cx| {
                        if let Poll::Ready(r) = conn.stream.poll_read_ready(cx) {
                            return Poll::Ready(if r.is_ok() { Wake::Readable } else { Wake::Closed });
                        }
                        if timer.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Wake::Timeout);
                        }
                        if idle && stopping.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Wake::Closed);
                        }
                        Poll::Pending
                    })
                    .await;
                    match woke {
                        Wake::Readable => continue,
                        Wake::Closed => return Ended::Closed,
                        Wake::Timeout => {
                            if !idle {
                                let _ = Box::pin(write_all(&conn.stream, REQUEST_TIMEOUT_RESPONSE)).await;
                            }
                            return Ended::Closed;
                        }
                    }
                }
                r => r,
            };
            match read {
                Ok(0) | Err(_) => return Ended::Closed,
                Ok(_) => {}
            }
        };
        let bytes = buf.split_to(head.len).freeze();
        let Some(req) = request(&head, &bytes) else {
            // A target or header name hyper may word better: let it answer.
            let mut rest = BytesMut::from(&bytes[..]);
            rest.unsplit(buf);
            return hand_off(conn, rest, &ctx);
        };
        drop(bytes);
        let body = if head.content_length == 0 {
            ClientBody::Empty
        } else {
            let first = buf.split_to((buf.len() as u64).min(head.content_length) as usize).freeze();
            conn.body_left.store(head.content_length - first.len() as u64, Ordering::Relaxed);
            ClientBody::Fixed(FixedBody { conn: conn.clone(), first: (!first.is_empty()).then_some(first) })
        };
        let head_request = head.method == Method::HEAD;
        // Built apart from the call: inline, it made the whole `handle` future (4 KB) be copied per request.
        let req = req.map(|()| body);
        // On the heap: inline, the `handle` future (4 KB) would be part of every connection's task, idle ones too.
        let Ok(resp) = Box::pin(handle(ctx.clone(), req)).await;
        // A body not read to its end leaves its bytes in the way of the next request: close after this one.
        let unread = conn.body_left.load(Ordering::Relaxed) != 0;
        let close = head.close || unread || *shutdown.borrow();
        // On the heap too (1.2 KB), and so are the rare paths' futures below (`linger` reads into 4 KB): an idle
        // connection's task keeps only what waiting for the next request needs.
        match Box::pin(write_response(&conn.stream, &mut out, resp, head_request, close)).await {
            Ok(true) => {}
            Ok(false) => {
                Box::pin(linger(&conn.stream)).await;
                return Ended::Closed;
            }
            Err(_) => return Ended::Closed,
        }
        if out.capacity() > 4 * COALESCE_BYTES_MAX {
            out = Vec::with_capacity(READ_CHUNK);
        }
        if buf.is_empty() {
            // The client's next request is read on the event loop's next round, after every other connection
            // ready now has had its turn (nginx reads a keep-alive connection only when epoll reports it). Reading
            // it at once would put a whole request's forwarding between this response and the next one written;
            // when the client shares this CPU, it is then woken and scheduled once per response instead of once
            // per batch, and each switch between the two processes costs more than the request itself.
            tokio::task::yield_now().await;
        }
    }
}

/// Answers a request the proxy refuses before routing it (a head it cannot frame, or too large), then closes:
/// whatever the client sent after it cannot be told apart from a next request.
async fn refuse(stream: &TcpStream, out: &mut Vec<u8>, status: StatusCode, why: &str) -> Ended {
    let body = serde_json::json!({ "error": why }).to_string();
    out.clear();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(body.as_bytes());
    if write_all(stream, out).await.is_ok() {
        linger(stream).await;
    }
    Ended::Closed
}

/// What ended the wait for more of a request head.
enum Wake {
    Readable,
    Timeout,
    /// The socket failed, or the proxy is shutting down while the connection is idle.
    Closed,
}

/// After the last response: sends FIN, then reads and drops what the client still sends (a body nobody read, a
/// pipelined request), bounded in time and bytes, before the socket is closed. Closing with unread bytes would
/// send a reset, which can destroy the response before the client has read it (nginx's lingering close).
async fn linger(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    let deadline = tokio::time::Instant::now() + LINGER;
    let mut scratch = [0u8; 4096];
    let mut dropped = 0usize;
    while dropped <= LINGER_BYTES_MAX {
        match tokio::time::timeout_at(deadline, stream.readable()).await {
            Ok(Ok(())) => {}
            _ => return,
        }
        match stream.try_read(&mut scratch) {
            Ok(0) => return,
            Ok(n) => dropped += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

fn hand_off(conn: Arc<Conn>, buf: BytesMut, ctx: &ConnCtx) -> Ended {
    ctx.head_pending.store(!buf.is_empty(), Ordering::Relaxed);
    Ended::HandOff(HandOff { conn, rewind: buf.freeze(), head_pending: ctx.head_pending.clone() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { header_read_timeout: Duration::from_secs(1), header_bytes_max: 8192, header_count_max: 100 }
    }

    fn head(text: &str) -> Head {
        match parse(text.as_bytes(), &limits()) {
            Parsed::Head(h) => h,
            Parsed::Partial => panic!("partial: {text:?}"),
            Parsed::Other => panic!("other: {text:?}"),
            Parsed::Refused(status, why) => panic!("refused with {status} ({why}): {text:?}"),
        }
    }

    fn refused(text: &str) -> Option<StatusCode> {
        match parse(text.as_bytes(), &limits()) {
            Parsed::Refused(status, _) => Some(status),
            _ => None,
        }
    }

    fn other(text: &str) -> bool {
        matches!(parse(text.as_bytes(), &limits()), Parsed::Other)
    }

    #[test]
    fn a_plain_request_is_parsed_in_place() {
        let text = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Y: z\r\n\r\nrest";
        let h = head(text);
        assert_eq!(h.len, text.len() - 4);
        let bytes = Bytes::copy_from_slice(&text.as_bytes()[..h.len]);
        let req = request(&h, &bytes).unwrap();
        assert_eq!(req.method(), Method::GET);
        assert_eq!(req.uri().path(), "/a");
        assert_eq!(req.uri().query(), Some("b=1"));
        assert_eq!(req.headers()["host"], "x");
        assert_eq!(req.headers()["x-y"], "z");
        assert!(!h.close);
        assert_eq!(h.content_length, 0);
    }

    #[test]
    fn content_length_and_close_are_read() {
        let h = head("POST / HTTP/1.1\r\nContent-Length: 12\r\nConnection: keep-alive, close\r\n\r\n");
        assert_eq!(h.content_length, 12);
        assert!(h.close);
    }

    #[test]
    fn what_this_server_does_not_handle_goes_to_hyper() {
        assert!(other("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(other("GET / HTTP/1.0\r\n\r\n"));
        assert!(other("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"));
        assert!(other("POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n"));
        assert!(other("GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"));
        assert!(other("GET / HTTP/1.1\r\nBad Header: x\r\n\r\n"));
        let many: String = (0..101).map(|i| format!("h{i}: v\r\n")).collect();
        assert!(other(&format!("GET / HTTP/1.1\r\n{many}\r\n")));
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost:", &limits()), Parsed::Partial));
    }

    #[test]
    fn lengths_another_parser_could_read_differently_are_refused() {
        let bad = Some(StatusCode::BAD_REQUEST);
        for cl in ["+5", "-5", "5\u{a0}", "0x5", "5 5", "5,6", "", "1e1"] {
            assert_eq!(refused(&format!("POST / HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n")), bad, "{cl:?}");
        }
        assert_eq!(refused("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"), bad);
        assert_eq!(head("POST / HTTP/1.1\r\nContent-Length: 005\r\n\r\n").content_length, 5);
        assert_eq!(head("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n").content_length, 5);
    }

    #[test]
    fn a_complete_head_over_header_bytes_max_is_refused() {
        let big = format!("GET / HTTP/1.1\r\nx-big: {}\r\n\r\n", "a".repeat(9000));
        assert_eq!(refused(&big), Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        let small = Limits { header_bytes_max: 100, ..limits() };
        let text = format!("GET / HTTP/1.1\r\nx: {}\r\n\r\n", "a".repeat(100));
        assert!(matches!(
            parse(text.as_bytes(), &small),
            Parsed::Refused(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, _)
        ));
    }

    #[test]
    fn more_headers_than_the_stack_holds_are_parsed_on_the_heap() {
        let many: String = (0..150).map(|i| format!("h{i}: v\r\n")).collect();
        let text = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let l = Limits { header_count_max: 200, ..limits() };
        let Parsed::Head(h) = parse(text.as_bytes(), &l) else { panic!("not parsed") };
        assert_eq!(h.headers.len(), 150);
    }

    #[test]
    fn chunk_sizes_are_hexadecimal() {
        let mut out = [0u8; 16];
        for (n, text) in [(0usize, "0"), (10, "a"), (255, "ff"), (4096, "1000"), (usize::MAX, "ffffffffffffffff")] {
            let len = hex_len(n, &mut out);
            assert_eq!(&out[..len], text.as_bytes());
        }
    }

    fn encoded(resp: Response<RespBody>, head_request: bool, close: bool) -> (String, Out) {
        let mut out = Vec::new();
        let f = encode_head(&mut out, &resp, head_request, close);
        (String::from_utf8(out).unwrap(), f)
    }

    #[test]
    fn response_heads_get_date_and_framing() {
        use http_body_util::{Either, Full};
        let full = |s: &'static str| Response::new(Either::Right(Full::new(Bytes::from(s))));
        let (text, f) = encoded(full("hello"), false, false);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-length: 5\r\n"), "{text}");
        assert!(text.contains("date: "), "{text}");
        assert!(text.ends_with("\r\n\r\n"));
        assert!(f == Out::Length(5));
        let (text, f) = encoded(full("hello"), true, true);
        assert!(!text.contains("content-length"), "{text}");
        assert!(text.contains("connection: close\r\n"), "{text}");
        assert!(f == Out::Nothing);
        let mut resp = full("");
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let (text, f) = encoded(resp, false, false);
        assert!(text.starts_with("HTTP/1.1 204 No Content\r\n") && !text.contains("content-length"), "{text}");
        assert!(f == Out::Nothing);
    }
}
