//! What nginx users reach for on day one, tested on the real `nonstop serve` over real sockets: access lists by
//! client address (with trusted proxies' X-Forwarded-For) and rate limits per client or key. Clients speak from
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

/// Sends `requests` (GETs of these paths, each with `headers`) on one connection from source address `from`,
/// pipelined, the last with `Connection: close`, and parses every answer.
fn get_from(from: &str, to: SocketAddr, paths: &[&str], headers: &[(&str, &str)]) -> Vec<Answer> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let src: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&src.into()).unwrap_or_else(|e| panic!("bind {src}: {e}"));
    socket.connect_timeout(&to.into(), Duration::from_secs(5)).unwrap();
    let mut s: std::net::TcpStream = socket.into();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
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
    s.write_all(bytes.as_bytes()).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut chunk = [0u8; 16 * 1024];
    while Instant::now() < deadline {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
        }
    }
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
