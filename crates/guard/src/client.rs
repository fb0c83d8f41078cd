//! The client's address: the peer's, unless the peer is a proxy the config trusts, in which case
//! `X-Forwarded-For` says who came before it. The list is read from the right (the hop nearest to us), skipping
//! trusted proxies; the first address that is not one is the client. Anything left of it was written by the
//! client itself and proves nothing, so a client cannot choose its own address by sending the header.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// The client of a request that came from `peer` with these `X-Forwarded-For` header values (in order), given the
/// trusted proxies. A malformed entry ends the walk: the last trusted hop is then taken as the client.
pub fn client_addr<'a>(peer: IpAddr, forwarded_for: impl IntoIterator<Item = &'a str>, trusted: &[IpNet]) -> IpAddr {
    let peer = crate::canonical(peer);
    if !is_trusted(peer, trusted) {
        return peer;
    }
    let entries: Vec<&str> = forwarded_for.into_iter().flat_map(|v| v.split(',')).collect();
    let mut client = peer;
    for entry in entries.iter().rev() {
        match parse_entry(entry) {
            Some(ip) => {
                client = ip;
                if !is_trusted(ip, trusted) {
                    break;
                }
            }
            None => break,
        }
    }
    client
}

fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&ip))
}

/// `1.2.3.4`, `1.2.3.4:5678`, `2001:db8::1` or `[2001:db8::1]:5678`.
fn parse_entry(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(crate::canonical(ip));
    }
    s.parse::<SocketAddr>().ok().map(|a| crate::canonical(a.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn trusted() -> Vec<IpNet> {
        vec![crate::parse_net("10.0.0.0/8").unwrap(), crate::parse_net("127.0.0.1").unwrap()]
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        assert_eq!(client_addr(ip("198.51.100.1"), ["203.0.113.9"], &trusted()), ip("198.51.100.1"));
        assert_eq!(client_addr(ip("198.51.100.1"), [], &[]), ip("198.51.100.1"));
    }

    #[test]
    fn behind_trusted_proxies_the_first_untrusted_hop_from_the_right_is_the_client() {
        let t = trusted();
        // The client forged an entry on the left; our own proxies appended the rest.
        assert_eq!(client_addr(ip("127.0.0.1"), ["6.6.6.6, 203.0.113.9, 10.1.1.1"], &t), ip("203.0.113.9"));
        // Several header lines count as one list, in order.
        assert_eq!(client_addr(ip("10.2.2.2"), ["6.6.6.6", "203.0.113.9:4444"], &t), ip("203.0.113.9"));
        assert_eq!(client_addr(ip("10.2.2.2"), ["[2001:db8::7]:80"], &t), ip("2001:db8::7"));
    }

    #[test]
    fn a_trusted_peer_without_the_header_or_with_only_trusted_hops_is_itself_or_the_leftmost_hop() {
        let t = trusted();
        assert_eq!(client_addr(ip("127.0.0.1"), [], &t), ip("127.0.0.1"));
        assert_eq!(client_addr(ip("127.0.0.1"), ["10.3.3.3, 10.4.4.4"], &t), ip("10.3.3.3"));
    }

    #[test]
    fn a_malformed_entry_stops_the_walk_at_the_last_trusted_hop() {
        let t = trusted();
        assert_eq!(client_addr(ip("127.0.0.1"), ["203.0.113.9, unknown, 10.1.1.1"], &t), ip("10.1.1.1"));
        assert_eq!(client_addr(ip("127.0.0.1"), ["not-an-ip"], &t), ip("127.0.0.1"));
    }

    #[test]
    fn a_mapped_ipv6_peer_is_matched_as_ipv4() {
        assert_eq!(client_addr(ip("::ffff:127.0.0.1"), ["203.0.113.9"], &trusted()), ip("203.0.113.9"));
    }
}
