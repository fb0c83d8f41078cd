//! Static files for a route: [`path`] maps a request path to segments under the root with no way out,
//! [`conditional`] decides 200, 206, 304, 412 or 416 from a file's validators (both pure), and [`Files::serve`] is
//! the thin I/O shell that reads metadata, refuses symlinks out of the root, picks a precompressed sibling and
//! streams the file in bounded chunks ([`FileBody`]).

pub mod conditional;
pub mod path;

use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body::{Frame, SizeHint};
use nonstop_compress::Coding;
use tokio::io::AsyncSeekExt;

pub use conditional::{Decision, Validators};
pub use path::Refused;

/// The most bytes a file body reads at once (and so holds in memory per response).
pub const CHUNK_BYTES_MAX: usize = 64 * 1024;

/// Precompressed siblings, by the suffix they carry, in the order they are looked for.
const SIBLINGS: [(Coding, &str); 3] = [(Coding::Zstd, "zst"), (Coding::Br, "br"), (Coding::Gzip, "gz")];

/// Why a request gets no file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Refused(Refused),
    #[error("no file {0:?} under the route's root")]
    NotFound(String),
    #[error("{0:?} leads out of the route's root (a symlink to outside it)")]
    Outside(String),
    #[error("{0:?} is a directory with none of the route's index files ({1}), and directories are not listed")]
    NoIndex(String, String),
    #[error("{0} is not served by a route of static files: only GET and HEAD are")]
    Method(String),
    #[error("reading {path:?}: {source}")]
    Io { path: String, source: std::io::Error },
}

