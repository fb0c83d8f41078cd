//! What nginx users reach for on day one, tested on the real `nonstop serve` over real sockets: access lists by
//! client address (with trusted proxies' X-Forwarded-For), rate limits per client or key, rewrites and header
//! rules, compression, and static files (with a path-traversal suite). Clients speak from
//! chosen loopback addresses (127.0.0.2, 127.0.0.3, ...), so that the proxy sees several clients on one machine.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nonstop_testkit::raw::{answers, ok, Answer, RawBackend};
use nonstop_testkit::{Proc, TempDir};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nonstop"))
}

fn serve(dir: &TempDir, toml: &str) -> Proc {
    let path = dir.path().join("nonstop.toml");
    std::fs::write(&path, toml).unwrap();
    Proc::start(bin(), &["serve", "--config", path.to_str().unwrap(), "--threads", "2"])
}

/// A connection to `to` from source address `from` (a loopback address other than 127.0.0.1, say).
fn connect_from(from: &str, to: SocketAddr) -> std::net::TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&src.into()).unwrap_or_else(|e| panic!("bind {src}: {e}"));
    socket.connect_timeout(&to.into(), Duration::from_secs(5)).unwrap();
    socket.into()
}

/// Writes `bytes` on `s` and reads until the other side closes (or 10 s pass).
fn exchange_on(mut s: std::net::TcpStream, bytes: &[u8]) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 16 * 1024];
    while Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
    out
}

/// Sends `requests` (GETs of these paths, each with `headers`) on one connection from source address `from`,
/// pipelined, the last with `Connection: close`, and parses every answer.
fn get_from(from: &str, to: SocketAddr, paths: &[&str], headers: &[(&str, &str)]) -> Vec<Answer> {
    let mut bytes = String::new();
    for (i, path) in paths.iter().enumerate() {
        bytes.push_str(&format!("GET {path} HTTP/1.1\r\nHost: site.test\r\n"));
        for (k, v) in headers {
            bytes.push_str(&format!("{k}: {v}\r\n"));
        }
        if i + 1 == paths.len() {
            bytes.push_str("Connection: close\r\n");
        }
        bytes.push_str("\r\n");
    }
    let out = exchange_on(connect_from(from, to), bytes.as_bytes());
    let (got, rest) = answers(&out);
    assert!(rest.is_empty(), "a truncated answer: {}", String::from_utf8_lossy(&rest));
    assert_eq!(got.len(), paths.len(), "one answer per request: {}", String::from_utf8_lossy(&out));
    got
}

fn one(from: &str, to: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    get_from(from, to, &[path], headers).remove(0)
}

/// `nonstop check` of `toml` fails and reports every one of `wants`.
fn check_reports(tag: &str, toml: &str, wants: &[&str]) {
    let dir = TempDir::new(tag);
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, toml).unwrap();
    let out = Command::new(bin()).args(["check", "--config"]).arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    for want in wants {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}

fn error_of(a: &Answer) -> String {
    let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_else(|_| panic!("a JSON error: {a:?}"));
    v["error"].as_str().unwrap_or_else(|| panic!("an error message: {v}")).to_string()
}

/// The paths the backend was asked for, with the X-Forwarded-For it got.
fn seen(backend: &RawBackend) -> Vec<(String, Vec<String>)> {
    backend.seen().iter().map(|s| (s.line().to_string(), s.headers("x-forwarded-for"))).collect()
}

#[test]
fn an_access_list_refuses_by_client_address_and_believes_x_forwarded_for_only_from_a_trusted_proxy() {
    let dir = TempDir::new("access");
    let backend = RawBackend::start(|_| ok());
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.3\"]\n\n\
         [[routes]]\nservice = \"b\"\npath_prefix = \"/admin\"\n[routes.access]\nallow = [\"127.0.0.2\", \"10.0.0.0/8\"]\n\n\
         [[routes]]\nservice = \"b\"\npath_prefix = \"/internal\"\n[routes.access]\nallow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.5\"]\n\n\
         [[routes]]\nservice = \"b\"\n\n\
         [services.b]\nservers = [{{ addr = \"{}\" }}]\n\n[access_log]\nenabled = false\n",
        backend.addr
    );
    let p = serve(&dir, &toml);

    // An address in the allow list passes; any other gets 403 naming it, and the backend never sees it.
    assert_eq!(one("127.0.0.2", p.addr, "/admin/users", &[]).status, 200);
    let refused = one("127.0.0.1", p.addr, "/admin/users", &[]);
    assert_eq!(refused.status, 403, "{refused:?}");
    let why = error_of(&refused);
    assert!(why.contains("127.0.0.1") && why.contains("not in the allow list"), "{why}");
    // Routes without a list are open to all.
    assert_eq!(one("127.0.0.1", p.addr, "/", &[]).status, 200);

    // An untrusted peer cannot pick its address by sending the header.
    let spoofed = one("127.0.0.1", p.addr, "/admin/x", &[("X-Forwarded-For", "127.0.0.2")]);
    assert_eq!(spoofed.status, 403, "{spoofed:?}");
    // The trusted proxy's header names the client: the right-most address that is not a trusted proxy.
    assert_eq!(one("127.0.0.3", p.addr, "/admin/a", &[("X-Forwarded-For", "127.0.0.2")]).status, 200);
    assert_eq!(one("127.0.0.3", p.addr, "/admin/b", &[("X-Forwarded-For", "127.0.0.9, 127.0.0.2")]).status, 200);
    let behind = one("127.0.0.3", p.addr, "/admin/c", &[("X-Forwarded-For", "127.0.0.2, 127.0.0.9")]);
    assert_eq!(behind.status, 403, "the client is the last hop before the proxy: {behind:?}");
    assert!(error_of(&behind).contains("127.0.0.9"), "{}", error_of(&behind));
    // With no header, the trusted proxy itself is the client (and it is not allowed).
    assert_eq!(one("127.0.0.3", p.addr, "/admin/d", &[]).status, 403);

    // Deny wins over allow.
    assert_eq!(one("127.0.0.4", p.addr, "/internal/x", &[]).status, 200);
    let denied = one("127.0.0.5", p.addr, "/internal/x", &[]);
    assert_eq!(denied.status, 403);
    assert!(error_of(&denied).contains("denied (in 127.0.0.5/32)"), "{}", error_of(&denied));

    let got = seen(&backend);
    let paths: Vec<&str> = got.iter().map(|(l, _)| l.split_whitespace().nth(1).unwrap_or("")).collect();
    assert_eq!(paths, ["/admin/users", "/", "/admin/a", "/admin/b", "/internal/x"], "only what was let in: {got:?}");
    // What the trusted proxy said is passed on, with its own address appended.
    assert_eq!(got[2].1, ["127.0.0.2, 127.0.0.3"], "{got:?}");
}

#[test]
fn a_rate_limit_per_key_gives_each_key_its_own_burst_and_answers_429_with_retry_after() {
    let dir = TempDir::new("ratekey");
    let backend = RawBackend::start(|_| ok());
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nservice = \"b\"\npath_prefix = \"/api\"\n[routes.rate_limit]\nrequests_per_min = 60\nburst = 5\nkey = \"header:X-Api-Key\"\n\n\
         [[routes]]\nservice = \"b\"\npath_prefix = \"/per-client\"\n[routes.rate_limit]\nrequests_per_min = 60\nburst = 3\n\n\
         [[routes]]\nservice = \"b\"\n\n\
         [services.b]\nservers = [{{ addr = \"{}\" }}]\n\n[access_log]\nenabled = false\n",
        backend.addr
    );
    let p = serve(&dir, &toml);
    let statuses = |a: &[Answer]| a.iter().map(|a| a.status).collect::<Vec<_>>();

    // One a second with a burst of 5: eight at once give five 200s, then 429s that say when to come back.
    let paths = ["/api/x"; 8];
    let a = get_from("127.0.0.1", p.addr, &paths, &[("X-Api-Key", "alice")]);
    assert_eq!(statuses(&a), [200, 200, 200, 200, 200, 429, 429, 429]);
    let retry: u64 = a[5].header("retry-after").expect("Retry-After on a 429").parse().unwrap();
    assert!((1..=2).contains(&retry), "one request frees in a second: {retry}");
    let why = error_of(&a[5]);
    assert!(why.contains("rate limit of 1 request/s (burst 5)") && why.contains("for this key"), "{why}");
    // Another key, from the same address, has its own allowance.
    let b = get_from("127.0.0.1", p.addr, &paths[..5], &[("X-Api-Key", "bob")]);
    assert_eq!(statuses(&b), [200; 5]);
    // A request without the key is counted by its client address.
    let anon = get_from("127.0.0.1", p.addr, &paths[..6], &[]);
    assert_eq!(statuses(&anon), [200, 200, 200, 200, 200, 429]);
    assert!(error_of(&anon[5]).contains("for this client address"), "{}", error_of(&anon[5]));

    // Per client address: each address has its burst of 3.
    let per = ["/per-client"; 4];
    assert_eq!(statuses(&get_from("127.0.0.2", p.addr, &per, &[])), [200, 200, 200, 429]);
    assert_eq!(statuses(&get_from("127.0.0.3", p.addr, &per, &[])), [200, 200, 200, 429]);
    // Refused requests do not count: after the one-second interval, one more passes.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(statuses(&get_from("127.0.0.2", p.addr, &per[..2], &[])), [200, 429]);
    // Unlimited routes are not touched.
    assert_eq!(statuses(&get_from("127.0.0.2", p.addr, &["/"; 10], &[])), [200; 10]);

    let reached = backend.seen().len();
    assert_eq!(reached, 5 + 5 + 5 + 3 + 3 + 1 + 10, "no refused request reached the backend");
}

