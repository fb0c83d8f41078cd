//! Which admin requests a web page could have made the operator's browser send, and are refused: a `Host` that is
//! not the admin API's own (DNS rebinding), an `Origin` of another site (CSRF), and a body that is not JSON (the
//! "simple" requests a page may send anywhere without asking first). Pure functions; `admin.rs` applies them.

use std::net::{IpAddr, SocketAddr};

use http::{Method, StatusCode};

/// What the checks look at in one request.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'a> {
    pub method: &'a Method,
    /// The request target's authority when it has one (absolute form), else the `Host` header.
    pub host: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub content_type: Option<&'a str>,
    pub has_body: bool,
}

/// A refused request, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 421: the request names another host, as a rebound DNS name does.
    ForeignHost(String),
    /// 403: the request comes from a page of another origin.
    ForeignOrigin(String),
    /// 415: a body that is not `application/json`.
    NotJson(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::ForeignHost(_) => StatusCode::MISDIRECTED_REQUEST,
            Refusal::ForeignOrigin(_) => StatusCode::FORBIDDEN,
            Refusal::NotJson(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Refusal::ForeignHost(m) | Refusal::ForeignOrigin(m) | Refusal::NotJson(m) => m,
        }
    }
}

/// The checks, in order: Host (skipped when the API has a token, which a browser never adds by itself), Origin,
/// Content-Type. `admin` is the address the admin listener is bound to.
pub fn check(asked: &Asked<'_>, admin: SocketAddr, token: bool) -> Result<(), Refusal> {
    if !token {
        match asked.host {
            None => {
                return Err(Refusal::ForeignHost(format!(
                    "a Host header is required, naming this admin API (such as {})",
                    own_names(admin)
                )))
            }
            Some(host) if !host_allowed(host, admin) => {
                return Err(Refusal::ForeignHost(format!(
                    "Host {host:?} is not this admin API (use {}); refused against DNS rebinding",
                    own_names(admin)
                )))
            }
            Some(_) => {}
        }
    }
    if let Some(origin) = asked.origin {
        if !asked.host.is_some_and(|host| origin_allowed(origin, host)) {
            return Err(Refusal::ForeignOrigin(format!(
                "Origin {origin:?} is not this admin API's own: cross-origin requests are refused"
            )));
        }
    }
    let mutating = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(asked.method);
    // An empty form POST still says what it is: any declared type but JSON is refused, body or not.
    if mutating && (asked.has_body || asked.content_type.is_some()) && !asked.content_type.is_some_and(is_json) {
        let got = asked.content_type.map_or("none".to_string(), |c| format!("{c:?}"));
        return Err(Refusal::NotJson(format!(
            "a {} body must be Content-Type: application/json (got {got})",
            asked.method
        )));
    }
    Ok(())
}

/// The names the admin API answers to without a token, for messages.
fn own_names(admin: SocketAddr) -> String {
    let port = admin.port();
    match admin.ip() {
        ip if ip.is_unspecified() => format!("localhost:{port} or an IP address with port {port}"),
        IpAddr::V4(ip) if ip.is_loopback() => format!("{ip}:{port} or localhost:{port}"),
        _ => format!("{admin}, localhost:{port} or 127.0.0.1:{port}"),
    }
}

/// Whether a `Host` names this admin API: the admin listener's port (80 when none is given) with `localhost`,
/// `127.0.0.1`, `[::1]` or the listener's own IP address; any IP address when it listens on a wildcard. A DNS
/// name other than `localhost` is refused: that is what a rebound name looks like.
pub fn host_allowed(host: &str, admin: SocketAddr) -> bool {
    let Some((name, port)) = split_authority(host) else { return false };
    if port.unwrap_or(80) != admin.port() {
        return false;
    }
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let ip = match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().map(IpAddr::V6),
        None => name.parse::<std::net::Ipv4Addr>().map(IpAddr::V4),
    };
    let Ok(ip) = ip else { return false };
    ip == IpAddr::from([127, 0, 0, 1])
        || ip == IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
        || ip == admin.ip()
        || admin.ip().is_unspecified()
}

/// Whether an `Origin` is the page the request's `Host` serves: `http://` and the same host and port.
pub fn origin_allowed(origin: &str, host: &str) -> bool {
    let Some(authority) = origin.strip_prefix("http://") else { return false };
    match (split_authority(authority), split_authority(host)) {
        (Some((on, op)), Some((hn, hp))) => on.eq_ignore_ascii_case(hn) && op.unwrap_or(80) == hp.unwrap_or(80),
        _ => false,
    }
}

/// `application/json`, with or without parameters such as `charset`.
pub fn is_json(content_type: &str) -> bool {
    content_type.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
}

