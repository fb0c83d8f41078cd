//! The client connection's socket as hyper sees it: reads are delegated to the `TcpStream` (keeping tokio's
//! readiness optimisations) while noting whether a request head is partly read, and a duplicate of the descriptor
//! lets the listener still answer 408 after hyper gives up on a slow request head.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

pub struct TrackedIo<S> {
    pub stream: S,
    /// Set when bytes arrive, cleared when a request head is complete: true means a head is partly read.
    pub head_pending: Arc<AtomicBool>,
}

impl<S: AsyncRead + Unpin> AsyncRead for TrackedIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.head_pending.store(true, Ordering::Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TrackedIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A second descriptor for the same socket, to write a last answer after hyper has dropped the stream. It is
/// close-on-exec: a child process started meanwhile (an app instance) must not inherit it, or the socket would
/// outlive the proxy's close, and a client reusing the connection would wait forever for an answer.
pub fn duplicate(stream: &TcpStream) -> Option<OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) of a descriptor we own; on success the new descriptor is ours alone to close.
    let fd = unsafe { libc::fcntl(stream.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Writes `bytes` on a blocking-free best-effort basis (the socket is non-blocking; a short write is accepted).
pub fn write_last(fd: &OwnedFd, bytes: &[u8]) {
    // SAFETY: write(2) from a valid buffer to a descriptor we own.
    unsafe {
        libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len());
    }
}

/// The answer to a client that did not finish its request head in time.
pub const REQUEST_TIMEOUT_RESPONSE: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n\
content-length: 64\r\nconnection: close\r\n\r\n{\"error\":\"request head not received within header_read_timeout\"}";

#[cfg(test)]
mod tests {
    #[test]
    fn the_duplicate_is_not_inherited_by_children() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
            let fd = super::duplicate(&stream).unwrap();
            // SAFETY: F_GETFD reads the descriptor's flags.
            let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::F_GETFD) };
            assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        });
    }

    #[test]
    fn request_timeout_response_is_well_formed() {
        let text = std::str::from_utf8(super::REQUEST_TIMEOUT_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head}");
    }
}