#[test]
fn a_rate_limit_lets_the_configured_rate_through_within_ten_percent_over_ten_seconds() {
    let dir = TempDir::new("raterate");
    let backend = RawBackend::start(|_| ok());
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nservice = \"b\"\n[routes.rate_limit]\nrequests_per_s = 50\nburst = 10\n\n\
         [services.b]\nservers = [{{ addr = \"{}\" }}]\n\n[access_log]\nenabled = false\n",
        backend.addr
    );
    let p = serve(&dir, &toml);
    // 200 requests a second for 10 s, four times the limit, from one client address.
    let out = Command::new(bin())
        .args(["load", &format!("http://{}/", p.addr), "--rate", "200", "--duration", "10s", "--json", "-"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("load JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    let status = &doc["status"];
    let n = |k: &str| status[k].as_u64().unwrap_or(0);
    let (passed, limited) = (n("200"), n("429"));
    eprintln!("{passed} passed and {limited} were limited: {status}");
    assert_eq!(passed + limited, doc["requests"]["scheduled"].as_u64().unwrap(), "only 200s and 429s: {status}");
    assert!(limited > 1000, "most of the excess was refused: {status}");
    // The burst, then 50 a second over the span the load took.
    let span_s = doc["duration_s"].as_f64().unwrap_or(10.0);
    let expected = 10.0 + 50.0 * span_s;
    let off = (passed as f64 - expected).abs() / expected;
    assert!(off <= 0.10, "{passed} passed against {expected} expected ({:.1}% off)", off * 100.0);
    assert_eq!(backend.seen().len() as u64, passed, "the backend saw exactly the requests let through");
}

#[test]
fn bad_access_and_rate_limit_settings_are_all_reported_with_their_lines() {
    let toml = "[[listeners]]\nlisten = \"127.0.0.1:0\"\ntrusted_proxies = [\"10.0.0.1/8\"]\n\n\
                [[routes]]\nservice = \"b\"\n[routes.access]\nallow = [\"localhost\"]\n\n\
                [[routes]]\nservice = \"b\"\npath_prefix = \"/r\"\n[routes.rate_limit]\nrequests_per_s = 5\nrequests_per_min = 60\n\n\
                [[routes]]\nservice = \"b\"\npath_prefix = \"/k\"\n[routes.rate_limit]\nrequests_per_s = 5\nkey = \"cookie:id\"\nper = 1\n\n\
                [services.b]\nservers = [{ addr = \"127.0.0.1:9\" }]\n";
    check_reports(
        "guardcheck",
        toml,
        &[
            "line 3: listeners[0].trusted_proxies: \"10.0.0.1/8\" has host bits set: the network is 10.0.0.0/8",
            "line 8: routes[0].access.allow: \"localhost\" is not an IP address or a CIDR network",
            "line 15: routes[1].rate_limit.requests_per_min: give requests_per_s or requests_per_min, not both",
            "line 22: routes[2].rate_limit.key: \"cookie:id\": expected \"client\" or \"header:NAME\"",
            "line 23: routes[2].rate_limit.per: unknown key",
        ],
    );
}

/// The values of header `name` of what the backend got for the request whose path starts with `path`.
fn backend_headers(backend: &RawBackend, line_start: &str, name: &str) -> Vec<String> {
    let seen = backend.seen();
    let s = seen.iter().find(|s| s.line().starts_with(line_start)).unwrap_or_else(|| {
        panic!("no {line_start:?} at the backend: {:?}", seen.iter().map(|s| s.line()).collect::<Vec<_>>())
    });
    s.headers(name)
}

#[test]
fn rewrites_redirects_header_rules_and_request_ids_change_what_the_server_and_the_client_see() {
    let dir = TempDir::new("rewrite");
    let backend = RawBackend::start(|_| {
        nonstop_testkit::raw::Reply::Bytes(
            b"HTTP/1.1 200 OK\r\nserver: backend/1.0\r\nx-tag: from-server\r\ncontent-length: 2\r\n\r\nok".to_vec(),
        )
    });
    let log = dir.path().join("access.log");
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nrequest_id_header = \"X-Request-Id\"\ntrusted_proxies = [\"127.0.0.3\"]\n\n\
         [[routes]]\nservice = \"b\"\npath_prefix = \"/api\"\nstrip_prefix = true\n\
         [[routes.rewrite]]\nmatch = \"^/api/v1/(.*)$\"\nto = \"/api/v2/$1\"\n\
         [[routes.rewrite]]\nmatch = \"^/api/old/(?P<rest>.*)$\"\nto = \"https://new.example/${{rest}}\"\nredirect = 301\n\
         [routes.request_headers]\nset = {{ \"X-Real-IP\" = \"{{client}}\", \"X-Via-Route\" = \"api {{method}} {{path}}\" }}\n\
         add = {{ \"X-Tag\" = \"t1\" }}\nremove = [\"Cookie\", \"X-Forwarded-Host\"]\n\
         [routes.response_headers]\nset = {{ \"Strict-Transport-Security\" = \"max-age=31536000\", \"X-Request-Echo\" = \"{{request_id}}\" }}\n\
         add = {{ \"X-Tag\" = \"proxy\" }}\nremove = [\"Server\"]\n\n\
         [[routes]]\nservice = \"b\"\npath_prefix = \"/shop\"\nreplace_prefix = \"/store\"\n\n\
         [[routes]]\nservice = \"b\"\n\n\
         [services.b]\nservers = [{{ addr = \"{}\" }}]\n\n[access_log]\npath = \"{}\"\n",
        backend.addr,
        log.display()
    );
    let mut p = serve(&dir, &toml);

    // A regex rewrite, then the prefix stripped; the query stays. Request headers set, added and removed.
    let a = one(
        "127.0.0.1",
        p.addr,
        "/api/v1/users?x=1",
        &[("Cookie", "session=secret"), ("X-Request-Id", "client-id-1"), ("X-Tag", "c")],
    );
    assert_eq!(a.status, 200, "{a:?}");
    let at = "GET /v2/users?x=1 HTTP/1.1";
    assert_eq!(backend_headers(&backend, at, "x-real-ip"), ["127.0.0.1"]);
    assert_eq!(backend_headers(&backend, at, "x-via-route"), ["api GET /api/v1/users"], "the path the client sent");
    assert_eq!(backend_headers(&backend, at, "x-tag"), ["c", "t1"], "added beside the client's");
    assert!(backend_headers(&backend, at, "cookie").is_empty());
    assert!(backend_headers(&backend, at, "x-forwarded-host").is_empty(), "a rule removes the proxy's own too");
    assert_eq!(backend_headers(&backend, at, "x-request-id"), ["client-id-1"], "a sound id from the client is kept");
    // Response headers: set, added beside the server's, removed; the request id comes back.
    assert_eq!(a.header("strict-transport-security"), Some("max-age=31536000"));
    assert_eq!(a.header("server"), None, "{a:?}");
    let tags: Vec<&str> = a.headers.iter().filter(|(n, _)| n == "x-tag").map(|(_, v)| v.as_str()).collect();
    assert_eq!(tags, ["from-server", "proxy"]);
    assert_eq!(a.header("x-request-id"), Some("client-id-1"));
    assert_eq!(a.header("x-request-echo"), Some("client-id-1"));

    // A redirect rule answers itself, with the client's query, and the server never hears of it.
    let r = one("127.0.0.1", p.addr, "/api/old/a/b?q=1", &[]);
    assert_eq!(r.status, 301, "{r:?}");
    assert_eq!(r.header("location"), Some("https://new.example/a/b?q=1"));
    assert_eq!(r.header("strict-transport-security"), Some("max-age=31536000"), "the route's response headers too");
    let made = r.header("x-request-id").expect("a request id is made when the client sent none").to_string();
    assert!(made.len() == 32 && made.bytes().all(|b| b.is_ascii_hexdigit()), "{made}");
    assert!(backend.seen().iter().all(|s| !s.line().contains("/old/")));

    // The prefix alone: stripped to /, or replaced.
    assert_eq!(one("127.0.0.1", p.addr, "/api", &[]).status, 200);
    assert_eq!(one("127.0.0.1", p.addr, "/shop/cart?id=7", &[]).status, 200);
    let lines: Vec<String> = backend.seen().iter().map(|s| s.line().to_string()).collect();
    assert!(lines.contains(&"GET / HTTP/1.1".to_string()), "{lines:?}");
    assert!(lines.contains(&"GET /store/cart?id=7 HTTP/1.1".to_string()), "{lines:?}");

    // An id no one should log (too long) is replaced; what the server got is what the client gets back.
    let long = "x".repeat(200);
    let b = one("127.0.0.1", p.addr, "/other", &[("X-Request-Id", long.as_str())]);
    let id = b.header("x-request-id").unwrap().to_string();
    assert_eq!(id.len(), 32);
    assert_eq!(backend_headers(&backend, "GET /other", "x-request-id"), std::slice::from_ref(&id));
    assert_eq!(b.header("strict-transport-security"), None, "another route, without the rules");

    // Behind the trusted proxy, {client} is the client it names.
    one("127.0.0.3", p.addr, "/api/v1/behind", &[("X-Forwarded-For", "127.0.0.2")]);
    assert_eq!(backend_headers(&backend, "GET /v2/behind", "x-real-ip"), ["127.0.0.2"]);

    // The access log has each request's id, and the path the client sent.
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(15)).is_some(), "serve stops on SIGTERM");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&log).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let first = lines.iter().find(|l| l["path"] == "/api/v1/users").expect("the first request is logged");
    assert_eq!(first["request_id"], "client-id-1");
    let other = lines.iter().find(|l| l["path"] == "/other").unwrap();
    assert_eq!(other["request_id"], id.as_str());
}

