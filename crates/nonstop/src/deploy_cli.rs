//! `nonstop deploy`, `rollback` and `status`: clients of a running proxy's admin API. The proxy performs the
//! deploy; these print its progress as it happens.

use std::process::ExitCode;

use clap::Args;
use serde_json::{json, Value};

use crate::admin_client;

#[derive(Args, Clone)]
pub struct AdminArgs {
    #[command(flatten)]
    pub conn: admin_client::AdminConn,
    /// The app service (needed only when several services have an app section).
    #[arg(long)]
    pub service: Option<String>,
}

#[derive(Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The version to deploy (replaces {version} in the app's command).
    #[arg(long, required_unless_present = "follow")]
    pub version: Option<String>,
    /// Follow the deploy or rollback that is running (started by another `nonstop deploy`, one whose terminal
    /// was closed, or `nonstop rollback`): its progress so far, then the rest, with the same exit status.
    #[arg(long, conflicts_with_all = ["version", "strategy", "steps", "env"])]
    pub follow: bool,
    /// rolling, blue-green or canary (default: the app section's strategy).
    #[arg(long)]
    pub strategy: Option<String>,
    /// Canary steps, percent, such as 10,50,100.
    #[arg(long, value_delimiter = ',')]
    pub steps: Vec<u32>,
    /// An environment variable for the new version's instances, KEY=VALUE (repeatable).
    #[arg(long = "env")]
    pub env: Vec<String>,
    /// Print the progress as JSON lines.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Print the admin API's JSON.
    #[arg(long)]
    pub json: bool,
}

/// The admin API of an admin command, or exit status 2 with the reason.
pub fn resolve(what: &str, conn: &admin_client::AdminConn) -> Result<admin_client::Admin, ExitCode> {
    conn.resolve().map_err(|e| {
        eprintln!("nonstop {what}: {e}");
        ExitCode::from(2)
    })
}

/// Starts a deploy and follows it. Exit status: 0 when it succeeded, 1 when it was rolled back or could not
/// start, 2 for bad arguments.
pub fn deploy(a: DeployArgs) -> ExitCode {
    if a.follow {
        let mut path = "/deploy".to_string();
        if let Some(s) = &a.admin.service {
            path.push_str(&format!("?service={s}"));
        }
        return follow("deploy", "GET", &path, &a.admin, None, a.json);
    }
    let mut env = serde_json::Map::new();
    for kv in &a.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                env.insert(k.to_string(), Value::String(v.to_string()));
            }
            _ => {
                eprintln!("nonstop deploy: --env {kv:?}: expected KEY=VALUE");
                return ExitCode::from(2);
            }
        }
    }
    let body = json!({
        "service": a.admin.service,
        "version": a.version,
        "strategy": a.strategy,
        "steps": (!a.steps.is_empty()).then_some(&a.steps),
        "env": env,
    });
    follow("deploy", "POST", "/deploy", &a.admin, Some(&body), a.json)
}

pub fn rollback(a: AdminArgs, to: Option<String>, json_lines: bool) -> ExitCode {
    let body = json!({ "service": a.service, "to": to });
    follow("rollback", "POST", "/rollback", &a, Some(&body), json_lines)
}

/// Starts (POST) or re-attaches to (GET) a deploy or rollback, and prints its progress to its end.
fn follow(what: &str, method: &str, path: &str, a: &AdminArgs, body: Option<&Value>, json_lines: bool) -> ExitCode {
    let admin = match resolve(what, &a.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let mut result: Option<String> = None;
    let mut told = json_lines;
    let body = body.map(Value::to_string);
    let outcome = admin_client::stream(admin.addr, admin.token.as_deref(), method, path, body.as_deref(), |line| {
        if !told {
            // Said once the proxy took it: the deploy is the proxy's, not this command's.
            told = true;
            eprintln!(
                "(the proxy runs the {what}: Ctrl-C only stops following it; `nonstop deploy --follow` follows \
                     it again, `nonstop rollback` aborts it)"
            );
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            println!("{line}");
            return;
        };
        if json_lines {
            println!("{line}");
        } else {
            let at = v["at_ms"].as_u64().unwrap_or(0) as f64 / 1000.0;
            println!("[{at:7.2}s] {:<12} {}", v["step"].as_str().unwrap_or(""), v["message"].as_str().unwrap_or(""));
        }
        if v["done"] == json!(true) {
            result = v["result"].as_str().map(String::from);
        }
    });
    match outcome {
        Err(e) => {
            eprintln!("nonstop {what}: cannot reach the admin API at {}: {e}", admin.addr);
            ExitCode::from(1)
        }
        Ok(Err((status, text))) => {
            let msg = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v["error"].as_str().map(String::from))
                .unwrap_or(text);
            eprintln!("nonstop {what}: refused ({status}): {msg}");
            ExitCode::from(if status == 400 { 2 } else { 1 })
        }
        Ok(Ok(())) => match result.as_deref() {
            Some("succeeded") => ExitCode::SUCCESS,
            Some(r) => {
                eprintln!("nonstop {what}: {r}");
                ExitCode::from(1)
            }
            None => {
                eprintln!("nonstop {what}: the stream ended before the deploy did; see nonstop status");
                ExitCode::from(1)
            }
        },
    }
}

