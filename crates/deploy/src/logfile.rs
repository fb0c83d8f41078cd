//! Instance logs on this machine: rotation by size with a bound on the count, and the tail shown in warnings and
//! deploy failures.
//!
//! An instance appends to `SERVICE-ID.log` through a descriptor it holds (`O_APPEND`), so the file cannot simply be
//! renamed under a running instance: it would go on writing to the renamed file. Hence two ways:
//! - [`rotate`] when no process holds the file (before an instance starts or restarts): rename `.log` to `.log.1`,
//!   after shifting `.1` to `.2` and so on, the oldest beyond `files_max` removed;
//! - [`copy_truncate`] while it runs (the supervisor checks the size periodically): the same shift, then the file is
//!   copied to `.log.1` and truncated to 0. Because the instance appends, its next write lands at the new end (the
//!   start), not at its old offset, so the file holds no hole. A line written between the copy and the truncation
//!   is lost; that is the price of not interrupting the instance (logrotate's `copytruncate` pays the same).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Bytes and lines of an instance log shown in a warning or a deploy failure.
pub const TAIL_BYTES: u64 = 2048;
pub const TAIL_LINES: usize = 10;

fn numbered(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Shifts `.1`..`.files_max-1` up by one and removes what falls past `files_max`, making room for a new `.1`.
fn shift(path: &Path, files_max: u32) -> io::Result<()> {
    // Whatever lies past the bound (left by a larger files_max before) goes too.
    let mut n = files_max.max(1);
    while numbered(path, n).exists() {
        remove(&numbered(path, n))?;
        n += 1;
    }
    for n in (1..files_max).rev() {
        let from = numbered(path, n);
        if from.exists() {
            fs::rename(&from, numbered(path, n + 1))?;
        }
    }
    Ok(())
}

fn remove(p: &Path) -> io::Result<()> {
    match fs::remove_file(p) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn size(path: &Path) -> u64 {
    fs::metadata(path).map_or(0, |m| m.len())
}

/// Rotates `path` by renaming when it is larger than `bytes_max` and no process writes to it. True when rotated.
pub fn rotate(path: &Path, bytes_max: u64, files_max: u32) -> io::Result<bool> {
    if size(path) <= bytes_max {
        return Ok(false);
    }
    shift(path, files_max)?;
    if files_max == 0 {
        remove(path)?;
    } else {
        fs::rename(path, numbered(path, 1))?;
    }
    Ok(true)
}

/// Rotates `path` while a process appends to it: copied to `.1`, then truncated. True when rotated.
pub fn copy_truncate(path: &Path, bytes_max: u64, files_max: u32) -> io::Result<bool> {
    if size(path) <= bytes_max {
        return Ok(false);
    }
    shift(path, files_max)?;
    if files_max > 0 {
        fs::copy(path, numbered(path, 1))?;
    }
    fs::OpenOptions::new().write(true).open(path)?.set_len(0)?;
    Ok(true)
}

/// The last [`TAIL_LINES`] lines of `bytes` (a log's last [`TAIL_BYTES`]), each prefixed for a message; a first
/// line cut by the byte bound is dropped. Empty when the log is.
pub fn tail_lines(bytes: &[u8], cut: bool) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut lines: Vec<&str> = text.lines().collect();
    if cut && lines.len() > 1 {
        lines.remove(0);
    }
    let from = lines.len().saturating_sub(TAIL_LINES);
    lines[from..].iter().map(|l| format!("  | {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nonstop-logfile-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn rotation_keeps_at_most_files_max_and_leaves_small_logs_alone() {
        let d = dir("rotate");
        let log = d.join("app-1.log");
        fs::write(&log, "small").unwrap();
        assert!(!rotate(&log, 100, 2).unwrap());
        for round in 0..4 {
            fs::write(&log, format!("round {round} ").repeat(20)).unwrap();
            assert!(rotate(&log, 100, 2).unwrap());
            assert!(!log.exists());
        }
        let one = fs::read_to_string(numbered(&log, 1)).unwrap();
        let two = fs::read_to_string(numbered(&log, 2)).unwrap();
        assert!(one.starts_with("round 3"), "{one}");
        assert!(two.starts_with("round 2"), "{two}");
        assert!(!numbered(&log, 3).exists());
        // A smaller bound later removes what lies past it.
        fs::write(&log, "x".repeat(200)).unwrap();
        assert!(rotate(&log, 100, 1).unwrap());
        assert!(numbered(&log, 1).exists() && !numbered(&log, 2).exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn copy_truncate_lets_an_appending_writer_go_on_at_the_start() {
        use std::io::Write;
        let d = dir("copytrunc");
        let log = d.join("app-1.log");
        let mut w = fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        w.write_all(&[b'a'; 300]).unwrap();
        assert!(copy_truncate(&log, 100, 3).unwrap());
        w.write_all(b"after").unwrap();
        assert_eq!(fs::read(&log).unwrap(), b"after", "the appending writer continues at offset 0, no hole");
        assert_eq!(fs::read(numbered(&log, 1)).unwrap().len(), 300);
        assert!(copy_truncate(&log, 100, 0).is_ok_and(|r| !r));
        w.write_all(&[b'b'; 200]).unwrap();
        assert!(copy_truncate(&log, 100, 0).unwrap());
        assert_eq!(size(&log), 0);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_tail_is_bounded_in_lines_and_drops_a_cut_first_line() {
        let text: String = (1..=30).map(|n| format!("line {n}\n")).collect();
        let t = tail_lines(text.as_bytes(), false);
        assert_eq!(t.lines().count(), TAIL_LINES);
        assert!(t.starts_with("  | line 21\n") && t.ends_with("  | line 30\n"), "{t}");
        assert_eq!(tail_lines(b"ne 4\nline 5\n", true), "  | line 5\n");
        assert_eq!(tail_lines(b"", false), "");
    }
}