#[test]
fn bad_rewrites_and_header_rules_are_all_reported_with_their_lines() {
    let toml = "[[listeners]]\nlisten = \"127.0.0.1:0\"\nrequest_id_header = \"Content-Length\"\n\n\
                [[routes]]\nservice = \"b\"\npath_prefix = \"/a\"\nstrip_prefix = true\nreplace_prefix = \"/b\"\n\n\
                [[routes]]\nservice = \"b\"\n\
                [[routes.rewrite]]\nmatch = \"^/(unclosed\"\nto = \"/x\"\n\
                [[routes.rewrite]]\nmatch = \"^/y$\"\nto = \"y\"\n\
                [[routes.rewrite]]\nmatch = \"^/z$\"\nto = \"/z2\"\nredirect = 304\n\
                [[routes.rewrite]]\nmatch = \"^/w$\"\nto = \"https://elsewhere.example/\"\n\
                [routes.request_headers]\nset = { \"Transfer-Encoding\" = \"chunked\", \"X-User\" = \"{user}\" }\n\n\
                [services.b]\nservers = [{ addr = \"127.0.0.1:9\" }]\n";
    check_reports(
        "rewritecheck",
        toml,
        &[
            "line 3: listeners[0].request_id_header: \"Content-Length\" is not a header name a request id can go in",
            "line 9: routes[0].replace_prefix: give strip_prefix or replace_prefix, not both",
            "line 14: routes[1].rewrite[0].match: \"^/(unclosed\" is not a regex",
            "line 18: routes[1].rewrite[1].to: \"y\" must start with /",
            "line 22: routes[1].rewrite[2].redirect: 304 is not a redirect status",
            "line 25: routes[1].rewrite[3].to: \"https://elsewhere.example/\": only a redirect may go to another site",
            "routes[1].request_headers.set: Transfer-Encoding: the proxy owns this header",
            "routes[1].request_headers.set: X-User: \"{user}\": no variable {user}",
        ],
    );
}

/// `body` decoded from `coding` (as Content-Encoding names it).
fn decoded(coding: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        None => out.extend_from_slice(body),
        Some("gzip") => {
            flate2::read::GzDecoder::new(body).read_to_end(&mut out).unwrap();
        }
        Some("br") => {
            brotli::Decompressor::new(body, 4096).read_to_end(&mut out).unwrap();
        }
        Some("zstd") => {
            zstd::stream::read::Decoder::new(body).unwrap().read_to_end(&mut out).unwrap();
        }
        Some(other) => panic!("unexpected coding {other}"),
    }
    out
}

#[test]
fn responses_are_compressed_as_the_client_accepts_only_when_worth_it_and_never_twice() {
    let dir = TempDir::new("compress");
    let page: String = (0..800).map(|i| format!("{{\"id\":{i},\"name\":\"item number {i}\"}},")).collect();
    let page = format!("[{}]", page.trim_end_matches(','));
    let served = page.clone();
    let backend = RawBackend::start(move |seen| {
        let path = seen.line().split_whitespace().nth(1).unwrap_or("/").to_string();
        let reply = |headers: &str, body: &[u8]| {
            let mut b = format!("HTTP/1.1 200 OK\r\n{headers}content-length: {}\r\n\r\n", body.len()).into_bytes();
            b.extend_from_slice(body);
            nonstop_testkit::raw::Reply::Bytes(b)
        };
        match path.as_str() {
            "/big.json" => reply("content-type: application/json\r\netag: \"v1\"\r\n", served.as_bytes()),
            "/small.json" => reply("content-type: application/json\r\n", b"{\"small\":true}"),
            "/image.png" => reply("content-type: image/png\r\n", &[7u8; 5000]),
            "/already" => reply(
                "content-type: text/html\r\ncontent-encoding: gzip\r\n",
                b"not really gzip, but the server says so",
            ),
            "/keep" => reply("content-type: text/html\r\ncache-control: no-transform\r\n", &[b'a'; 5000]),
            "/chunked" => {
                let mut b =
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
                for _ in 0..3 {
                    b.extend_from_slice(format!("{:x}\r\n", 4000).as_bytes());
                    b.extend_from_slice(&[b'z'; 4000]);
                    b.extend_from_slice(b"\r\n");
                }
                b.extend_from_slice(b"0\r\n\r\n");
                nonstop_testkit::raw::Reply::Bytes(b)
            }
            _ => ok(),
        }
    });
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nservice = \"b\"\n[routes.compress]\n\n\
         [services.b]\nservers = [{{ addr = \"{}\" }}]\n\n[access_log]\nenabled = false\n",
        backend.addr
    );
    let p = serve(&dir, &toml);

    for (accept, want) in [
        ("gzip", Some("gzip")),
        ("br;q=1, gzip;q=0.5", Some("br")),
        ("gzip, deflate, br, zstd", Some("zstd")),
        ("deflate", None),
        ("gzip;q=0, identity", None),
    ] {
        let a = one("127.0.0.1", p.addr, "/big.json", &[("Accept-Encoding", accept)]);
        assert_eq!(a.status, 200);
        assert_eq!(a.header("content-encoding"), want, "Accept-Encoding: {accept}");
        assert_eq!(a.header("vary"), Some("accept-encoding"), "either way, caches must tell them apart");
        assert_eq!(decoded(want, &a.body), page.as_bytes(), "Accept-Encoding: {accept}");
        if want.is_some() {
            assert!(a.body.len() * 5 < page.len(), "{} bytes from {}", a.body.len(), page.len());
            assert_eq!(a.header("etag"), Some("W/\"v1\""), "a compressed body is not byte-identical");
            assert_eq!(a.header("content-length"), None);
        } else {
            assert_eq!(a.header("etag"), Some("\"v1\""));
            assert_eq!(a.header("content-length"), Some(page.len().to_string().as_str()));
        }
    }
    // No Accept-Encoding: as the server sent it.
    let plain = one("127.0.0.1", p.addr, "/big.json", &[]);
    assert_eq!((plain.header("content-encoding"), plain.body.len()), (None, page.len()));

    let gz = [("Accept-Encoding", "gzip")];
    // Too small to gain, not a text type, already encoded, or forbidden to transform: untouched, and no Vary.
    for path in ["/small.json", "/image.png", "/already", "/keep"] {
        let a = one("127.0.0.1", p.addr, path, &gz);
        assert_eq!(a.header("vary"), None, "{path}: {a:?}");
        let seen_encoding = if path == "/already" { Some("gzip") } else { None };
        assert_eq!(a.header("content-encoding"), seen_encoding, "{path}");
    }
    assert_eq!(one("127.0.0.1", p.addr, "/already", &gz).body, b"not really gzip, but the server says so");
    // A body of unknown length is compressed as it streams.
    let c = one("127.0.0.1", p.addr, "/chunked", &gz);
    assert_eq!(c.header("content-encoding"), Some("gzip"));
    assert_eq!(decoded(Some("gzip"), &c.body), vec![b'z'; 12_000]);
}

