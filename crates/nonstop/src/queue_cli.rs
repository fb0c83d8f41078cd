//! `nonstop queue`: list queues, show a request, list dead letters and failed requests, replay and purge, through a
//! running proxy's admin API; tables for people, `--json` (the admin API's own documents) for scripts.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::admin_client;
use crate::deploy_cli::{duration, utc};

#[derive(Args)]
pub struct QueueArgs {
    #[command(flatten)]
    conn: admin_client::AdminConn,
    /// Print the admin API's JSON document instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    action: QueueAction,
}

#[derive(Subcommand)]
enum QueueAction {
    /// Every queue: depth, age of the oldest request, deliveries, retries, dead letters, commits.
    List,
    /// One request's whole record, by the id its client got (QUEUE.KEY, as in the 202's Location) or its number
    /// (QUEUE.N).
    Show { id: String },
    /// The dead letters of a queue.
    Dead {
        queue: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// The failed requests of a queue (the service answered a 4xx other than 408 and 429).
    Failed {
        queue: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Queue a dead letter or a failed request again, by its client's id (QUEUE.KEY) or its number (QUEUE.N).
    Replay { id: String },
    /// Delete every dead letter of a queue.
    Purge { queue: String },
}

/// A queue name as the config allows them (so it goes into the admin path as it is).
fn queue_name(q: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&q.len()) && q.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    ok.then(|| q.to_string()).ok_or_else(|| format!("{q:?} is not a queue name (1 to 64 of A-Za-z0-9_-)"))
}

/// A request id: QUEUE.N (its number, as `dead` lists them) or QUEUE.KEY (the id its client got in the 202).
fn split(id: &str) -> Result<(String, String), String> {
    let number = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) && n.parse::<u64>().is_ok();
    let key = |k: &str| k.len() == 32 && k.bytes().all(|b| b.is_ascii_hexdigit());
    match id.split_once('.') {
        Some((q, rest)) if queue_name(q).is_ok() && (number(rest) || key(rest)) => {
            Ok((q.to_string(), rest.to_string()))
        }
        _ => Err(format!(
            "{id:?} is not a request id: give QUEUE.N, the request's number (like orders.42, as `nonstop queue \
             dead` lists them), or QUEUE.KEY, the id its client got in the 202 (orders. and 32 hex digits)"
        )),
    }
}

pub fn run(args: QueueArgs) -> ExitCode {
    let call = match &args.action {
        QueueAction::List => Ok(("GET", "/queues".to_string())),
        QueueAction::Show { id } => split(id).map(|(q, n)| ("GET", format!("/queues/{q}/requests/{q}.{n}"))),
        QueueAction::Dead { queue, limit } => {
            queue_name(queue).map(|q| ("GET", format!("/queues/{q}/dead?limit={limit}")))
        }
        QueueAction::Failed { queue, limit } => {
            queue_name(queue).map(|q| ("GET", format!("/queues/{q}/failed?limit={limit}")))
        }
        QueueAction::Replay { id } => split(id).map(|(q, n)| ("POST", format!("/queues/{q}/dead/{q}.{n}/replay"))),
        QueueAction::Purge { queue } => queue_name(queue).map(|q| ("POST", format!("/queues/{q}/purge"))),
    };
    let (method, path) = match call {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nonstop queue: {e}");
            return ExitCode::from(2);
        }
    };
    let admin = match crate::deploy_cli::resolve("queue", &args.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (status, body) = match admin_client::call(admin.addr, admin.token.as_deref(), method, &path, None) {
        Ok(answer) => answer,
        Err(e) => {
            eprintln!("nonstop queue: cannot reach the admin API at {}: {e}", admin.addr);
            return ExitCode::from(1);
        }
    };
    let doc = serde_json::from_str::<Value>(&body);
    if !(200..300).contains(&status) {
        let why = doc.as_ref().ok().and_then(|v| v["error"].as_str().map(str::to_string)).unwrap_or(body);
        eprintln!("nonstop queue: the admin API answered {status}: {why}");
        return ExitCode::from(1);
    }
    let Ok(doc) = doc else {
        eprintln!("nonstop queue: the admin API answered {status} with something other than JSON: {body}");
        return ExitCode::from(1);
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&doc).expect("JSON"));
        return ExitCode::SUCCESS;
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let text = match &args.action {
        QueueAction::List => list(&doc),
        QueueAction::Show { .. } => record(&doc, now),
        QueueAction::Dead { limit, .. } => requests(&doc, "dead", "dead letters", *limit, now),
        QueueAction::Failed { limit, .. } => requests(&doc, "failed", "failed requests", *limit, now),
        QueueAction::Replay { .. } => {
            format!("{} (the client's id {}) is queued again\n", s(&doc["id"]), s(&doc["key"]))
        }
        QueueAction::Purge { .. } => format!("purged {} dead letters of queue {}\n", doc["purged"], s(&doc["queue"])),
    };
    print!("{text}");
    ExitCode::SUCCESS
}