impl Error {
    /// The status to answer with.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::Refused(Refused::Hidden(_)) | Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Refused(_) => StatusCode::BAD_REQUEST,
            Error::Outside(_) | Error::NoIndex(..) => StatusCode::FORBIDDEN,
            Error::Method(_) => StatusCode::METHOD_NOT_ALLOWED,
            Error::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A root directory served on a route.
#[derive(Debug, Clone)]
pub struct Files {
    /// Canonical: every file served resolves to a path under it.
    root: PathBuf,
    index: Vec<String>,
    precompressed: bool,
    hidden: bool,
}

/// What the shell needs of a request.
pub struct Request<'a> {
    pub method: &'a Method,
    /// The path mapped into the root (after the route's rewrites), percent-encoded as sent.
    pub path: &'a str,
    /// The path the client asked for, for the redirect that adds a directory's trailing slash.
    pub public_path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Files {
    /// Serves `root` (which must be a directory) with the given index file names; `precompressed`: answer with a
    /// `.zst`, `.br` or `.gz` sibling when the client accepts it; `hidden`: serve names that start with a dot.
    pub fn new(root: &Path, index: Vec<String>, precompressed: bool, hidden: bool) -> std::io::Result<Files> {
        let root = std::fs::canonicalize(root)?;
        if !std::fs::metadata(&root)?.is_dir() {
            return Err(std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"));
        }
        Ok(Files { root, index, precompressed, hidden })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Answers one request from the files under the root.
    pub async fn serve(&self, req: &Request<'_>) -> Result<Response<FileBody>, Error> {
        let head = match *req.method {
            Method::GET => false,
            Method::HEAD => true,
            _ => return Err(Error::Method(req.method.to_string())),
        };
        let rel = path::relative(req.path, self.hidden).map_err(Error::Refused)?;
        let shown = format!("/{}", rel.segments.join("/"));
        let mut file = self.root.clone();
        file.extend(&rel.segments);
        let meta = match tokio::fs::metadata(&file).await {
            Ok(m) => m,
            Err(e) if is_missing(&e) => return Err(Error::NotFound(shown)),
            Err(e) => return Err(Error::Io { path: shown, source: e }),
        };
        if meta.is_dir() {
            if !rel.trailing_slash {
                return Ok(slash_redirect(req));
            }
            let mut found = None;
            for name in &self.index {
                let candidate = file.join(name);
                if tokio::fs::metadata(&candidate).await.is_ok_and(|m| m.is_file()) {
                    found = Some(candidate);
                    break;
                }
            }
            file = found.ok_or_else(|| Error::NoIndex(shown.clone(), self.index.join(", ")))?;
        } else if !meta.is_file() {
            return Err(Error::NotFound(shown));
        }
        let real = self.inside(&file, &shown).await?;
        let content_type = content_type(&file);

        // A precompressed sibling the client accepts, if there is one.
        let mut chosen = (real.clone(), None);
        let mut varies = false;
        let accept = req.headers.get_all(header::ACCEPT_ENCODING);
        if self.precompressed {
            let mut offered = Vec::new();
            for (coding, suffix) in SIBLINGS {
                let mut name = real.clone().into_os_string();
                name.push(".");
                name.push(suffix);
                let sibling = PathBuf::from(name);
                if tokio::fs::metadata(&sibling).await.is_ok_and(|m| m.is_file()) {
                    offered.push((coding, sibling));
                }
            }
            varies = !offered.is_empty();
            let codings: Vec<Coding> = offered.iter().map(|(c, _)| *c).collect();
            if let Some(c) = nonstop_compress::negotiate(accept.iter().filter_map(|v| v.to_str().ok()), &codings) {
                let (_, sibling) = offered.into_iter().find(|(o, _)| *o == c).expect("negotiated from these");
                chosen = (self.inside(&sibling, &shown).await?, Some(c));
            }
        }
        let (path, coding) = chosen;
        let io = |e: std::io::Error| Error::Io { path: shown.clone(), source: e };
        let mut f = tokio::fs::File::open(&path).await.map_err(io)?;
        let meta = f.metadata().await.map_err(io)?;
        let modified = meta.modified().map_err(io)?;
        let v = Validators::new(meta.len(), modified, coding.map_or("", |c| c.token()));

        let h = |n: header::HeaderName| req.headers.get(n).and_then(|v| v.to_str().ok());
        let conditions = conditional::Conditions {
            if_match: h(header::IF_MATCH),
            if_none_match: h(header::IF_NONE_MATCH),
            if_modified_since: h(header::IF_MODIFIED_SINCE),
            if_unmodified_since: h(header::IF_UNMODIFIED_SINCE),
            if_range: h(header::IF_RANGE),
            range: h(header::RANGE),
        };
        let decision = conditional::decide(head, &conditions, &v);
        let mut resp = Response::new(FileBody::empty());
        let hs = resp.headers_mut();
        hs.insert(header::ETAG, value(&v.etag));
        hs.insert(header::LAST_MODIFIED, value(&v.last_modified()));
        if varies {
            hs.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        }
        let (status, start, len) = match decision {
            Decision::NotModified => {
                *resp.status_mut() = StatusCode::NOT_MODIFIED;
                return Ok(resp);
            }
            Decision::PreconditionFailed => {
                *resp.status_mut() = StatusCode::PRECONDITION_FAILED;
                resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                return Ok(resp);
            }
            Decision::RangeNotSatisfiable => {
                *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
                let hs = resp.headers_mut();
                hs.insert(header::CONTENT_RANGE, value(&format!("bytes */{}", v.len)));
                hs.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
                return Ok(resp);
            }
            Decision::Full => (StatusCode::OK, 0, v.len),
            Decision::Partial { start, end } => {
                let range = format!("bytes {start}-{end}/{}", v.len);
                resp.headers_mut().insert(header::CONTENT_RANGE, value(&range));
                (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
            }
        };
        *resp.status_mut() = status;
        let hs = resp.headers_mut();
        hs.insert(header::CONTENT_TYPE, value(&content_type));
        hs.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
        hs.insert(header::CONTENT_LENGTH, value(&len.to_string()));
        if let Some(c) = coding {
            hs.insert(header::CONTENT_ENCODING, HeaderValue::from_static(c.token()));
        }
        if !head && len > 0 {
            if start > 0 {
                f.seek(SeekFrom::Start(start)).await.map_err(io)?;
            }
            *resp.body_mut() = FileBody { file: Some(f), remaining: len, buf: BytesMut::new() };
        }
        Ok(resp)
    }

    /// The real path of `file`, which must be under the root.
    async fn inside(&self, file: &Path, shown: &str) -> Result<PathBuf, Error> {
        let real = match tokio::fs::canonicalize(file).await {
            Ok(p) => p,
            Err(e) if is_missing(&e) => return Err(Error::NotFound(shown.to_string())),
            Err(e) => return Err(Error::Io { path: shown.to_string(), source: e }),
        };
        if !real.starts_with(&self.root) {
            return Err(Error::Outside(shown.to_string()));
        }
        Ok(real)
    }
}

fn is_missing(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory)
}

/// A header value from text this crate made (ETags, dates, numbers, MIME types: all visible ASCII).
fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// `301` to the directory's path with its trailing slash, so that relative links in its index resolve.
fn slash_redirect(req: &Request<'_>) -> Response<FileBody> {
    let mut location = format!("{}/", req.public_path);
    if let Some(q) = req.query {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = Response::new(FileBody::empty());
    *resp.status_mut() = StatusCode::MOVED_PERMANENTLY;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    resp
}

/// The Content-Type of a file by its name; text gets `charset=utf-8`, the unknown `application/octet-stream`.
pub fn content_type(file: &Path) -> String {
    let Some(m) = mime_guess::from_path(file).first() else { return "application/octet-stream".to_string() };
    let essence = m.essence_str();
    let textual = m.type_() == mime_guess::mime::TEXT
        || matches!(essence, "application/javascript" | "application/json" | "image/svg+xml" | "application/xml");
    if textual {
        format!("{essence}; charset=utf-8")
    } else {
        essence.to_string()
    }
}

/// A file's bytes (or a range of them), read [`CHUNK_BYTES_MAX`] at a time as the client takes them.
pub struct FileBody {
    file: Option<tokio::fs::File>,
    remaining: u64,
    buf: BytesMut,
}

impl FileBody {
    /// No bytes (HEAD, 304, 412, 416, a redirect).
    pub fn empty() -> FileBody {
        FileBody { file: None, remaining: 0, buf: BytesMut::new() }
    }
}

impl http_body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let Some(file) = this.file.as_mut() else { return Poll::Ready(None) };
        let want = this.remaining.min(CHUNK_BYTES_MAX as u64) as usize;
        if this.buf.capacity() < want {
            this.buf.reserve(want);
        }
        let mut limited = bytes::BufMut::limit(&mut this.buf, want);
        match tokio_util::io::poll_read_buf(Pin::new(file), cx, &mut limited) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                this.file = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Ok(0)) => {
                // The file was cut short while being sent: end with an error rather than a short body.
                this.file = None;
                let e = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the file shrank while being sent");
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Ok(n)) => {
                this.remaining -= n as u64;
                if this.remaining == 0 {
                    this.file = None;
                }
                Poll::Ready(Some(Ok(Frame::data(this.buf.split().freeze()))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types() {
        assert_eq!(content_type(Path::new("a/index.html")), "text/html; charset=utf-8");
        assert_eq!(content_type(Path::new("app.js")), "text/javascript; charset=utf-8");
        assert_eq!(content_type(Path::new("logo.png")), "image/png");
        assert_eq!(content_type(Path::new("data.json")), "application/json; charset=utf-8");
        assert_eq!(content_type(Path::new("blob")), "application/octet-stream");
        assert_eq!(content_type(Path::new("font.woff2")), "font/woff2");
    }
}