#[test]
fn bad_compression_settings_are_reported_with_their_lines() {
    let toml = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
                [[routes]]\nservice = \"b\"\n[routes.compress]\ncodings = [\"gzip\", \"deflate\"]\ntypes = [\"html\"]\nstreams_max = 0\n\n\
                [services.b]\nservers = [{ addr = \"127.0.0.1:9\" }]\n";
    check_reports(
        "compresscheck",
        toml,
        &[
            "line 7: routes[0].compress.codings: \"deflate\" is not a coding nonstop makes (zstd, br, gzip)",
            "line 8: routes[0].compress.types: \"html\" is not a media type",
            "line 9: routes[0].compress.streams_max: 0 is out of range 1..=1000000",
        ],
    );
}

/// Sends `text` as is on a fresh connection and reads until the proxy closes it (or 10 s pass).
fn send_raw(to: SocketAddr, text: &str) -> Vec<u8> {
    exchange_on(std::net::TcpStream::connect(to).unwrap(), text.as_bytes())
}

fn gzipped(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn brotlied(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut w = brotli::CompressorWriter::new(&mut out, 4096, 9, 20);
        w.write_all(data).unwrap();
    }
    out
}

#[test]
fn static_files_have_types_validators_ranges_index_files_and_precompressed_siblings() {
    let dir = TempDir::new("files");
    let root = dir.path().join("site");
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::write(root.join("index.html"), "<h1>home</h1>\n").unwrap();
    std::fs::write(root.join("docs/index.html"), "<h1>docs</h1>\n").unwrap();
    std::fs::write(root.join("café menu.txt"), "soup\n").unwrap();
    std::fs::write(root.join(".env"), "SECRET=1\n").unwrap();
    let script: String = (0..2000).map(|i| format!("console.log('line {i}');\n")).collect();
    std::fs::write(root.join("app.js"), &script).unwrap();
    std::fs::write(root.join("app.js.br"), brotlied(script.as_bytes())).unwrap();
    std::fs::write(root.join("app.js.gz"), gzipped(script.as_bytes())).unwrap();
    let notes: String = (0..3000).map(|i| format!("note {i}\n")).collect();
    std::fs::write(root.join("notes.txt"), &notes).unwrap();
    // Larger than one read of the file body (64 KiB), and not one byte repeated, so that ranges tell.
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(root.join("data.bin"), &data).unwrap();

    // Only a route of files: no service is needed.
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\npath_prefix = \"/static\"\nstrip_prefix = true\n\
         [routes.files]\nroot = \"{}\"\n\
         [routes.compress]\ncodings = [\"gzip\"]\n\
         [routes.response_headers]\nset = {{ \"Cache-Control\" = \"public, max-age=60\" }}\n\n\
         [access_log]\nenabled = false\n",
        root.display()
    );
    let p = serve(&dir, &toml);
    let get = |path: &str, headers: &[(&str, &str)]| one("127.0.0.1", p.addr, path, headers);

    let home = get("/static/", &[]);
    assert_eq!((home.status, home.body.as_slice()), (200, &b"<h1>home</h1>\n"[..]), "{home:?}");
    assert_eq!(home.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(home.header("cache-control"), Some("public, max-age=60"), "the route's header rules apply");
    assert_eq!(home.header("accept-ranges"), Some("bytes"));
    let etag = home.header("etag").expect("an ETag").to_string();
    let modified = home.header("last-modified").expect("a Last-Modified").to_string();
    assert!(etag.starts_with('"'), "a strong ETag: {etag}");

    // A directory without its slash is redirected to it (the client's path, before strip_prefix), with the query.
    let redirect = get("/static/docs?v=2", &[]);
    assert_eq!((redirect.status, redirect.header("location")), (301, Some("/static/docs/?v=2")), "{redirect:?}");
    assert_eq!(get("/static/docs/", &[]).body, b"<h1>docs</h1>\n");
    let menu = get("/static/caf%C3%A9%20menu.txt", &[]);
    assert_eq!((menu.status, menu.header("content-type")), (200, Some("text/plain; charset=utf-8")));
    assert_eq!(menu.body, b"soup\n");

    // Conditional requests.
    let not_modified = get("/static/index.html", &[("If-None-Match", &etag)]);
    assert_eq!((not_modified.status, not_modified.body.len()), (304, 0), "{not_modified:?}");
    assert_eq!(not_modified.header("etag"), Some(etag.as_str()));
    assert_eq!(get("/static/index.html", &[("If-Modified-Since", &modified)]).status, 304);
    assert_eq!(get("/static/index.html", &[("If-None-Match", "\"stale\"")]).status, 200);
    assert_eq!(get("/static/index.html", &[("If-Match", "\"stale\"")]).status, 412);

    // Ranges.
    let part = get("/static/data.bin", &[("Range", "bytes=70000-70099")]);
    assert_eq!((part.status, part.header("content-range")), (206, Some("bytes 70000-70099/200000")), "{part:?}");
    assert_eq!(part.body, &data[70_000..70_100]);
    let tail = get("/static/data.bin", &[("Range", "bytes=-10")]);
    assert_eq!((tail.status, tail.body.as_slice()), (206, &data[199_990..]));
    let beyond = get("/static/data.bin", &[("Range", "bytes=300000-")]);
    assert_eq!((beyond.status, beyond.header("content-range")), (416, Some("bytes */200000")));
    let data_etag = get("/static/data.bin", &[]).header("etag").unwrap().to_string();
    let current = get("/static/data.bin", &[("Range", "bytes=0-9"), ("If-Range", &data_etag)]);
    assert_eq!((current.status, current.body.as_slice()), (206, &data[..10]));
    let stale = get("/static/data.bin", &[("Range", "bytes=0-9"), ("If-Range", "\"old\"")]);
    assert_eq!((stale.status, stale.body.len()), (200, data.len()), "a changed file is sent whole");
    let whole = get("/static/data.bin", &[]);
    assert_eq!((whole.header("content-type"), whole.body == data), (Some("application/octet-stream"), true));

    // Precompressed siblings, as the client accepts them; never compressed again.
    let br = get("/static/app.js", &[("Accept-Encoding", "gzip;q=0.5, br")]);
    assert_eq!((br.status, br.header("content-encoding")), (200, Some("br")), "{:?}", br.headers);
    assert_eq!(br.body, std::fs::read(root.join("app.js.br")).unwrap(), "the sibling as it is on disk");
    assert_eq!(decoded(Some("br"), &br.body), script.as_bytes());
    assert_eq!(br.header("vary"), Some("accept-encoding"));
    assert_eq!(br.header("content-type"), Some("text/javascript; charset=utf-8"), "the type of app.js, not .br");
    let gz = get("/static/app.js", &[("Accept-Encoding", "gzip")]);
    assert_eq!(gz.header("content-encoding"), Some("gzip"));
    assert_eq!(gz.body, std::fs::read(root.join("app.js.gz")).unwrap());
    let plain = get("/static/app.js", &[]);
    assert_eq!((plain.header("content-encoding"), plain.body.as_slice()), (None, script.as_bytes()));
    assert_eq!(plain.header("vary"), Some("accept-encoding"), "the answer depends on Accept-Encoding");
    let tags = [br.header("etag"), gz.header("etag"), plain.header("etag")];
    assert!(tags[0] != tags[1] && tags[1] != tags[2] && tags[0] != tags[2], "one ETag per representation: {tags:?}");
    // Without a sibling, the route's compression compresses on the fly.
    let fly = get("/static/notes.txt", &[("Accept-Encoding", "gzip")]);
    assert_eq!(fly.header("content-encoding"), Some("gzip"), "{:?}", fly.headers);
    assert_eq!(decoded(Some("gzip"), &fly.body), notes.as_bytes());
    assert!(fly.header("etag").unwrap().starts_with("W/"), "a weak ETag once compressed on the fly");

    // HEAD: the headers of a GET, no body.
    let head = send_raw(p.addr, "HEAD /static/data.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let text = String::from_utf8_lossy(&head).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.to_ascii_lowercase().contains("content-length: 200000\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\n"), "no body after a HEAD's headers: {text}");

    // What is not there, not allowed or hidden.
    let missing = get("/static/nope.txt", &[]);
    assert_eq!(missing.status, 404);
    assert!(error_of(&missing).contains("no file \"/nope.txt\" under the route's root"), "{missing:?}");
    let hidden = get("/static/.env", &[]);
    assert_eq!(hidden.status, 404, "{hidden:?}");
    assert!(!String::from_utf8_lossy(&hidden.body).contains("SECRET"));
    let post =
        send_raw(p.addr, "POST /static/ HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi");
    let (answers, _) = answers(&post);
    assert_eq!(answers[0].status, 405, "{answers:?}");
    assert_eq!(answers[0].header("allow"), Some("GET, HEAD"));
    assert!(error_of(&answers[0]).contains("POST is not served by a route of static files"), "{answers:?}");
}

#[test]
fn no_path_leads_out_of_a_static_root() {
    let dir = TempDir::new("traversal");
    let root = dir.path().join("site");
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(root.join("docs")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(root.join("index.html"), "home\n").unwrap();
    std::fs::write(outside.join("secret.txt"), "TOP SECRET\n").unwrap();
    // Symlinks out of the root (to a directory and to a file), and one that stays inside it.
    std::os::unix::fs::symlink(&outside, root.join("escape")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), root.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink("/etc", root.join("etc")).unwrap();
    std::os::unix::fs::symlink("index.html", root.join("home.html")).unwrap();
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\n[routes.files]\nroot = \"{}\"\nhidden = true\n\n[access_log]\nenabled = false\n",
        root.display()
    );
    let p = serve(&dir, &toml);
    assert_eq!(one("127.0.0.1", p.addr, "/home.html", &[]).body, b"home\n", "a symlink inside the root is served");

    let attacks = [
        "/../outside/secret.txt",
        "/docs/../../outside/secret.txt",
        "/./../outside/secret.txt",
        "//../outside/secret.txt",
        "/%2e%2e/outside/secret.txt",
        "/%2E%2E/outside/secret.txt",
        "/.%2e/outside/secret.txt",
        "/%2e%2e%2foutside%2fsecret.txt",
        "/..%2Foutside%2Fsecret.txt",
        "/docs/..%2f..%2foutside/secret.txt",
        "/..%5coutside%5csecret.txt",
        "/docs/%2e%2e%5c%2e%2e%5coutside%5csecret.txt",
        "/%252e%252e/outside/secret.txt",
        "/%c0%ae%c0%ae/outside/secret.txt",
        "/index.html%00/../../outside/secret.txt",
        "/../../../../../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/escape/secret.txt",
        "/escape/",
        "/leak.txt",
        "/etc/passwd",
        "/etc/hostname",
    ];
    for path in attacks {
        let a = one("127.0.0.1", p.addr, path, &[]);
        let body = String::from_utf8_lossy(&a.body).to_string();
        assert!(matches!(a.status, 400 | 403 | 404), "{path}: {} {body}", a.status);
        assert!(!body.contains("TOP SECRET") && !body.contains("root:"), "{path} leaked: {body}");
        assert_eq!(a.header("location"), None, "{path}: no redirect either");
    }
    // Each refusal says why.
    assert!(error_of(&one("127.0.0.1", p.addr, "/../outside/secret.txt", &[])).contains("\"..\" segment"));
    assert!(error_of(&one("127.0.0.1", p.addr, "/..%2Foutside", &[])).contains("decodes to a slash"));
    let out = one("127.0.0.1", p.addr, "/leak.txt", &[]);
    assert_eq!(out.status, 403);
    assert!(error_of(&out).contains("leads out of the route's root"), "{out:?}");
    // The proxy is still serving.
    assert_eq!(one("127.0.0.1", p.addr, "/", &[]).body, b"home\n");
}

#[test]
fn bad_static_file_settings_are_all_reported_with_their_lines() {
    let dir = TempDir::new("filescheck");
    let file = dir.path().join("plain.txt");
    std::fs::write(&file, "x").unwrap();
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\n[routes.files]\nroot = \"/nonexistent/nonstop-site\"\nindex = [\"a/b.html\"]\n\n\
         [[routes]]\npath_prefix = \"/b\"\nservice = \"b\"\n[routes.files]\nroot = \"{}\"\n\n\
         [[routes]]\npath_prefix = \"/c\"\nqueue = \"q\"\n[routes.files]\nroot = \"{}\"\nlisting = true\n\n\
         [services.b]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n",
        file.display(),
        dir.path().display()
    );
    check_reports(
        "filescheck",
        &toml,
        &[
            "line 6: routes[0].files.root: cannot use /nonexistent/nonstop-site as the root of static files",
            "line 7: routes[0].files.index: \"a/b.html\" must be a file name, without a slash",
            "routes[1].files: a route sends to a service or serves files, not both",
            "is not a directory",
            "routes[2].queue: a route of static files has no service to deliver queued requests to",
            "line 20: routes[2].files.listing: unknown key",
        ],
    );
}