#[derive(Args)]
pub struct LogsArgs {
    /// The app service (or --service; needed only when several services have an app section).
    #[arg(value_name = "SERVICE")]
    pub name: Option<String>,
    #[command(flatten)]
    pub admin: AdminArgs,
    /// One instance (its id in nonstop status); default: every current instance of the service.
    #[arg(long)]
    pub instance: Option<u64>,
    /// The last this many bytes of each instance's log.
    #[arg(long, default_value_t = 65536)]
    pub bytes: u64,
}

/// Prints the output logs of a service's instances (fetched over SSH for instances on hosts).
pub fn logs(a: LogsArgs) -> ExitCode {
    let mut path = format!("/logs?bytes_max={}", a.bytes);
    if let Some(s) = a.name.as_ref().or(a.admin.service.as_ref()) {
        path.push_str(&format!("&service={s}"));
    }
    if let Some(i) = a.instance {
        path.push_str(&format!("&instance={i}"));
    }
    let admin = match resolve("logs", &a.admin.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (code, text) = match admin_client::call(admin.addr, admin.token.as_deref(), "GET", &path, None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nonstop logs: cannot reach the admin API at {}: {e}", admin.addr);
            return ExitCode::from(1);
        }
    };
    let v = serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
    if code != 200 {
        eprintln!("nonstop logs: {}", v["error"].as_str().unwrap_or(&text));
        return ExitCode::from(1);
    }
    print!("{}", v["text"].as_str().unwrap_or_default());
    ExitCode::SUCCESS
}

pub fn status(a: StatusArgs) -> ExitCode {
    let path = match &a.admin.service {
        Some(s) => format!("/status?service={s}"),
        None => "/status".to_string(),
    };
    let admin = match resolve("status", &a.admin.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let (code, text) = match admin_client::call(admin.addr, admin.token.as_deref(), "GET", &path, None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nonstop status: cannot reach the admin API at {}: {e}", admin.addr);
            return ExitCode::from(1);
        }
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        eprintln!("nonstop status: the admin API answered {code}: {text}");
        return ExitCode::from(1);
    };
    if code != 200 {
        eprintln!("nonstop status: the admin API answered {code}: {}", v["error"].as_str().unwrap_or(&text));
        return ExitCode::from(1);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or(text));
        return ExitCode::SUCCESS;
    }
    let services = v["services"].as_array().cloned().unwrap_or_default();
    if services.is_empty() {
        println!("no service has an app section");
    }
    for s in services {
        println!("service {}  version {}", s["service"].as_str().unwrap_or("?"), s["version"].as_str().unwrap_or("?"));
        println!(
            "  {:>4}  {:<10} {:<21} {:<9} {:<8} {:>9} {:<24} {:>8} {:>8}  {:<8} {:<10} {:<12} last exit",
            "id",
            "version",
            "addr",
            "state",
            "healthy",
            "in_flight",
            "limit (why)",
            "restarts",
            "pid",
            "driver",
            "host",
            "container"
        );
        let mut instances = s["instances"].as_array().cloned().unwrap_or_default();
        // Per host, then by id.
        instances.sort_by_key(|i| (i["host"].as_str().unwrap_or("").to_string(), i["id"].as_u64().unwrap_or(0)));
        for i in instances {
            let healthy = match i["healthy"].as_bool() {
                Some(true) => "yes",
                Some(false) => "no",
                None => "-",
            };
            let limit = match i["limit"]["current"].as_u64() {
                Some(n) => format!("{n} ({})", i["limit"]["why"].as_str().unwrap_or("?")),
                None => "-".to_string(),
            };
            println!(
                "  {:>4}  {:<10} {:<21} {:<9} {:<8} {:>9} {:<24} {:>8} {:>8}  {:<8} {:<10} {:<12} {}",
                i["id"].to_string(),
                i["version"].as_str().unwrap_or(""),
                i["addr"].as_str().unwrap_or(""),
                i["state"].as_str().unwrap_or(""),
                healthy,
                i["in_flight"].to_string(),
                limit,
                i["restarts"].to_string(),
                i["pid"].to_string(),
                i["driver"].as_str().unwrap_or("-"),
                i["host"].as_str().unwrap_or("local"),
                i["container"].as_str().unwrap_or("-"),
                i["last_exit"].as_str().unwrap_or("-")
            );
        }
        match s["deploy"].as_object() {
            Some(d) => println!(
                "  deploy in progress: {} to {} ({}), {:.1} s so far; last step: {}",
                d["kind"].as_str().unwrap_or(""),
                d["version"].as_str().unwrap_or(""),
                d["strategy"].as_str().unwrap_or(""),
                d["running_ms"].as_u64().unwrap_or(0) as f64 / 1000.0,
                d["events"].as_array().and_then(|e| e.last()).and_then(|e| e["message"].as_str()).unwrap_or("-")
            ),
            None => println!("  no deploy in progress"),
        }
        if let Some(l) = s["last_deploy"].as_object() {
            println!(
                "  last {}: {} -> {} ({}) {}{}",
                l["kind"].as_str().unwrap_or(""),
                l["from_version"].as_str().unwrap_or(""),
                l["version"].as_str().unwrap_or(""),
                l["strategy"].as_str().unwrap_or(""),
                l["result"].as_str().unwrap_or(""),
                l["reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default()
            );
        }
    }
    ExitCode::SUCCESS
}

