//! The JSON-lines access log: records are formatted on the request path and written by one background thread
//! through a buffer, so a slow disk never blocks a request.

use std::io::Write;
use std::path::Path;
use std::sync::mpsc;

/// A handle to the writer thread; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: mpsc::SyncSender<String>,
}

/// Lines buffered between the request path and the writer; past this, lines are dropped (and counted) rather than
/// blocking requests.
pub const QUEUE_LINES_MAX: usize = 65_536;

impl AccessLog {
    /// Opens the log: `None` is standard output.
    pub fn open(path: Option<&Path>) -> std::io::Result<AccessLog> {
        let mut out: Box<dyn Write + Send> = match path {
            None => Box::new(std::io::stdout()),
            Some(p) => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(p)?),
        };
        let (tx, rx) = mpsc::sync_channel::<String>(QUEUE_LINES_MAX);
        std::thread::Builder::new().name("access-log".into()).spawn(move || {
            let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut out);
            while let Ok(line) = rx.recv() {
                let _ = buf.write_all(line.as_bytes());
                // Drain what is already queued, then flush once.
                while let Ok(line) = rx.try_recv() {
                    let _ = buf.write_all(line.as_bytes());
                }
                let _ = buf.flush();
            }
        })?;
        Ok(AccessLog { tx })
    }

    /// Queues one record (a JSON object, written as one line).
    pub fn write(&self, record: &serde_json::Value) {
        let mut line = record.to_string();
        line.push('\n');
        let _ = self.tx.try_send(line);
    }
}