fn basic(user_password: &str) -> String {
    use std::fmt::Write as _;
    // Base64 by hand, so that the test does not share the proxy's decoder.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = user_password.as_bytes();
    let mut out = String::from("Basic ");
    for c in b.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.write_char(A[((n >> (18 - 6 * i)) & 63) as usize] as char).unwrap();
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `nonstop hash-password` of `password`, as a user would make the hash.
fn hash_password(password: &str) -> String {
    let mut child = Command::new(bin())
        .arg("hash-password")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(format!("{password}\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let hash = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    hash
}

#[test]
fn basic_auth_lets_in_only_users_whose_password_matches_its_hash() {
    let dir = TempDir::new("basicauth");
    let backend = RawBackend::start(|_| ok());
    let alice = hash_password("wonder land");
    // bob's is bcrypt, in an htpasswd file as `htpasswd -B` writes it ($2y$).
    let bob = bcrypt::hash_with_result("builder", 5).unwrap().format_for_version(bcrypt::Version::TwoY);
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("# staff\nbob:{bob}\n")).unwrap();
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nservice = \"b\"\npath_prefix = \"/admin\"\n\
         [routes.basic_auth]\nrealm = \"staff only\"\nusers = {{ alice = \"{alice}\" }}\nusers_file = \"{}\"\n\n\
         [[routes]]\nservice = \"b\"\n\n\
         [services.b]\nservers = [{{ addr = \"{}\" }}]\n\n[access_log]\nenabled = false\n",
        htpasswd.display(),
        backend.addr
    );
    let p = serve(&dir, &toml);
    let get = |path: &str, auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        one("127.0.0.1", p.addr, path, &headers)
    };

    let none = get("/admin/", None);
    assert_eq!(none.status, 401, "{none:?}");
    assert_eq!(none.header("www-authenticate"), Some("Basic realm=\"staff only\", charset=\"UTF-8\""));
    assert!(error_of(&none).contains("credentials are required"), "{none:?}");
    for (auth, why) in [
        (basic("alice:wonderland"), "wrong user name or password"),
        (basic("alice:"), "wrong user name or password"),
        (basic("mallory:wonder land"), "wrong user name or password"),
        (basic("bob:wonder land"), "wrong user name or password"),
        ("Bearer abc".to_string(), "not of the Basic scheme"),
        ("Basic %%%".to_string(), "not base64"),
    ] {
        let a = get("/admin/x", Some(&auth));
        assert_eq!(a.status, 401, "{auth}: {a:?}");
        assert!(error_of(&a).contains(why), "{auth}: {}", error_of(&a));
        assert!(a.header("www-authenticate").is_some());
    }
    assert!(backend.seen().is_empty(), "nothing refused reached the server");

    // The right passwords, argon2 and bcrypt; then many requests of a user who passed (remembered, not rehashed).
    let a = basic("alice:wonder land");
    assert_eq!(get("/admin/a", Some(&a)).status, 200);
    assert_eq!(get("/admin/b", Some(&basic("bob:builder"))).status, 200);
    let paths: Vec<String> = (0..50).map(|i| format!("/admin/n{i}")).collect();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let many = get_from("127.0.0.1", p.addr, &refs, &[("Authorization", &a)]);
    assert!(many.iter().all(|r| r.status == 200), "{:?}", many.iter().map(|r| r.status).collect::<Vec<_>>());
    // The server gets the Authorization header as sent; routes without basic_auth are open.
    let seen = backend.seen();
    assert_eq!(seen.len(), 52);
    assert_eq!(seen[0].headers("authorization"), [a]);
    assert_eq!(get("/public", None).status, 200);
}

