//! The access log: each request's line is formatted without allocating into a buffer of the thread that served it;
//! full buffers (64 KiB) go to one writer thread, which also collects the partial ones every `flush_ms` and at
//! [`AccessLog::flush`], and writes them in large writes. So the request path makes no system call for the log, a
//! slow disk never blocks a request (full buffers past [`CHUNKS_QUEUED_MAX`] are dropped and counted), nothing
//! answered before a clean shutdown is lost, and a crash loses at most the last `flush_ms`. [`AccessLog::reopen`]
//! reopens the file (logrotate's SIGUSR1). Formats: JSON lines, or nginx's `combined`.

use std::cell::RefCell;
use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// nginx's `combined`: `$remote_addr - - [$time_local] "$request" $status - "$http_referer" "$http_user_agent"`
    /// (the body size is not known when the line is written: `-`).
    Combined,
}

#[derive(Debug, Clone)]
pub struct Settings {
    /// `None` is standard output.
    pub path: Option<PathBuf>,
    pub format: Format,
    /// Partial buffers are written at least this often.
    pub flush_ms: u64,
    /// Share of answers below 400 that are logged (errors always are).
    pub success_sample_percent: u32,
}

/// One request, as the proxy saw it.
pub struct Entry<'a> {
    pub at: SystemTime,
    pub listener: &'a str,
    pub client: SocketAddr,
    pub method: &'a str,
    pub host: Option<&'a str>,
    pub path: Option<&'a str>,
    /// Path and query, for `combined`.
    pub target: Option<&'a str>,
    /// "HTTP/1.1" and the like, for `combined`.
    pub version: &'a str,
    pub status: u16,
    pub service: Option<&'a str>,
    pub server: Option<SocketAddr>,
    pub duration: Duration,
    pub attempts: u32,
    pub queue_wait: Duration,
    pub shed: bool,
    pub error: Option<&'a dyn fmt::Display>,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    /// The request's id, when its listener gives requests ids (JSON lines only).
    pub request_id: Option<&'a str>,
}

/// Bytes a thread's buffer holds before it goes to the writer.
pub const BUFFER_BYTES_MAX: usize = 64 * 1024;
/// Full buffers waiting for the writer, at most; past this they are dropped (and counted) rather than blocking.
pub const CHUNKS_QUEUED_MAX: usize = 256;
/// How long [`AccessLog::flush`] waits for the writer.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

enum Msg {
    Chunk(Vec<u8>),
    Reopen(mpsc::SyncSender<()>),
    Flush(mpsc::SyncSender<()>),
}

type Buffer = Arc<Mutex<Vec<u8>>>;

struct Shared {
    id: u64,
    format: Format,
    sample_percent: u32,
    buffers: Arc<Mutex<Vec<Buffer>>>,
    tx: mpsc::SyncSender<Msg>,
    sampled: AtomicU64,
    dropped_lines: Arc<AtomicU64>,
}

/// A handle to the log; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's buffer for each open log, by the log's id.
    static MINE: RefCell<Vec<(u64, Buffer)>> = const { RefCell::new(Vec::new()) };
}

fn open_out(path: Option<&Path>) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match path {
        None => Box::new(std::io::stdout()),
        Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
    })
}

