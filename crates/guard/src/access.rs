//! Allow and deny lists of networks: an address in a deny network is refused; when there is an allow list, an
//! address must be in one of its networks. Deny wins, so `allow = ["10.0.0.0/8"]` with `deny = ["10.9.0.0/16"]`
//! lets in all of 10/8 but 10.9/16, whatever the order they are written in.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessList {
    /// Empty: every address not denied is allowed.
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

/// Why an address was refused, for the 403's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It is in this deny network.
    Denied(IpNet),
    /// There is an allow list and it is in none of its networks.
    NotAllowed,
}

impl AccessList {
    /// `Ok` when `ip` may use the route.
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let ip = crate::canonical(ip);
        if let Some(n) = self.deny.iter().find(|n| n.contains(&ip)) {
            return Err(Refusal::Denied(*n));
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|n| n.contains(&ip)) {
            return Err(Refusal::NotAllowed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| crate::parse_net(s).unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn deny_wins_over_allow_and_an_allow_list_refuses_the_rest() {
        let list = AccessList { allow: nets(&["10.0.0.0/8", "::1"]), deny: nets(&["10.9.0.0/16"]) };
        assert_eq!(list.check(ip("10.1.2.3")), Ok(()));
        assert_eq!(list.check(ip("::1")), Ok(()));
        assert_eq!(list.check(ip("10.9.0.1")), Err(Refusal::Denied(nets(&["10.9.0.0/16"])[0])));
        assert_eq!(list.check(ip("11.0.0.1")), Err(Refusal::NotAllowed));
        assert_eq!(list.check(ip("::ffff:10.1.2.3")), Ok(()), "an IPv4-mapped peer matches IPv4 rules");
        assert_eq!(list.check(ip("::ffff:10.9.0.1")), Err(Refusal::Denied(nets(&["10.9.0.0/16"])[0])));
    }

    #[test]
    fn with_no_allow_list_everything_not_denied_passes() {
        let list = AccessList { allow: vec![], deny: nets(&["192.0.2.0/24"]) };
        assert_eq!(list.check(ip("198.51.100.7")), Ok(()));
        assert!(list.check(ip("192.0.2.200")).is_err());
        assert_eq!(AccessList::default().check(ip("203.0.113.1")), Ok(()));
    }
}
