//! `nonstop run` and `nonstop runs`: start, follow and cancel pipeline and job runs, and list their history,
//! through a running proxy's admin API.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;

use crate::admin_client;

#[derive(Args)]
pub struct RunArgs {
    /// The pipeline or job.
    pub name: String,
    /// The branch, tag or commit to build [default: the pipeline's branch].
    #[arg(long = "ref", value_name = "REF", conflicts_with = "cancel")]
    pub git_ref: Option<String>,
    /// Stream the run's log until it ends; exit 0 when it succeeded, 1 otherwise.
    #[arg(long, short = 'f')]
    pub follow: bool,
    /// Cancel run N instead of starting one.
    #[arg(long, value_name = "N")]
    pub cancel: Option<u64>,
    #[command(flatten)]
    pub conn: admin_client::AdminConn,
}

#[derive(Args)]
pub struct RunsArgs {
    /// A pipeline or job [default: every one, with its last run].
    pub name: Option<String>,
    /// Show one run: its steps (status, exit code, duration) and its logs.
    #[arg(long, value_name = "N", requires = "name")]
    pub run: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: admin_client::AdminConn,
}

fn get(admin: SocketAddr, token: Option<&str>, method: &str, path: &str, body: Option<&str>) -> Result<Value, String> {
    let (code, text) = admin_client::call(admin, token, method, path, body)
        .map_err(|e| format!("cannot reach the admin API at {admin}: {e}"))?;
    let v = serde_json::from_str::<Value>(&text).unwrap_or(Value::Null);
    if !(200..300).contains(&code) {
        return Err(v["error"].as_str().map(str::to_string).unwrap_or(text));
    }
    Ok(v)
}

fn ms(v: &Value) -> String {
    match v.as_u64() {
        Some(ms) if ms >= 60_000 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "-".into(),
    }
}

fn run_line(r: &Value) -> String {
    let took = match (r["started_ms"].as_u64(), r["ended_ms"].as_u64()) {
        (Some(s), Some(e)) => ms(&Value::from(e.saturating_sub(s))),
        _ => "-".into(),
    };
    let commit: String = r["commit"].as_str().unwrap_or("-").chars().take(12).collect();
    format!(
        "{:<16} #{:<5} {:<12} {:<9} {:<12} {:>8}  {}",
        r["pipeline"].as_str().unwrap_or(""),
        r["number"],
        r["state"].as_str().unwrap_or(""),
        r["trigger"].as_str().unwrap_or(""),
        commit,
        took,
        r["reason"].as_str().unwrap_or("")
    )
}

pub fn run(a: RunArgs) -> ExitCode {
    let admin = match crate::deploy_cli::resolve("run", &a.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let token = admin.token.as_deref();
    if let Some(n) = a.cancel {
        return match get(admin.addr, token, "POST", &format!("/pipelines/{}/runs/{n}/cancel", a.name), Some("{}")) {
            Ok(v) => {
                println!("{}", run_line(&v["run"]));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nonstop run: {e}");
                ExitCode::from(1)
            }
        };
    }
    let body = serde_json::json!({ "ref": a.git_ref }).to_string();
    let v = match get(admin.addr, token, "POST", &format!("/pipelines/{}/runs", a.name), Some(&body)) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("nonstop run: {e}");
            return ExitCode::from(1);
        }
    };
    let n = v["run"]["number"].as_u64().unwrap_or(0);
    println!("{} run {n} {}", a.name, v["run"]["state"].as_str().unwrap_or(""));
    if !a.follow {
        return ExitCode::SUCCESS;
    }
    follow(admin.addr, token, &a.name, n)
}