impl AccessLog {
    /// Opens the log and starts its writer thread.
    pub fn open(s: &Settings) -> std::io::Result<AccessLog> {
        let mut out = open_out(s.path.as_deref())?;
        let (tx, rx) = mpsc::sync_channel::<Msg>(CHUNKS_QUEUED_MAX);
        let buffers: Arc<Mutex<Vec<Buffer>>> = Arc::default();
        let dropped_lines = Arc::new(AtomicU64::new(0));
        let every = Duration::from_millis(s.flush_ms.max(1));
        let path = s.path.clone();
        let all = buffers.clone();
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let collect = |out: &mut Box<dyn Write + Send>| {
                let bufs: Vec<Buffer> = all.lock().expect("buffers lock").clone();
                for b in bufs {
                    let taken = {
                        let mut b = b.lock().expect("buffer lock");
                        if b.is_empty() {
                            continue;
                        }
                        std::mem::take(&mut *b)
                    };
                    let _ = out.write_all(&taken);
                }
                let _ = out.flush();
            };
            loop {
                match rx.recv_timeout(every) {
                    Ok(Msg::Chunk(v)) => {
                        let _ = out.write_all(&v);
                    }
                    Ok(Msg::Reopen(ack)) => {
                        collect(&mut out);
                        if let Some(p) = &path {
                            match open_out(Some(p)) {
                                Ok(o) => out = o,
                                Err(e) => eprintln!("access log: cannot reopen {}: {e}", p.display()),
                            }
                        }
                        let _ = ack.send(());
                    }
                    Ok(Msg::Flush(ack)) => {
                        collect(&mut out);
                        let _ = ack.send(());
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => collect(&mut out),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        collect(&mut out);
                        return;
                    }
                }
            }
        })?;
        Ok(AccessLog {
            shared: Arc::new(Shared {
                id: NEXT_ID.fetch_add(1, Relaxed),
                format: s.format,
                sample_percent: s.success_sample_percent.min(100),
                buffers,
                tx,
                sampled: AtomicU64::new(0),
                dropped_lines,
            }),
        })
    }

    /// Whether lines carry the client's Referer and User-Agent (so the caller copies them).
    pub fn wants_client_headers(&self) -> bool {
        self.shared.format == Format::Combined
    }

    /// Lines dropped because the writer fell behind.
    pub fn dropped_lines(&self) -> u64 {
        self.shared.dropped_lines.load(Relaxed)
    }

    /// Logs one request (unless it is a success that sampling leaves out).
    pub fn write(&self, e: &Entry<'_>) {
        let sh = &self.shared;
        if e.status < 400 && sh.sample_percent < 100 {
            let n = sh.sampled.fetch_add(1, Relaxed);
            if n % 100 >= u64::from(sh.sample_percent) {
                return;
            }
        }
        let buffer = MINE.with(|m| {
            let mut m = m.borrow_mut();
            if let Some((_, b)) = m.iter().find(|(id, _)| *id == sh.id) {
                return b.clone();
            }
            let b: Buffer = Arc::new(Mutex::new(Vec::with_capacity(BUFFER_BYTES_MAX)));
            sh.buffers.lock().expect("buffers lock").push(b.clone());
            m.push((sh.id, b.clone()));
            b
        });
        let full = {
            let mut b = buffer.lock().expect("buffer lock");
            match sh.format {
                Format::Json => json_line(&mut b, e),
                Format::Combined => combined_line(&mut b, e),
            }
            (b.len() >= BUFFER_BYTES_MAX).then(|| std::mem::replace(&mut *b, Vec::with_capacity(BUFFER_BYTES_MAX)))
        };
        if let Some(chunk) = full {
            if let Err(mpsc::TrySendError::Full(Msg::Chunk(c)) | mpsc::TrySendError::Disconnected(Msg::Chunk(c))) =
                sh.tx.try_send(Msg::Chunk(chunk))
            {
                let lines = c.iter().filter(|&&b| b == b'\n').count() as u64;
                sh.dropped_lines.fetch_add(lines, Relaxed);
            }
        }
    }

    /// Writes everything logged so far and waits for it (at most 5 s): at shutdown, nothing answered is lost.
    pub fn flush(&self) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.shared.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv_timeout(FLUSH_WAIT);
        }
    }

    /// Reopens the file (after logrotate moved it), writing what is buffered to the old one first; returns once
    /// done (at most 5 s), so that what is logged after it goes to the new file.
    pub fn reopen(&self) {
        let (ack, done) = mpsc::sync_channel(1);
        if self.shared.tx.send(Msg::Reopen(ack)).is_ok() {
            let _ = done.recv_timeout(FLUSH_WAIT);
        }
    }
}