#[test]
fn bad_basic_auth_settings_are_all_reported_with_their_lines() {
    let dir = TempDir::new("basiccheck");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, "carol:$apr1$salt$hash\ndave\n").unwrap();
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nservice = \"b\"\n[routes.basic_auth]\nrealm = \"say \\\"hi\\\"\"\nusers = {{ alice = \"secret\" }}\nusers_file = \"{}\"\n\n\
         [[routes]]\nservice = \"b\"\npath_prefix = \"/x\"\n[routes.basic_auth]\nverifying_max = 0\n\n\
         [[routes]]\nservice = \"b\"\npath_prefix = \"/y\"\n[routes.basic_auth]\nusers_file = \"/nonexistent/htpasswd\"\n\n\
         [services.b]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n",
        htpasswd.display()
    );
    check_reports(
        "basiccheck",
        &toml,
        &[
            "line 7: routes[0].basic_auth.realm: \"say \\\"hi\\\"\": a realm is a non-empty text without quotes",
            "line 8: routes[0].basic_auth.users: alice: not a password hash (a password must never be written in the clear)",
            "line 9: routes[0].basic_auth.users_file:",
            "htpasswd line 1: user \"carol\": Apache's MD5 ($apr1$) is too weak to accept",
            "htpasswd line 2: not of the form USER:HASH",
            "routes[1].basic_auth: no users",
            "line 15: routes[1].basic_auth.verifying_max: 0 is out of range 1..=1024",
            "routes[2].basic_auth.users_file: cannot read /nonexistent/htpasswd",
        ],
    );
}

#[test]
fn forward_auth_asks_a_service_first_and_relays_its_refusals() {
    let dir = TempDir::new("forwardauth");
    let reply = |head: &str, body: &str| {
        nonstop_testkit::raw::Reply::Bytes(
            format!("HTTP/1.1 {head}\r\ncontent-length: {}\r\n\r\n{body}", body.len()).into_bytes(),
        )
    };
    let auth = RawBackend::start(move |seen| match seen.headers("authorization").first().map(String::as_str) {
        Some("Bearer good") => reply("200 OK\r\nx-user: alice\r\nx-role: admin", "yes"),
        Some("Bearer banned") => reply("403 Forbidden\r\ncontent-type: text/plain", "you are banned"),
        _ => reply("302 Found\r\nlocation: /login", ""),
    });
    let app = RawBackend::start(|_| ok());
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
         [[routes]]\nservice = \"app\"\npath_prefix = \"/app\"\n\
         [routes.forward_auth]\nservice = \"auth\"\npath = \"/verify?site=1\"\ncopy_headers = [\"X-User\", \"X-Role\"]\n\n\
         [[routes]]\nservice = \"app\"\npath_prefix = \"/broken\"\n[routes.forward_auth]\nservice = \"gone\"\n\n\
         [[routes]]\nservice = \"app\"\n\n\
         [services.app]\nservers = [{{ addr = \"{}\" }}]\n\
         [services.auth]\nservers = [{{ addr = \"{}\" }}]\n\
         [services.gone]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\nconnect_timeout_ms = 200\nrequest_timeout_ms = 1000\nadmission = {{ queue_wait_ms_max = 500 }}\n\n\
         [access_log]\nenabled = false\n",
        app.addr, auth.addr
    );
    let p = serve(&dir, &toml);

    // No token: the auth service's redirect to its login goes to the client; the app never hears of it.
    let login = one("127.0.0.1", p.addr, "/app/page?q=1", &[]);
    assert_eq!((login.status, login.header("location")), (302, Some("/login")), "{login:?}");
    let asked = auth.seen();
    assert_eq!(asked.len(), 1);
    assert!(asked[0].line().starts_with("GET /verify?site=1 "), "{}", asked[0].line());
    assert_eq!(asked[0].headers("x-forwarded-method"), ["GET"]);
    assert_eq!(asked[0].headers("x-forwarded-uri"), ["/app/page?q=1"]);
    assert_eq!(asked[0].headers("x-forwarded-host"), ["site.test"]);
    assert_eq!(asked[0].headers("x-forwarded-for"), ["127.0.0.1"]);
    let banned = one("127.0.0.1", p.addr, "/app/page", &[("Authorization", "Bearer banned")]);
    assert_eq!((banned.status, banned.body.as_slice()), (403, &b"you are banned"[..]));
    assert!(app.seen().is_empty(), "nothing refused reached the app");

    // A good token: through, with who the service says it is, whatever the client claims.
    let good = [("Authorization", "Bearer good"), ("X-User", "root")];
    assert_eq!(one("127.0.0.1", p.addr, "/app/page", &good).status, 200);
    let body = "order=1";
    let post = format!(
        "POST /app/orders HTTP/1.1\r\nHost: site.test\r\nAuthorization: Bearer good\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let (answers, _) = answers(&send_raw(p.addr, &post));
    assert_eq!(answers[0].status, 200, "{answers:?}");
    let seen = app.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].headers("x-user"), ["alice"], "the client's own X-User is dropped");
    assert_eq!(seen[0].headers("x-role"), ["admin"]);
    assert_eq!(seen[1].body, body.as_bytes(), "the body goes to the app");
    let last = auth.seen().pop().unwrap();
    assert!(last.line().starts_with("GET "), "the auth service is asked with a GET: {}", last.line());
    assert_eq!(last.headers("x-forwarded-method"), ["POST"]);
    assert!(last.body.is_empty() && last.headers("content-length").is_empty(), "and without the body");

    // An auth service that cannot be reached lets nothing through, and says which service failed.
    let broken = one("127.0.0.1", p.addr, "/broken/x", &[("Authorization", "Bearer good")]);
    assert!(broken.status >= 500, "{broken:?}");
    assert!(error_of(&broken).contains("gone") || error_of(&broken).contains("127.0.0.1:9"), "{}", error_of(&broken));
    assert_eq!(app.seen().len(), 2, "the app never heard of it");
    // Routes without forward_auth are not asked about.
    let before = auth.seen().len();
    assert_eq!(one("127.0.0.1", p.addr, "/open", &[]).status, 200);
    assert_eq!(auth.seen().len(), before);
}

#[test]
fn bad_forward_auth_settings_are_reported_with_their_lines() {
    let toml = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n\
                [[routes]]\nservice = \"b\"\n[routes.forward_auth]\nservice = \"nope\"\npath = \"verify\"\ncopy_headers = [\"Content-Length\"]\n\n\
                [[routes]]\nservice = \"b\"\npath_prefix = \"/x\"\n[routes.forward_auth]\npath = \"/v\"\n\n\
                [services.b]\nservers = [{ addr = \"127.0.0.1:9\" }]\n";
    check_reports(
        "forwardcheck",
        toml,
        &[
            "line 7: routes[0].forward_auth.service: no service named \"nope\" (defined: b)",
            "line 8: routes[0].forward_auth.path: \"verify\" is not a path that starts with /",
            "line 9: routes[0].forward_auth.copy_headers: \"Content-Length\" is not a header name a rule may set",
            "routes[1].forward_auth.service: is required",
        ],
    );
}