/// `name[:port]` or `[v6][:port]`; `None` for anything else (a bare IPv6 address, user info, a path, a bad port).
fn split_authority(authority: &str) -> Option<(&str, Option<u16>)> {
    let (name, port) = if authority.starts_with('[') {
        let end = authority.find(']')?;
        let (name, rest) = authority.split_at(end + 1);
        match rest {
            "" => (name, None),
            _ => (name, Some(rest.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            None => (authority, None),
            Some((name, port)) => (name, Some(port)),
        }
    };
    let name_ok = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b".-[]:".contains(&b));
    if !name_ok || (!name.starts_with('[') && name.contains(':')) {
        return None;
    }
    let port = match port {
        None | Some("") => None,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
    };
    Some((name, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "127.0.0.1:9900";

    fn admin(a: &str) -> SocketAddr {
        a.parse().unwrap()
    }

    fn asked<'a>(method: &'a Method, host: Option<&'a str>) -> Asked<'a> {
        Asked { method, host, origin: None, content_type: None, has_body: false }
    }

    #[test]
    fn hosts_are_the_admin_apis_own_names_on_its_port() {
        let a = admin(ADMIN);
        for ok in ["127.0.0.1:9900", "localhost:9900", "LocalHost:9900", "[::1]:9900"] {
            assert!(host_allowed(ok, a), "{ok}");
        }
        for bad in [
            "attacker.example:9900",
            "localhost.attacker.example:9900",
            "127.0.0.1:9901",
            "127.0.0.1",
            "localhost",
            "10.0.0.5:9900",
            "::1:9900",
            "127.0.0.1:99000",
            "127.0.0.1:+9900",
            "user@127.0.0.1:9900",
            "127.0.0.1:9900/x",
            "",
            "[::1",
        ] {
            assert!(!host_allowed(bad, a), "{bad}");
        }
        assert!(host_allowed("localhost", admin("127.0.0.1:80")));
        assert!(host_allowed("localhost:", admin("127.0.0.1:80")));
        // Its own address; on a wildcard, any IP address (which cannot be rebound), but still no other name.
        assert!(host_allowed("10.0.0.5:9900", admin("10.0.0.5:9900")));
        assert!(!host_allowed("10.0.0.6:9900", admin("10.0.0.5:9900")));
        assert!(host_allowed("10.0.0.5:9900", admin("0.0.0.0:9900")));
        assert!(host_allowed("[fe80::1]:9900", admin("[::]:9900")));
        assert!(!host_allowed("proxy.internal:9900", admin("0.0.0.0:9900")));
        assert!(host_allowed("[::1]:9900", admin("[::1]:9900")));
    }

    #[test]
    fn origins_must_be_the_hosts_own_page() {
        assert!(origin_allowed("http://127.0.0.1:9900", "127.0.0.1:9900"));
        assert!(origin_allowed("http://LOCALHOST:9900", "localhost:9900"));
        assert!(origin_allowed("http://localhost", "localhost:80"));
        for bad in [
            "http://evil.example",
            "http://evil.example:9900",
            "null",
            "https://127.0.0.1:9900",
            "http://127.0.0.1:9901",
            "http://localhost:9900",
            "http://127.0.0.1:9900/",
            "",
        ] {
            assert!(!origin_allowed(bad, "127.0.0.1:9900"), "{bad}");
        }
    }

    #[test]
    fn json_content_types() {
        assert!(is_json("application/json"));
        assert!(is_json("Application/JSON; charset=utf-8"));
        assert!(!is_json("text/plain"));
        assert!(!is_json("application/x-www-form-urlencoded"));
        assert!(!is_json("multipart/form-data; boundary=x"));
        assert!(!is_json("application/jsonx"));
    }

    #[test]
    fn checks_apply_in_order_with_their_statuses() {
        let a = admin(ADMIN);
        let (get, post, put, delete) = (Method::GET, Method::POST, Method::PUT, Method::DELETE);
        assert_eq!(check(&asked(&get, Some("127.0.0.1:9900")), a, false), Ok(()));
        let r = check(&asked(&get, Some("evil.example:9900")), a, false).unwrap_err();
        assert_eq!(r.status(), StatusCode::MISDIRECTED_REQUEST);
        assert!(r.message().contains("Host \"evil.example:9900\""), "{}", r.message());
        assert_eq!(check(&asked(&get, None), a, false).unwrap_err().status(), StatusCode::MISDIRECTED_REQUEST);
        // With a token, any name passes the Host check; the Origin and the body type are still checked.
        assert_eq!(check(&asked(&get, Some("proxy.internal:9900")), a, true), Ok(()));

        let cross = Asked { origin: Some("http://evil.example"), ..asked(&post, Some("127.0.0.1:9900")) };
        let r = check(&cross, a, false).unwrap_err();
        assert_eq!((r.status(), r.message().contains("Origin")), (StatusCode::FORBIDDEN, true));
        assert_eq!(check(&cross, a, true).unwrap_err().status(), StatusCode::FORBIDDEN);
        let no_host = Asked { origin: Some("http://127.0.0.1:9900"), ..asked(&get, None) };
        assert_eq!(check(&no_host, a, true).unwrap_err().status(), StatusCode::FORBIDDEN);
        let same = Asked { origin: Some("http://127.0.0.1:9900"), ..asked(&post, Some("127.0.0.1:9900")) };
        assert_eq!(check(&same, a, false), Ok(()));
        // A rebound name is refused for its Host before its (matching) Origin is looked at.
        let rebound = Asked { origin: Some("http://evil.example:9900"), ..asked(&post, Some("evil.example:9900")) };
        assert_eq!(check(&rebound, a, false).unwrap_err().status(), StatusCode::MISDIRECTED_REQUEST);

        let host = Some("127.0.0.1:9900");
        for (method, content_type, has_body, ok) in [
            (&post, Some("text/plain"), true, false),
            (&post, None, true, false),
            (&put, Some("application/x-www-form-urlencoded"), true, false),
            (&delete, Some("text/plain"), true, false),
            (&post, Some("application/json"), true, true),
            (&put, Some("application/json; charset=utf-8"), true, true),
            (&post, None, false, true),
            (&post, Some("text/plain"), false, false),
            (&post, Some("application/x-www-form-urlencoded"), false, false),
            (&get, Some("text/plain"), true, true),
        ] {
            let r = check(&Asked { method, host, origin: None, content_type, has_body }, a, false);
            assert_eq!(r.is_ok(), ok, "{method} {content_type:?} body {has_body}: {r:?}");
            if let Err(r) = r {
                assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
                assert!(r.message().contains("application/json"), "{}", r.message());
            }
        }
    }
}