/// Streams run `n`'s log (Server-Sent Events) until it ends; the exit status says whether it succeeded.
fn follow(admin: SocketAddr, token: Option<&str>, name: &str, n: u64) -> ExitCode {
    let mut end_state = None;
    let mut last_step = String::new();
    let path = format!("/pipelines/{name}/runs/{n}/log?follow=1");
    let streamed = admin_client::stream(admin, token, "GET", &path, None, |line| {
        let Some(data) = line.strip_prefix("data: ") else { return };
        let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
        if v["end"] == serde_json::json!(true) {
            end_state = v["state"].as_str().map(str::to_string);
            return;
        }
        let step = format!("{}/{}", v["stage"].as_str().unwrap_or(""), v["name"].as_str().unwrap_or(""));
        if step != last_step {
            println!("── {step}");
            last_step = step;
        }
        println!("{}", v["line"].as_str().unwrap_or(""));
    });
    match streamed {
        Ok(Ok(())) => {}
        Ok(Err((code, text))) => {
            eprintln!("nonstop run: {code}: {text}");
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("nonstop run: the log stream broke: {e}");
            return ExitCode::from(1);
        }
    }
    match get(admin, token, "GET", &format!("/pipelines/{name}/runs/{n}"), None) {
        Ok(r) => {
            println!("{}", run_line(&r));
            if r["state"] == "succeeded" {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("nonstop run: run {n} ended {}; {e}", end_state.unwrap_or_default());
            ExitCode::from(1)
        }
    }
}

pub fn runs(a: RunsArgs) -> ExitCode {
    let admin = match crate::deploy_cli::resolve("runs", &a.conn) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let token = admin.token.as_deref();
    let path = match (&a.name, a.run) {
        (Some(name), Some(n)) => format!("/pipelines/{name}/runs/{n}"),
        (Some(name), None) => format!("/pipelines/{name}/runs"),
        (None, _) => "/pipelines".to_string(),
    };
    let v = match get(admin.addr, token, "GET", &path, None) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("nonstop runs: {e}");
            return ExitCode::from(1);
        }
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return ExitCode::SUCCESS;
    }
    match (&a.name, a.run) {
        (Some(name), Some(n)) => {
            println!("{}", run_line(&v));
            let logs =
                get(admin.addr, token, "GET", &format!("/pipelines/{name}/runs/{n}/log"), None).unwrap_or_default();
            let steps = v["steps"].as_array().into_iter().flatten().chain(v["post"].as_array().into_iter().flatten());
            for (s, log) in steps.zip(logs["steps"].as_array().into_iter().flatten()) {
                println!(
                    "\n── {}/{}  {}  exit {}  {}  {}",
                    s["stage"].as_str().unwrap_or(""),
                    s["name"].as_str().unwrap_or(""),
                    s["state"].as_str().unwrap_or(""),
                    s["exit_code"],
                    ms(&s["duration_ms"]),
                    s["message"].as_str().unwrap_or("")
                );
                print!("{}", log["log"].as_str().unwrap_or(""));
            }
        }
        (Some(_), None) => {
            println!(
                "{:<16} {:<6} {:<12} {:<9} {:<12} {:>8}  reason",
                "pipeline", "run", "state", "trigger", "commit", "took"
            );
            for r in v["runs"].as_array().into_iter().flatten() {
                println!("{}", run_line(r));
            }
        }
        (None, _) => {
            println!("{:<16} {:<8} {:<10} {:<20} last run", "name", "kind", "running", "schedule");
            for p in v["pipelines"].as_array().into_iter().flatten() {
                let last = &p["last_run"];
                let last = if last.is_null() {
                    "-".to_string()
                } else {
                    format!(
                        "#{} {} {}",
                        last["number"],
                        last["state"].as_str().unwrap_or(""),
                        last["trigger"].as_str().unwrap_or("")
                    )
                };
                println!(
                    "{:<16} {:<8} {:<10} {:<20} {last}",
                    p["name"].as_str().unwrap_or(""),
                    p["kind"].as_str().unwrap_or(""),
                    p["running"].as_u64().map_or("-".to_string(), |n| format!("#{n}")),
                    p["schedule"].as_str().unwrap_or("-"),
                );
            }
        }
    }
    ExitCode::SUCCESS
}