/// dnsmasq on 127.0.0.1, answering for the names in its hosts file (TTL 1 s) and nothing else.
struct Dns {
    child: std::process::Child,
    port: u16,
    hosts: std::path::PathBuf,
}

impl Dns {
    fn start(dir: &TempDir, records: &str) -> Dns {
        let bin = "/usr/sbin/dnsmasq";
        assert!(Path::new(bin).exists(), "{bin} is missing: install Debian's dnsmasq-base (.ci/run does)");
        let hosts = dir.path().join("dns-hosts");
        std::fs::write(&hosts, records).unwrap();
        for _ in 0..5 {
            let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut child = Command::new(bin)
                .args([
                    "--keep-in-foreground",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                ])
                .args(["--listen-address=127.0.0.1", "--local-ttl=1", "--user=root", "--pid-file="])
                .arg(format!("--port={port}"))
                .arg(format!("--addn-hosts={}", hosts.display()))
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(300));
            if child.try_wait().unwrap().is_none() {
                return Dns { child, port, hosts };
            }
        }
        panic!("dnsmasq did not start on a free port");
    }

    /// New records, read at once (SIGHUP).
    fn set(&self, records: &str) {
        std::fs::write(&self.hosts, records).unwrap();
        unsafe { libc::kill(self.child.id() as i32, libc::SIGHUP) };
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// GETs `/` from `to` on `threads` threads until `stop` is set (or `count_max` requests, or 60 s), one connection
/// per request; returns (answered 200, failed, the failures' statuses).
fn load_until(
    to: SocketAddr,
    threads: usize,
    count_max: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(usize, usize, Vec<String>)> {
    use std::sync::atomic::Ordering;
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let per = count_max / threads;
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut failed, mut why) = (0, 0, Vec::new());
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && ok + failed < per {
                        let bytes = nonstop_testkit::raw::exchange(
                            to,
                            b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n",
                            Duration::from_secs(10),
                        );
                        match answers(&bytes).0.first() {
                            Some(a) if a.status == 200 => ok += 1,
                            other => {
                                failed += 1;
                                why.push(format!(
                                    "{:?}",
                                    other.map(|a| (a.status, String::from_utf8_lossy(&a.body).to_string()))
                                ));
                            }
                        }
                    }
                    (ok, failed, why)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).fold((0, 0, Vec::new()), |(a, b, mut w), (x, y, z)| {
            w.extend(z);
            (a + x, b + y, w)
        })
    })
}

#[test]
fn a_server_by_name_follows_its_dns_records_under_load_with_no_failed_request() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = TempDir::new("dns");
    // Two servers on one port at two loopback addresses: the name says which.
    let (a, b) = loop {
        let port = std::net::TcpListener::bind("127.0.0.2:0").unwrap().local_addr().unwrap().port();
        let a =
            std::panic::catch_unwind(|| RawBackend::start_on(format!("127.0.0.2:{port}").parse().unwrap(), |_| ok()));
        let b =
            std::panic::catch_unwind(|| RawBackend::start_on(format!("127.0.0.3:{port}").parse().unwrap(), |_| ok()));
        if let (Ok(a), Ok(b)) = (a, b) {
            break (a, b);
        }
    };
    let mut dns = Dns::start(&dir, "127.0.0.2 app.test\n");
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nservice = \"app\"\n\n\
         [services.app]\nservers = [{{ addr = \"app.test:{}\" }}]\n\n\
         [resolver]\nnameservers = [\"127.0.0.1:{}\"]\ninterval_ms = 1000\nttl_min_ms = 200\n\n\
         [access_log]\nenabled = false\n",
        a.addr.port(),
        dns.port
    );
    let p = serve(&dir, &toml);
    // Resolved before the first request.
    assert_eq!(one("127.0.0.1", p.addr, "/", &[]).status, 200);
    assert_eq!((a.seen().len(), b.seen().len()), (1, 0));

    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let load = load_until(p.addr, 4, 40_000, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    assert!(!a.seen().is_empty() && b.seen().is_empty(), "before the change, all to 127.0.0.2");
    dns.set("127.0.0.3 app.test\n");
    // Within the TTL and the interval (1 s each), the new address takes over; the old one takes no new request.
    std::thread::sleep(Duration::from_secs(3));
    let a_after_move = a.seen().len();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (answered, failed, why) = load.join().unwrap();
    assert_eq!(failed, 0, "no request fails while the name moves: {:?}", &why[..why.len().min(5)]);
    assert!(answered > 100, "{answered} requests answered");
    assert!(b.seen().len() > 50, "the new address serves: {}", b.seen().len());
    assert_eq!(a.seen().len(), a_after_move, "the old address took no request once the name moved");

    // A name of two addresses is two servers.
    dns.set("127.0.0.2 app.test\n127.0.0.3 app.test\n");
    std::thread::sleep(Duration::from_secs(3));
    let (a0, b0) = (a.seen().len(), b.seen().len());
    let paths: Vec<String> = (0..40).map(|i| format!("/two/{i}")).collect();
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    for chunk in refs.chunks(4) {
        assert!(get_from("127.0.0.1", p.addr, chunk, &[]).iter().all(|r| r.status == 200));
    }
    assert!(
        a.seen().len() > a0 && b.seen().len() > b0,
        "both addresses serve: {} {}",
        a.seen().len() - a0,
        b.seen().len() - b0
    );

    // The DNS server gone: the last good addresses stay, and requests still succeed.
    dns.stop();
    std::thread::sleep(Duration::from_secs(3));
    for chunk in refs.chunks(4) {
        assert!(get_from("127.0.0.1", p.addr, chunk, &[]).iter().all(|r| r.status == 200));
    }
}

#[test]
fn bad_server_names_and_resolver_settings_are_reported_with_their_lines() {
    let toml = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nservice = \"b\"\n\n\
                [services.b]\nservers = [\n  { addr = \"app_1.internal:80\" },\n  { addr = \"app.internal\" },\n  { addr = \"app.internal:80\" },\n  { addr = \"APP.internal:80\" },\n]\n\n\
                [resolver]\nnameservers = [\"dns.internal\"]\ninterval_ms = 10\n";
    check_reports(
        "dnscheck",
        toml,
        &[
            "line 9: services.b.servers[0].addr: \"app_1.internal:80\" is not an IP address with a port",
            "line 10: services.b.servers[1].addr: \"app.internal\" is not an IP address with a port",
            "server app.internal:80 is listed twice",
            "line 16: resolver.nameservers: \"dns.internal\" is not an IP address",
            "line 17: resolver.interval_ms: 10",
        ],
    );
}

