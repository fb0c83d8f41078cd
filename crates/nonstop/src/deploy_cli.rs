//! `nonstop deploy`, `rollback` and `status`: clients of a running proxy's admin API. The proxy performs the
//! deploy; these print its progress as it happens.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;
use serde_json::{json, Value};

use crate::admin_client;

#[derive(Args, Clone)]
pub struct AdminArgs {
    /// The proxy's admin API.
    #[arg(long, default_value = "127.0.0.1:9900")]
    pub admin: SocketAddr,
    /// Bearer token of the admin API, if it has one.
    #[arg(long)]
    pub token: Option<String>,
    /// The app service (needed only when several services have an app section).
    #[arg(long)]
    pub service: Option<String>,
}

#[derive(Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The version to deploy (replaces {version} in the app's command).
    #[arg(long)]
    pub version: String,
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

/// Starts a deploy and follows it. Exit status: 0 when it succeeded, 1 when it was rolled back or could not
/// start, 2 for bad arguments.
pub fn deploy(a: DeployArgs) -> ExitCode {
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
    follow("deploy", "/deploy", &a.admin, &body, a.json)
}

pub fn rollback(a: AdminArgs, json_lines: bool) -> ExitCode {
    let body = json!({ "service": a.service });
    follow("rollback", "/rollback", &a, &body, json_lines)
}

fn follow(what: &str, path: &str, a: &AdminArgs, body: &Value, json_lines: bool) -> ExitCode {
    let mut result: Option<String> = None;
    let outcome = admin_client::stream(a.admin, a.token.as_deref(), "POST", path, Some(&body.to_string()), |line| {
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
            eprintln!("nonstop {what}: cannot reach the admin API at {}: {e}", a.admin);
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
    let (code, text) = match admin_client::call(a.admin.admin, a.admin.token.as_deref(), "GET", &path, None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nonstop logs: cannot reach the admin API at {}: {e}", a.admin.admin);
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
    let (code, text) = match admin_client::call(a.admin.admin, a.admin.token.as_deref(), "GET", &path, None) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("nonstop status: cannot reach the admin API at {}: {e}", a.admin.admin);
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
            "  {:>4}  {:<10} {:<21} {:<9} {:<8} {:>9} {:>8} {:>8}  {:<8} {:<10} {:<12} last exit",
            "id", "version", "addr", "state", "healthy", "in_flight", "restarts", "pid", "driver", "host", "container"
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
            println!(
                "  {:>4}  {:<10} {:<21} {:<9} {:<8} {:>9} {:>8} {:>8}  {:<8} {:<10} {:<12} {}",
                i["id"].to_string(),
                i["version"].as_str().unwrap_or(""),
                i["addr"].as_str().unwrap_or(""),
                i["state"].as_str().unwrap_or(""),
                healthy,
                i["in_flight"].to_string(),
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