/// Writes a JSON string's contents, escaped, into the buffer.
struct JsonStr<'a>(&'a mut Vec<u8>);

impl fmt::Write for JsonStr<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            match b {
                b'"' => self.0.extend_from_slice(b"\\\""),
                b'\\' => self.0.extend_from_slice(b"\\\\"),
                b'\n' => self.0.extend_from_slice(b"\\n"),
                b'\r' => self.0.extend_from_slice(b"\\r"),
                b'\t' => self.0.extend_from_slice(b"\\t"),
                0..=0x1f | 0x7f => {
                    let _ = write!(self.0, "\\u{:04x}", b);
                }
                _ => self.0.push(b),
            }
        }
        Ok(())
    }
}

fn json_str(b: &mut Vec<u8>, v: Option<&dyn fmt::Display>) {
    match v {
        None => b.extend_from_slice(b"null"),
        Some(v) => {
            b.push(b'"');
            let _ = fmt::write(&mut JsonStr(b), format_args!("{v}"));
            b.push(b'"');
        }
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn json_line(b: &mut Vec<u8>, e: &Entry<'_>) {
    let ts_ms = e.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let _ = write!(b, "{{\"ts_ms\":{ts_ms},\"listener\":");
    json_str(b, Some(&e.listener));
    b.extend_from_slice(b",\"client\":");
    json_str(b, Some(&e.client));
    b.extend_from_slice(b",\"method\":");
    json_str(b, Some(&e.method));
    b.extend_from_slice(b",\"host\":");
    json_str(b, e.host.as_ref().map(|h| h as &dyn fmt::Display));
    b.extend_from_slice(b",\"path\":");
    json_str(b, e.path.as_ref().map(|p| p as &dyn fmt::Display));
    let _ = write!(b, ",\"status\":{},\"service\":", e.status);
    json_str(b, e.service.as_ref().map(|s| s as &dyn fmt::Display));
    b.extend_from_slice(b",\"server\":");
    json_str(b, e.server.as_ref().map(|s| s as &dyn fmt::Display));
    let _ = write!(
        b,
        ",\"duration_ms\":{:.3},\"attempts\":{},\"queue_wait_ms\":{:.3},\"shed\":{},\"error\":",
        millis(e.duration),
        e.attempts,
        millis(e.queue_wait),
        e.shed
    );
    json_str(b, e.error);
    if let Some(id) = e.request_id {
        b.extend_from_slice(b",\"request_id\":");
        json_str(b, Some(&id));
    }
    b.extend_from_slice(b"}\n");
}

/// Writes a value of a `combined` line as nginx does: `"` and `\`, controls and non-ASCII bytes as `\xHH`.
struct Escaped<'a>(&'a mut Vec<u8>);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if b == b'"' || b == b'\\' || !(0x20..0x7f).contains(&b) {
                let _ = write!(self.0, "\\x{b:02X}");
            } else {
                self.0.push(b);
            }
        }
        Ok(())
    }
}

fn quoted_or_dash(b: &mut Vec<u8>, v: Option<&str>) {
    match v {
        None | Some("") => b.extend_from_slice(b"\"-\""),
        Some(v) => {
            b.push(b'"');
            let _ = fmt::Write::write_str(&mut Escaped(b), v);
            b.push(b'"');
        }
    }
}