#[derive(Args)]
pub struct HistoryArgs {
    /// Only this app service's deploys.
    #[arg(value_name = "SERVICE")]
    pub service: Option<String>,
    #[command(flatten)]
    pub conn: admin_client::AdminConn,
    /// Print the admin API's JSON.
    #[arg(long)]
    pub json: bool,
}

/// `nonstop history`: the deploy history from GET /deploys, as a table.
pub fn history(a: HistoryArgs) -> ExitCode {
    let admin = match resolve("history", &a.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let path = match &a.service {
        Some(s) => format!("/deploys?service={s}"),
        None => "/deploys".to_string(),
    };
    let (code, text) = match admin_client::call(admin.addr, admin.token.as_deref(), "GET", &path, None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nonstop history: cannot reach the admin API at {}: {e}", admin.addr);
            return ExitCode::from(1);
        }
    };
    let v = serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
    if code != 200 {
        eprintln!("nonstop history: the admin API answered {code}: {}", v["error"].as_str().unwrap_or(&text));
        return ExitCode::from(1);
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or(text));
        return ExitCode::SUCCESS;
    }
    let deploys = v["deploys"].as_array().cloned().unwrap_or_default();
    if deploys.is_empty() {
        println!("no deploys yet");
        return ExitCode::SUCCESS;
    }
    println!(
        "{:>4}  {:<12} {:<19} {:>8}  {:<8} {:<21} {:<10} {:<11} reason",
        "id", "service", "started (UTC)", "took", "kind", "from -> to", "strategy", "result"
    );
    for d in deploys {
        let started = d["started_ms"].as_u64().unwrap_or(0);
        let took = d["ended_ms"].as_u64().unwrap_or(started).saturating_sub(started);
        println!(
            "{:>4}  {:<12} {:<19} {:>8}  {:<8} {:<21} {:<10} {:<11} {}",
            d["id"].to_string(),
            d["service"].as_str().unwrap_or(""),
            utc(started),
            duration(took),
            d["kind"].as_str().unwrap_or(""),
            format!("{} -> {}", d["from_version"].as_str().unwrap_or("?"), d["version"].as_str().unwrap_or("?")),
            d["strategy"].as_str().unwrap_or(""),
            d["result"].as_str().unwrap_or(""),
            d["reason"].as_str().unwrap_or("-"),
        );
    }
    ExitCode::SUCCESS
}

/// Milliseconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS`, UTC.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

/// A duration for a table: 850ms, 12.3s, 4m05s, 2h03m.
pub fn duration(ms: u64) -> String {
    match ms {
        0..1000 => format!("{ms}ms"),
        1000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_and_durations_read_well() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_212_861_999), "2026-12-02 12:01:01");
        assert_eq!(utc(4_107_542_399_000), "2100-02-28 23:59:59");
        assert_eq!(
            [duration(850), duration(12_340), duration(245_000), duration(7_380_000)],
            ["850ms", "12.3s", "4m05s", "2h03m"]
        );
    }
}
