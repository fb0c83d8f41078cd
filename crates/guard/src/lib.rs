//! Who may use a route and how often, decided without I/O: [`client`] finds the client's address (the peer, or
//! what trusted proxies in front of it say in `X-Forwarded-For`), [`access`] holds allow and deny lists by CIDR,
//! [`rate`] is a rate limit per client or key (GCRA, bounded in memory), with `now` passed in, and [`basic`] is
//! HTTP Basic authentication against argon2 and bcrypt hashes, and [`proxy_protocol`] reads the client's address
//! from the PROXY protocol header a load balancer sends.
//!
//! The proxy calls these on a route that has `access` or `rate_limit` set, and answers 403 or 429 itself; nothing
//! here reads a clock, a socket or a header map.

pub mod access;
pub mod basic;
pub mod client;
pub mod proxy_protocol;
pub mod rate;

pub use access::AccessList;
pub use client::client_addr;
pub use ipnet::IpNet;
pub use rate::{Limiter, Rate, Verdict};

/// Parses `10.0.0.0/8`, `2001:db8::/32` or a bare address (a /32 or /128), for config files.
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<IpNet>() {
        // `10.1.2.3/8` is almost always a typo for `10.0.0.0/8`: refuse it rather than guess.
        if n.addr() != n.network() {
            return Err(format!("{s:?} has host bits set: the network is {}", n.trunc()));
        }
        return Ok(n);
    }
    match s.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(IpNet::from(ip)),
        Err(_) => Err(format!("{s:?} is not an IP address or a CIDR network (such as 10.0.0.0/8 or 2001:db8::/32)")),
    }
}

/// An IPv4-mapped IPv6 address (`::ffff:10.0.0.1`, as a dual-stack socket reports an IPv4 peer) as IPv4, so that
/// IPv4 rules match it.
pub fn canonical(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_and_bare_addresses_parse_and_host_bits_are_refused() {
        assert_eq!(parse_net("10.0.0.0/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_net(" 127.0.0.2 ").unwrap().to_string(), "127.0.0.2/32");
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        assert_eq!(parse_net("2001:db8::/32").unwrap().to_string(), "2001:db8::/32");
        let e = parse_net("10.1.2.3/8").unwrap_err();
        assert!(e.contains("host bits") && e.contains("10.0.0.0/8"), "{e}");
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("example.com").unwrap_err().contains("not an IP address"));
    }

    #[test]
    fn a_mapped_ipv6_address_is_its_ipv4_address() {
        let ip: std::net::IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(canonical(ip).to_string(), "10.0.0.1");
        let v6: std::net::IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }
}
