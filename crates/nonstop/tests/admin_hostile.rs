//! Hostile use of `nonstop serve` and its admin API (issue 17): a second proxy on held ports, cross-origin and
//! rebinding requests to the admin API, and service names that would break the Prometheus text format.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nonstop_testkit::{echo, get, post_json, send, Method, Proc, TempDir};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

/// A child killed when dropped, so a second proxy that wrongly started does not outlive the test.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `nonstop serve ARGS` and waits (up to 30 s) for it to exit; panics if it is still running then, which
/// means it shares the address with the first proxy. Returns its exit code and standard error.
fn refused_start(args: &[&str]) -> (Option<i32>, String) {
    let child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nonstop");
    let mut child = Killed(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("try_wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "nonstop {args:?} started beside the first proxy instead of refusing");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    use std::io::Read;
    child.0.stderr.take().expect("piped stderr").read_to_string(&mut err).expect("read stderr");
    (status.code(), err)
}

/// Requests served, by server address, as the admin API counts them.
async fn requests_by_server(admin: SocketAddr) -> BTreeMap<String, u64> {
    let v = get(admin, "/services").await.json();
    v["services"][0]["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| (s["addr"].as_str().unwrap().to_string(), s["requests"].as_u64().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_a_held_listener_or_admin_address_refuses_to_start() {
    let backend = echo::start("a").await.to_string();
    let first = Proc::start(
        bin(),
        &["serve", "--listen", "127.0.0.1:0", "--to", &backend, "--admin", "127.0.0.1:0", "--threads", "2"],
    );
    let listen = first.addr.to_string();
    let admin = first.addr_after("admin").expect("admin address in the banner").to_string();
    let pid = first.pid().to_string();

    for (what, args) in [
        ("listener", ["serve", "--listen", listen.as_str(), "--to", &backend, "--admin", "127.0.0.1:0"]),
        ("admin", ["serve", "--listen", "127.0.0.1:0", "--to", &backend, "--admin", admin.as_str()]),
    ] {
        let held = if what == "listener" { &listen } else { &admin };
        let (code, err) = refused_start(&args);
        assert!(code.is_some_and(|c| c != 0), "the second serve on the {what} address exited {code:?}: {err}");
        assert!(err.contains(held.as_str()), "the refusal does not name {held}: {err}");
        assert!(err.contains(&format!("pid {pid}")), "the refusal does not name the holder, pid {pid}: {err}");
        assert!(err.contains("nonstop"), "the refusal does not name the holder's command: {err}");
    }

    // The first proxy still has every connection: each request on a new connection reaches it.
    let before = requests_by_server(first.addr_after("admin").unwrap()).await[&backend];
    for _ in 0..40 {
        assert_eq!(get(first.addr, "/").await.status, 200);
    }
    let after = requests_by_server(first.addr_after("admin").unwrap()).await[&backend];
    assert_eq!(after - before, 40, "the first proxy did not serve all the traffic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_a_wildcard_address_refuses_and_port_zero_still_works() {
    let backend = echo::start("a").await.to_string();
    let first = Proc::start(bin(), &["serve", "--listen", "127.0.0.1:0", "--to", &backend]);
    let wildcard = format!("0.0.0.0:{}", first.addr.port());
    let (code, err) = refused_start(&["serve", "--listen", &wildcard, "--to", &backend]);
    assert!(code.is_some_and(|c| c != 0), "exited {code:?}: {err}");
    assert!(err.contains(&wildcard) && err.contains(&format!("pid {}", first.pid())), "{err}");
    // Port 0 is never held: a second proxy on port 0 starts.
    let second = Proc::start(bin(), &["serve", "--listen", "127.0.0.1:0", "--to", &backend]);
    assert_ne!(second.addr, first.addr);
    assert_eq!(get(second.addr, "/").await.status, 200);
}

/// A request a web page could send: method, path, headers, body, the status it must get, what its error names.
type Hostile<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>, &'a str, u16, &'a str);

/// The servers of the only service: address → state.
async fn pool(admin: SocketAddr) -> BTreeMap<String, String> {
    let v = get(admin, "/services").await.json();
    v["services"][0]["servers"]
        .as_array()
        .expect("servers")
        .iter()
        .map(|s| (s["addr"].as_str().unwrap().to_string(), s["state"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_rebinding_and_non_json_admin_requests_are_refused_and_change_nothing() {
    let (a, b) = (echo::start("a").await, echo::start("b").await);
    let p = Proc::start(bin(), &["serve", "--listen", "127.0.0.1:0", "--to", &a.to_string(), "--admin", "127.0.0.1:0"]);
    let admin = p.addr_after("admin").unwrap();
    let own_host = admin.to_string();
    let rebound = format!("attacker.example:{}", admin.port());
    let add = format!(r#"{{"addr":"{b}","weight":1}}"#);
    let drain = format!("/services/default/servers/{a}/drain");
    let server_a = format!("/services/default/servers/{a}");
    let rebound_origin = format!("http://{rebound}");
    let start = pool(admin).await;
    assert_eq!(start, BTreeMap::from([(a.to_string(), "active".to_string())]));

    let hostile: Vec<Hostile> = vec![
        // A web page's simple request: no preflight for text/plain or a form.
        (
            Method::POST,
            "/services/default/servers",
            vec![("content-type", "text/plain")],
            &add,
            415,
            "application/json",
        ),
        (Method::POST, "/services/default/servers", vec![], &add, 415, "application/json"),
        (Method::PUT, &server_a, vec![("content-type", "text/plain")], r#"{"weight":0}"#, 415, "application/json"),
        (
            Method::POST,
            &drain,
            vec![("content-type", "application/x-www-form-urlencoded")],
            "x=1",
            415,
            "application/json",
        ),
        // A page on another origin (CSRF), even with the JSON type a browser would preflight.
        (
            Method::POST,
            "/services/default/servers",
            vec![("origin", "http://evil.example"), ("content-type", "text/plain")],
            &add,
            403,
            "Origin",
        ),
        (Method::POST, &drain, vec![("origin", "http://evil.example")], "", 403, "Origin"),
        (Method::POST, &drain, vec![("origin", "null")], "", 403, "Origin"),
        (Method::GET, "/services", vec![("origin", "http://evil.example")], "", 403, "Origin"),
        // DNS rebinding: the attacker's name now resolves to 127.0.0.1; the page is same-origin with itself.
        (
            Method::POST,
            "/services/default/servers",
            vec![("host", &rebound), ("content-type", "application/json")],
            &add,
            421,
            "Host",
        ),
        (Method::POST, &drain, vec![("host", &rebound), ("origin", &rebound_origin)], "", 421, "Host"),
        (Method::GET, "/services", vec![("host", &rebound)], "", 421, "Host"),
        (Method::DELETE, &server_a, vec![("host", &rebound)], "", 421, "Host"),
    ];
    for (method, path, headers, body, status, mention) in &hostile {
        let r = send(admin, method.clone(), path, headers, body.to_string()).await.expect("an answer");
        assert_eq!(r.status, *status, "{method} {path} {headers:?}: {}", String::from_utf8_lossy(&r.body));
        let error = r.json()["error"].as_str().map(String::from).unwrap_or_default();
        assert!(error.contains(mention), "{method} {path} {headers:?}: the error does not name {mention}: {error}");
    }
    assert_eq!(pool(admin).await, start, "a refused request changed the pool");

    // The operator's own requests still work: JSON, by loopback name or address, same-origin Origin included.
    let localhost = format!("localhost:{}", admin.port());
    let r = post_json(admin, "/services/default/servers", &[("host", &localhost)], &add).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let same_origin = format!("http://{own_host}");
    let r = send(admin, Method::POST, &drain, &[("origin", &same_origin)], "").await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = send(
        admin,
        Method::PUT,
        &format!("/services/default/servers/{b}"),
        &[("content-type", "application/json; charset=utf-8")],
        r#"{"weight":3}"#,
    )
    .await
    .unwrap();
    assert_eq!((r.status, r.json()["weight"].as_u64()), (200, Some(3)));
    assert_eq!(
        pool(admin).await,
        BTreeMap::from([(a.to_string(), "draining".to_string()), (b.to_string(), "active".to_string())])
    );
    assert_eq!(get(admin, "/metrics").await.status, 200);

    // The CLI clients pass the checks: a rollback with no app section is refused for that reason, not for its
    // Host or Content-Type; status and queue list answer.
    let out = Command::new(bin()).args(["rollback", "--admin", &own_host]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(409)") && err.contains("no service has an app section"), "{err}");
    let out = Command::new(bin()).args(["status", "--admin", &own_host]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(bin()).args(["queue", "--admin", &own_host, "list"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_host_may_be_any_name_but_the_origin_is_still_checked() {
    let backend = echo::start("a").await;
    let dir = TempDir::new("admin-token");
    let path = dir.path().join("nonstop.toml");
    std::fs::write(
        &path,
        format!(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = \"s\"\n[services.s]\n\
             servers = [{{ addr = \"{backend}\" }}]\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"\n"
        ),
    )
    .unwrap();
    let p = Proc::start(bin(), &["serve", "--config", path.to_str().unwrap()]);
    let admin = p.addr_after("admin").unwrap();
    let name = format!("proxy.internal:{}", admin.port());
    let auth = ("authorization", "Bearer s3cret");
    let r = send(admin, Method::GET, "/services", &[auth, ("host", &name)], "").await.unwrap();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let r = send(admin, Method::GET, "/services", &[auth, ("host", &name), ("origin", "http://evil.example")], "")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    let r =
        send(admin, Method::POST, "/services/s/servers", &[auth, ("content-type", "text/plain")], "{}").await.unwrap();
    assert_eq!(r.status, 415, "{}", String::from_utf8_lossy(&r.body));
}

/// Parses one sample line of the Prometheus text format: the metric name and its label values, unescaped.
fn parse_sample(line: &str) -> Result<(String, Vec<(String, String)>), String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    let name_ok = name
        .chars()
        .enumerate()
        .all(|(i, c)| c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit()));
    if name.is_empty() || !name_ok {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let mut chars = inner.char_indices();
        loop {
            let key_start = chars.clone().next().ok_or("unterminated labels")?.0;
            let mut key_end = key_start;
            let mut closed = false;
            for (i, c) in chars.by_ref() {
                if c == '=' {
                    key_end = i;
                    break;
                }
                if c == '}' && i == key_start {
                    closed = true;
                    key_end = i;
                    break;
                }
            }
            if closed {
                rest = &inner[key_end + 1..];
                break;
            }
            let key = &inner[key_start..key_end];
            if chars.next().map(|c| c.1) != Some('"') {
                return Err(format!("label {key:?} has no opening quote"));
            }
            let mut value = String::new();
            loop {
                match chars.next().ok_or("unterminated label value")?.1 {
                    '"' => break,
                    '\\' => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    '\n' => return Err("raw newline in a label value".into()),
                    c => value.push(c),
                }
            }
            labels.push((key.to_string(), value));
            match chars.next().ok_or("unterminated labels")? {
                (_, ',') => continue,
                (i, '}') => {
                    rest = &inner[i + 1..];
                    break;
                }
                (_, c) => return Err(format!("unexpected {c:?} after a label value")),
            }
        }
    }
    let value = rest.strip_prefix(' ').ok_or("no space before the value")?;
    if value.parse::<f64>().is_err() && !["+Inf", "-Inf", "NaN"].contains(&value) {
        return Err(format!("bad value {value:?}"));
    }
    Ok((name.to_string(), labels))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_service_names_are_escaped_in_metrics() {
    let backend = echo::start("a").await;
    let dir = TempDir::new("admin-metrics");
    let path = dir.path().join("nonstop.toml");
    // A TOML quoted key may carry a quote, a backslash and a newline; the name is then a label value.
    let key = r#""we\"ird\\name\nfake_metric{x=\"1\"} 666""#;
    let hostile = "we\"ird\\name\nfake_metric{x=\"1\"} 666";
    std::fs::write(
        &path,
        format!(
            "[[listeners]]\nlisten = \"127.0.0.1:0\"\n[[routes]]\nservice = {key}\n[services.{key}]\n\
             servers = [{{ addr = \"{backend}\" }}]\n[admin]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
    let p = Proc::start(bin(), &["serve", "--config", path.to_str().unwrap()]);
    assert_eq!(get(p.addr, "/").await.status, 200);
    let admin = p.addr_after("admin").unwrap();
    assert_eq!(get(admin, "/services").await.json()["services"][0]["name"], hostile);
    let text = String::from_utf8(get(admin, "/metrics").await.body.to_vec()).unwrap();
    let mut seen = 0;
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, labels) = parse_sample(line).unwrap_or_else(|e| panic!("{e}: {line:?}\n{text}"));
        assert_ne!(name, "fake_metric", "a service name injected a sample: {text}");
        seen += labels.iter().filter(|(k, v)| k == "service" && v == hostile).count();
    }
    assert!(seen > 0, "no sample carries the service name: {text}");
    assert!(text.contains(r#"service="we\"ird\\name\nfake_metric{x=\"1\"} 666""#), "{text}");
}