/// GET / over TLS asking for `name`, trusting `roots`: the certificate the proxy presented and its answer.
async fn get_tls(
    addr: SocketAddr,
    name: &str,
    roots: &[nonstop_testkit::tls::CertificateDer<'static>],
    versions: &[&'static nonstop_testkit::tls::rustls::SupportedProtocolVersion],
) -> std::io::Result<(nonstop_testkit::tls::CertificateDer<'static>, Answer)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut s, peer) = nonstop_testkit::tls::try_connect(addr, name, roots, versions).await?;
    s.write_all(format!("GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let (mut got, _) = answers(&out);
    assert_eq!(got.len(), 1, "one answer: {}", String::from_utf8_lossy(&out));
    Ok((peer, got.remove(0)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_picks_certificates_by_name_reloads_them_on_change_and_plain_http_redirects_to_https() {
    use nonstop_testkit::tls::{make_named_cert, rustls::version};
    let both: &[&'static nonstop_testkit::tls::rustls::SupportedProtocolVersion] = &[&version::TLS13, &version::TLS12];
    let dir = TempDir::new("tlsnames");
    let a = make_named_cert(dir.path(), "a", &["a.test", "127.0.0.1"]);
    let b = make_named_cert(dir.path(), "b", &["b.test", "*.b.test"]);
    let c = make_named_cert(dir.path(), "c", &["c.test"]);
    let backend = RawBackend::start(|_| ok());
    let f = |n: &str| dir.path().join(n).display().to_string();
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nredirect_https = true\n\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\nhsts_max_age_s = 31536000\nhsts_subdomains = true\n\
         tls = {{ cert = \"{}\", key = \"{}\", sni = [{{ cert = \"{}\", key = \"{}\" }}], watch_interval_ms = 300 }}\n\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\", min_version = \"1.3\" }}\n\n\
         [[routes]]\nservice = \"b\"\n\n[services.b]\nservers = [{{ addr = \"{}\" }}]\n\n[access_log]\nenabled = false\n",
        f("a.pem"),
        f("a.key"),
        f("b.pem"),
        f("b.key"),
        f("c.pem"),
        f("c.key"),
        backend.addr
    );
    let p = serve(&dir, &toml);
    let addrs = p.addrs();
    let (plain, tls, tls13) = (addrs[0], addrs[1], addrs[2]);
    let roots = [a.clone(), b.clone()];

    // By name: each name gets the certificate valid for it; no name (an IP address) or another name, the default.
    let (peer, answer) = get_tls(tls, "b.test", &roots, both).await.unwrap();
    assert_eq!((peer == b, answer.status), (true, 200));
    assert_eq!(answer.header("strict-transport-security"), Some("max-age=31536000; includeSubDomains"));
    assert!(get_tls(tls, "api.b.test", &roots, both).await.unwrap().0 == b, "a wildcard name");
    assert!(get_tls(tls, "a.test", &roots, both).await.unwrap().0 == a);
    assert!(get_tls(tls, "127.0.0.1", &roots, both).await.unwrap().0 == a, "no SNI: the default");
    assert!(
        get_tls(tls, "zzz.test", &roots, both).await.is_err(),
        "an unknown name gets the default, which is not valid for it"
    );
    // TLS 1.2 is offered by default, and refused where min_version is 1.3.
    assert_eq!(get_tls(tls, "a.test", &roots, &[&version::TLS12]).await.unwrap().1.status, 200);
    assert!(get_tls(tls13, "c.test", std::slice::from_ref(&c), &[&version::TLS12]).await.is_err(), "no TLS 1.2 there");
    let (_, a13) = get_tls(tls13, "c.test", std::slice::from_ref(&c), &[&version::TLS13]).await.unwrap();
    assert_eq!((a13.status, a13.header("strict-transport-security")), (200, None), "no HSTS unless set");

    // A renewed certificate is served to new connections; one opened before keeps working.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut open, _) = nonstop_testkit::tls::try_connect(tls, "b.test", &roots, both).await.unwrap();
    let b2 = make_named_cert(dir.path(), "b", &["b.test", "*.b.test"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((peer, _)) = get_tls(tls, "b.test", std::slice::from_ref(&b2), both).await {
            assert!(peer == b2);
            break;
        }
        assert!(Instant::now() < deadline, "the renewed certificate was not loaded within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        get_tls(tls, "b.test", std::slice::from_ref(&b), both).await.is_err(),
        "the old certificate is no longer served"
    );
    open.write_all(b"GET /still HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), open.read_to_end(&mut out)).await;
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "a connection from before the renewal: {}",
        String::from_utf8_lossy(&out)
    );
    // A broken renewal (a key that is not the certificate's) keeps the certificate in use.
    std::fs::copy(dir.path().join("c.key"), dir.path().join("b.key")).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(get_tls(tls, "b.test", std::slice::from_ref(&b2), both).await.unwrap().0 == b2, "still the last good one");

    // Plain HTTP: 308 to the same URL on https, at the TLS listener's port; the server never hears of it.
    let before = backend.seen().len();
    let r = one("127.0.0.1", plain, "/shop/cart?id=7", &[]);
    assert_eq!(r.status, 308, "{r:?}");
    assert_eq!(r.header("location"), Some(format!("https://site.test:{}/shop/cart?id=7", tls.port()).as_str()));
    assert_eq!(backend.seen().len(), before);
}

#[test]
fn bad_tls_and_https_settings_are_reported_with_their_lines() {
    let dir = TempDir::new("tlscheck");
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nhsts_max_age_s = 600\n\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\nredirect_https = true\n\
         tls = {{ cert = \"{0}/none.pem\", key = \"{0}/none.key\", min_version = \"1.1\", sni = [{{ cert = \"x.pem\" }}] }}\n\n\
         [[routes]]\nservice = \"b\"\n\n[services.b]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n",
        dir.path().display()
    );
    check_reports(
        "tlscheck",
        &toml,
        &[
            "line 3: listeners[0].hsts_max_age_s: HSTS is only for a TLS listener",
            "line 7: listeners[1].redirect_https: a TLS listener cannot redirect to itself",
            "listeners[1].tls.min_version: \"1.1\": the oldest TLS version is \"1.2\" or \"1.3\"",
            "listeners[1].tls.sni[0].key: is required",
        ],
    );
}

#[test]
fn a_proxy_protocol_listener_takes_the_client_address_from_the_header_v1_and_v2() {
    let dir = TempDir::new("proxyproto");
    let backend = RawBackend::start(|_| ok());
    let toml = format!(
        "[[listeners]]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\nheader_read_timeout_ms = 1000\n\n\
         [[listeners]]\nlisten = \"127.0.0.1:0\"\nproxy_protocol = true\ntrusted_proxies = [\"127.0.0.9\"]\n\n\
         [[routes]]\nservice = \"b\"\n[routes.access]\ndeny = [\"192.0.2.0/24\"]\n\n\
         [services.b]\nservers = [{{ addr = \"{}\" }}]\n\n[access_log]\nenabled = false\n",
        backend.addr
    );
    let p = serve(&dir, &toml);
    let (open, trusting) = (p.addrs()[0], p.addrs()[1]);
    let get = "GET /pp HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n";
    let answer = |bytes: Vec<u8>| answers(&bytes).0.into_iter().next();

    // v1: the client is the header's source; the server gets it in X-Forwarded-For.
    let a = answer(send_raw(open, &format!("PROXY TCP4 10.1.2.3 127.0.0.1 5555 80\r\n{get}"))).expect("an answer");
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(backend.seen().last().unwrap().headers("x-forwarded-for"), ["10.1.2.3"]);
    // v2 (binary), from a client the route denies: 403 naming it.
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    v2.extend_from_slice(&[192, 0, 2, 7, 127, 0, 0, 1]);
    v2.extend_from_slice(&4000u16.to_be_bytes());
    v2.extend_from_slice(&80u16.to_be_bytes());
    v2.extend_from_slice(get.as_bytes());
    let denied = answer(exchange_on(std::net::TcpStream::connect(open).unwrap(), &v2)).expect("an answer");
    assert_eq!(denied.status, 403);
    assert!(error_of(&denied).contains("192.0.2.7"), "{}", error_of(&denied));
    // A header split across writes is waited for; UNKNOWN keeps the peer as the client.
    let mut s = std::net::TcpStream::connect(open).unwrap();
    s.write_all(b"PROXY TCP4 10.9.8.7 127.0.0.1 12").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(answer(exchange_on(s, format!("34 80\r\n{get}").as_bytes())).map(|a| a.status), Some(200));
    assert_eq!(backend.seen().last().unwrap().headers("x-forwarded-for"), ["10.9.8.7"]);
    assert_eq!(answer(send_raw(open, &format!("PROXY UNKNOWN\r\n{get}"))).map(|a| a.status), Some(200));
    assert_eq!(backend.seen().last().unwrap().headers("x-forwarded-for"), ["127.0.0.1"]);

    // No header, or a bad one: closed without an answer, and the server hears nothing.
    let before = backend.seen().len();
    assert!(send_raw(open, get).is_empty(), "a plain request on a PROXY protocol listener");
    assert!(send_raw(open, &format!("PROXY TCP4 nonsense\r\n{get}")).is_empty());
    // With trusted_proxies, only they may send a header: 127.0.0.1 is not one.
    assert!(send_raw(trusting, &format!("PROXY TCP4 10.1.2.3 127.0.0.1 5555 80\r\n{get}")).is_empty());
    assert_eq!(backend.seen().len(), before);
    // From a trusted proxy it is taken.
    let header = format!("PROXY TCP4 10.1.2.3 127.0.0.9 5555 80\r\n{get}");
    assert_eq!(
        answer(exchange_on(connect_from("127.0.0.9", trusting), header.as_bytes())).map(|a| a.status),
        Some(200)
    );
    assert_eq!(backend.seen().last().unwrap().headers("x-forwarded-for"), ["10.1.2.3"]);
}
