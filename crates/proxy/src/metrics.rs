//! Counters and latency histograms kept per server (lock-free atomics on the hot path), rendered as Prometheus
//! text by the admin API.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency histogram buckets, seconds.
pub const BUCKETS_S: [f64; 14] = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

const STATUS_MIN: usize = 100;
const STATUS_SLOTS: usize = 500;

/// A label value as the Prometheus text format writes it: `\` as `\\`, `"` as `\"` and a newline as `\n`, so
/// that a name from the config or a request (a service, server, queue, version) cannot end its label or its line.
pub struct Escaped<T>(pub T);

impl<T: std::fmt::Display> std::fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        struct Escaping<'a, 'b>(&'a mut std::fmt::Formatter<'b>);
        impl Write for Escaping<'_, '_> {
            fn write_str(&mut self, s: &str) -> std::fmt::Result {
                let mut plain = 0;
                for (i, b) in s.bytes().enumerate() {
                    let escaped = match b {
                        b'\\' => "\\\\",
                        b'"' => "\\\"",
                        b'\n' => "\\n",
                        _ => continue,
                    };
                    self.0.write_str(&s[plain..i])?;
                    self.0.write_str(escaped)?;
                    plain = i + 1;
                }
                self.0.write_str(&s[plain..])
            }
        }
        write!(Escaping(f), "{}", self.0)
    }
}

/// Requests by status, and a latency histogram.
pub struct Stats {
    by_status: Box<[AtomicU64]>,
    buckets: [AtomicU64; BUCKETS_S.len() + 1],
    latency_sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Default for Stats {
    fn default() -> Stats {
        Stats {
            by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            buckets: Default::default(),
            latency_sum_ns: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Stats {
    pub fn record(&self, status: u16, latency: Duration) {
        if let Some(slot) = (status as usize).checked_sub(STATUS_MIN).and_then(|i| self.by_status.get(i)) {
            slot.fetch_add(1, Relaxed);
        }
        let s = latency.as_secs_f64();
        let bucket = BUCKETS_S.iter().position(|&b| s <= b).unwrap_or(BUCKETS_S.len());
        self.buckets[bucket].fetch_add(1, Relaxed);
        self.latency_sum_ns.fetch_add(latency.as_nanos() as u64, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    /// The counters as a deploy-analysis sample: failures are 5xx.
    pub fn sample(&self) -> nonstop_deploy::analysis::Sample {
        let failed = self.by_status.iter().skip(500 - STATUS_MIN).map(|n| n.load(Relaxed)).sum();
        let mut buckets: Vec<(f64, u64)> =
            BUCKETS_S.iter().zip(&self.buckets).map(|(&b, n)| (b, n.load(Relaxed))).collect();
        buckets.push((f64::INFINITY, self.buckets[BUCKETS_S.len()].load(Relaxed)));
        nonstop_deploy::analysis::Sample { requests: self.count.load(Relaxed), failed, buckets }
    }

    pub fn total(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// (status, count) for every status seen.
    pub fn statuses(&self) -> Vec<(u16, u64)> {
        self.by_status
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let n = n.load(Relaxed);
                (n > 0).then_some(((i + STATUS_MIN) as u16, n))
            })
            .collect()
    }

    /// Appends `nonstop_requests_total` samples.
    pub fn render_requests(&self, out: &mut String, labels: &str) {
        for (status, n) in self.statuses() {
            let _ = writeln!(out, "nonstop_requests_total{{{labels},status=\"{status}\"}} {n}");
        }
    }

    /// Appends `nonstop_request_duration_seconds` histogram samples.
    pub fn render_latency(&self, out: &mut String, labels: &str) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS_S.iter().enumerate() {
            cumulative += self.buckets[i].load(Relaxed);
            let _ = writeln!(out, "nonstop_request_duration_seconds_bucket{{{labels},le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS_S.len()].load(Relaxed);
        let _ = writeln!(out, "nonstop_request_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {cumulative}");
        let sum = self.latency_sum_ns.load(Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "nonstop_request_duration_seconds_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "nonstop_request_duration_seconds_count{{{labels}}} {}", self.count.load(Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(Escaped("plain-name_1").to_string(), "plain-name_1");
        assert_eq!(Escaped(r#"a"b"#).to_string(), r#"a\"b"#);
        assert_eq!(Escaped(r"a\b").to_string(), r"a\\b");
        assert_eq!(Escaped("a\nb").to_string(), r"a\nb");
        assert_eq!(Escaped("\"}\n x{a=\"\\").to_string(), r#"\"}\n x{a=\"\\"#);
        assert_eq!(Escaped("ünï\"").to_string(), "ünï\\\"");
        assert_eq!(Escaped("").to_string(), "");
        let addr: std::net::SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(Escaped(addr).to_string(), "[::1]:80");
        assert_eq!(format!("x{{a=\"{}\"}}", Escaped("q\"")), r#"x{a="q\""}"#);
    }

    #[test]
    fn records_status_and_cumulative_buckets() {
        let s = Stats::default();
        s.record(200, Duration::from_micros(300));
        s.record(200, Duration::from_millis(20));
        s.record(503, Duration::from_secs(30));
        assert_eq!(s.statuses(), [(200, 2), (503, 1)]);
        let mut out = String::new();
        s.render_requests(&mut out, "service=\"a\"");
        s.render_latency(&mut out, "service=\"a\"");
        assert!(out.contains("nonstop_requests_total{service=\"a\",status=\"200\"} 2"), "{out}");
        assert!(out.contains("bucket{service=\"a\",le=\"0.0005\"} 1"), "{out}");
        assert!(out.contains("bucket{service=\"a\",le=\"0.025\"} 2"), "{out}");
        assert!(out.contains("bucket{service=\"a\",le=\"+Inf\"} 3"), "{out}");
    }
}