const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/// (year, month 1-12, day) of a day counted from 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn combined_line(b: &mut Vec<u8>, e: &Entry<'_>) {
    let secs = e.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (y, m, d) = civil(secs.div_euclid(86_400));
    let t = secs.rem_euclid(86_400);
    let _ = write!(
        b,
        "{} - - [{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000] \"",
        e.client.ip(),
        MONTHS[(m - 1) as usize],
        t / 3600,
        t / 60 % 60,
        t % 60
    );
    let _ = fmt::Write::write_str(&mut Escaped(b), e.method);
    b.push(b' ');
    let _ = fmt::Write::write_str(&mut Escaped(b), e.target.or(e.path).unwrap_or("-"));
    b.push(b' ');
    let _ = fmt::Write::write_str(&mut Escaped(b), e.version);
    let _ = write!(b, "\" {} - ", e.status);
    quoted_or_dash(b, e.referer);
    b.push(b' ');
    quoted_or_dash(b, e.user_agent);
    b.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry<'a>(err: Option<&'a dyn fmt::Display>) -> Entry<'a> {
        Entry {
            at: UNIX_EPOCH + Duration::from_millis(1_796_233_868_123),
            listener: "127.0.0.1:8080",
            client: "10.1.2.3:5555".parse().unwrap(),
            method: "GET",
            host: Some("shop.example"),
            path: Some("/a\"b"),
            target: Some("/a\"b?q=1"),
            version: "HTTP/1.1",
            status: 200,
            service: Some("app"),
            server: Some("127.0.0.1:9101".parse().unwrap()),
            duration: Duration::from_micros(1500),
            attempts: 1,
            queue_wait: Duration::ZERO,
            shed: false,
            error: err,
            referer: None,
            user_agent: Some("curl/8"),
            request_id: None,
        }
    }

    #[test]
    fn json_lines_escape_strings_and_use_null_for_absent_values() {
        let mut b = Vec::new();
        let err = "bad\nthing";
        json_line(&mut b, &entry(Some(&err)));
        let line = String::from_utf8(b).unwrap();
        assert_eq!(
            line,
            "{\"ts_ms\":1796233868123,\"listener\":\"127.0.0.1:8080\",\"client\":\"10.1.2.3:5555\",\"method\":\"GET\",\
             \"host\":\"shop.example\",\"path\":\"/a\\\"b\",\"status\":200,\"service\":\"app\",\"server\":\"127.0.0.1:9101\",\
             \"duration_ms\":1.500,\"attempts\":1,\"queue_wait_ms\":0.000,\"shed\":false,\"error\":\"bad\\nthing\"}\n"
        );
    }

    #[test]
    fn combined_lines_read_like_nginx() {
        let mut b = Vec::new();
        combined_line(&mut b, &entry(None));
        assert_eq!(
            String::from_utf8(b).unwrap(),
            "10.1.2.3 - - [02/Dec/2026:17:51:08 +0000] \"GET /a\\x22b?q=1 HTTP/1.1\" 200 - \"-\" \"curl/8\"\n"
        );
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
    }

    #[test]
    fn lines_reach_the_file_on_flush_and_sampling_keeps_every_error() {
        let dir = std::env::temp_dir().join(format!("nonstop-accesslog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let _ = std::fs::remove_file(&path);
        let s =
            Settings { path: Some(path.clone()), format: Format::Json, flush_ms: 60_000, success_sample_percent: 10 };
        let log = AccessLog::open(&s).unwrap();
        for i in 0..1000 {
            let mut e = entry(None);
            e.status = if i % 10 == 0 { 503 } else { 200 };
            log.write(&e);
        }
        log.flush();
        let text = std::fs::read_to_string(&path).unwrap();
        let errors = text.lines().filter(|l| l.contains("\"status\":503")).count();
        let ok = text.lines().filter(|l| l.contains("\"status\":200")).count();
        assert_eq!(errors, 100, "every error is logged");
        assert_eq!(ok, 90, "a tenth of the 900 successes");
        // Reopen: the old file was moved away; new lines go to a new file at the path.
        std::fs::rename(&path, dir.join("access.log.1")).unwrap();
        log.reopen();
        let mut e = entry(None);
        e.status = 500;
        log.write(&e);
        log.flush();
        let rotated = std::fs::read_to_string(dir.join("access.log.1")).unwrap();
        assert_eq!(rotated.lines().count(), 190, "the lines before the reopen stay in the moved file");
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