/// A string field, or "-".
fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// A counter field, or "-".
fn count(v: &Value) -> String {
    v.as_u64().map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// `text` cut to `max` characters, with "..." when cut.
fn cut(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let kept: String = one_line.chars().take(max.saturating_sub(3)).collect();
    format!("{kept}...")
}

/// The table of `GET /queues`.
fn list(doc: &Value) -> String {
    let queues = doc["queues"].as_array().map(Vec::as_slice).unwrap_or_default();
    if queues.is_empty() {
        return "no queues: the config has no route with a queue\n".to_string();
    }
    let mut out = format!(
        "{:<16} {:<12} {:<9} {:>7} {:>9} {:>10} {:>6} {:>10} {:>10} {:>7} {:>8}  {}\n",
        "queue",
        "service",
        "store",
        "depth",
        "oldest",
        "delivering",
        "dead",
        "accepted",
        "done",
        "failed",
        "retries",
        "window"
    );
    for q in queues {
        let store = match (s(&q["store"]), q["broker_connected"].as_bool()) {
            ("rabbitmq", Some(false)) => "rabbitmq!".to_string(),
            (store, _) => store.to_string(),
        };
        let window = match &q["deliver_window"] {
            Value::Null => "-".to_string(),
            w if w["open"] == true => "open".to_string(),
            _ => "closed".to_string(),
        };
        out.push_str(&format!(
            "{:<16} {:<12} {:<9} {:>7} {:>9} {:>10} {:>6} {:>10} {:>10} {:>7} {:>8}  {}\n",
            s(&q["name"]),
            s(&q["service"]),
            store,
            count(&q["depth"]),
            q["oldest_age_ms"].as_u64().map_or_else(|| "-".to_string(), duration),
            count(&q["delivering"]),
            count(&q["dead_letters"]),
            count(&q["accepted_total"]),
            count(&q["done_total"]),
            count(&q["failed_total"]),
            count(&q["retries_total"]),
            window,
        ));
    }
    if queues.iter().any(|q| q["broker_connected"] == false) {
        out.push_str("rabbitmq!: the broker is not connected (requests are kept on this node until it is)\n");
    }
    out
}

/// The table of a queue's dead letters or failed requests.
fn requests(doc: &Value, field: &str, what: &str, limit: usize, now: u64) -> String {
    let items = doc[field].as_array().map(Vec::as_slice).unwrap_or_default();
    let queue = s(&doc["queue"]);
    if items.is_empty() {
        return format!("queue {queue}: no {what}\n");
    }
    let more = if items.len() >= limit { format!(" (the first {limit}: --limit N shows more)") } else { String::new() };
    let mut out = format!("queue {queue}: {} {what}{more}\n", items.len());
    out.push_str(&format!(
        "{:<16} {:<48} {:>8} {:>8}  {:<6} {}\n",
        "id", "client's id", "attempts", "age", "answer", "last error"
    ));
    for r in items {
        let age = r["created_ms"].as_u64().map_or_else(|| "-".to_string(), |c| duration(now.saturating_sub(c)));
        out.push_str(&format!(
            "{:<16} {:<48} {:>8} {:>8}  {:<6} {}\n",
            s(&r["id"]),
            s(&r["key"]),
            count(&r["attempts"]),
            age,
            count(&r["response"]["status"]),
            cut(s(&r["error"]), 80),
        ));
    }
    out.push_str("replay one with `nonstop queue replay ID`; `nonstop queue show ID` gives its whole record\n");
    out
}

/// One request's record, a field a line.
fn record(doc: &Value, now: u64) -> String {
    let at = |v: &Value| {
        v.as_u64()
            .map_or_else(|| "-".to_string(), |t| format!("{} UTC ({} ago)", utc(t), duration(now.saturating_sub(t))))
    };
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<13} {v}\n"));
    line("id", s(&doc["id"]).to_string());
    line("client's id", s(&doc["key"]).to_string());
    line("queue", s(&doc["queue"]).to_string());
    line("status", s(&doc["status"]).to_string());
    line("attempts", count(&doc["attempts"]));
    line("created", at(&doc["created_ms"]));
    line("updated", at(&doc["updated_ms"]));
    if let Some(next) = doc["next_attempt_ms"].as_u64() {
        let when = if next <= now { "now".to_string() } else { format!("in {}", duration(next - now)) };
        line("next attempt", format!("{} UTC ({when})", utc(next)));
    }
    if let Some(code) = doc["response"]["status"].as_u64() {
        line("answer", code.to_string());
    }
    if let Some(e) = doc["error"].as_str() {
        line("last error", e.to_string());
    }
    if let Some(body) = doc["response"]["body"].as_str().filter(|b| !b.is_empty()) {
        out.push_str("answer body:\n");
        for l in body.lines().take(40) {
            out.push_str(&format!("  {l}\n"));
        }
        if body.lines().count() > 40 {
            out.push_str("  ... (`--json` gives it whole)\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_queue_list_is_a_table_with_a_row_per_queue() {
        let doc = json!({ "queues": [
            { "name": "orders", "service": "app", "store": "embedded", "broker_connected": null, "depth": 12,
              "dead_letters": 1, "delivering": 3, "oldest_age_ms": 2500, "accepted_total": 40, "done_total": 27,
              "failed_total": 0, "retries_total": 5, "deliver_window": null },
            { "name": "mail", "service": "mailer", "store": "rabbitmq", "broker_connected": false, "depth": 0,
              "dead_letters": 0, "delivering": 0, "oldest_age_ms": null, "accepted_total": 0, "done_total": 0,
              "failed_total": 0, "retries_total": 0, "deliver_window": { "open": false } },
        ]});
        let text = list(&doc);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("queue ") && lines[0].contains("depth") && lines[0].ends_with("window"));
        let orders: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(orders, ["orders", "app", "embedded", "12", "2.5s", "3", "1", "40", "27", "0", "5", "-"]);
        let mail: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(mail[2], "rabbitmq!");
        assert_eq!(mail[4], "-");
        assert_eq!(mail[11], "closed");
        assert!(lines[3].contains("not connected"), "{text}");
        assert_eq!(list(&json!({ "queues": [] })), "no queues: the config has no route with a queue\n");
    }

    #[test]
    fn dead_letters_are_a_table_that_says_when_the_limit_cut_it() {
        let doc = json!({ "queue": "orders", "dead": [
            { "id": "orders.7", "key": "orders.0123456789abcdef0123456789abcdef", "attempts": 3,
              "created_ms": 1_000, "response": { "status": 500, "body": "x" }, "error": "server answered 500\nagain" },
        ]});
        let text = requests(&doc, "dead", "dead letters", 1, 61_000);
        assert!(text.starts_with("queue orders: 1 dead letters (the first 1: --limit N shows more)\n"), "{text}");
        let row: Vec<&str> = text.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(row[..5], ["orders.7", "orders.0123456789abcdef0123456789abcdef", "3", "1m00s", "500"]);
        assert_eq!(row[5..].join(" "), "server answered 500 again");
        assert_eq!(
            requests(&json!({ "queue": "q", "failed": [] }), "failed", "failed requests", 100, 0),
            "queue q: no failed requests\n"
        );
    }

    #[test]
    fn a_record_reads_a_field_a_line_with_readable_times() {
        let doc = json!({ "id": "orders.7", "key": "orders.ab", "queue": "orders", "status": "queued", "attempts": 2,
            "created_ms": 1_796_212_861_000u64, "updated_ms": 1_796_212_862_000u64,
            "next_attempt_ms": 1_796_212_870_000u64, "error": "connection refused" });
        let text = record(&doc, 1_796_212_865_000);
        assert!(text.contains("created       2026-12-02 12:01:01 UTC (4.0s ago)\n"), "{text}");
        assert!(text.contains("next attempt  2026-12-02 12:01:10 UTC (in 5.0s)\n"), "{text}");
        assert!(text.contains("last error    connection refused\n"), "{text}");
        assert!(!text.contains("answer"), "{text}");
        assert_eq!(cut("abcdef", 5), "ab...");
    }
}
