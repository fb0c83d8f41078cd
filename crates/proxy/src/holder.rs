//! Whether a TCP address is already held, and by which process: the check `nonstop serve` makes before it binds
//! its own `SO_REUSEPORT` sockets, which would otherwise share the address with whoever holds it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// `/proc/net/tcp` states that hold a local address: LISTEN, and CLOSE (bound, not listening).
const HOLDING_STATES: [u8; 2] = [0x0A, 0x07];

/// A process that has a socket on the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub command: String,
}

/// Binds `addr` once without `SO_REUSEPORT` (but with `SO_REUSEADDR`, so connections in TIME_WAIT do not count)
/// and lets it go. `Ok(true)`: nobody holds it; `Ok(false)`: in use (any socket bound there, `SO_REUSEPORT` or
/// not, makes this bind fail). Port 0 is never held.
pub fn is_free(addr: SocketAddr) -> std::io::Result<bool> {
    if addr.port() == 0 {
        return Ok(true);
    }
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    match socket.bind(&addr.into()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Ok(false),
        Err(e) => Err(e),
    }
}

/// Who holds `addr`, as far as `/proc` tells: the processes with a listening or bound socket on it. Empty when
/// it cannot be found (another user's processes, another network namespace, no `/proc`).
pub fn find(addr: SocketAddr) -> Vec<Holder> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(
                parse_proc_net_tcp(&text)
                    .into_iter()
                    .filter(|s| HOLDING_STATES.contains(&s.state) && overlaps(s.local, addr))
                    .map(|s| s.inode),
            );
        }
    }
    inodes.retain(|&i| i != 0);
    if inodes.is_empty() {
        return Vec::new();
    }
    let own = std::process::id();
    let mut holders = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else { return holders };
    for entry in procs.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if pid == own {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else { continue };
        let holds = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .ok()
                .and_then(|l| socket_inode(l.to_str()?))
                .is_some_and(|inode| inodes.contains(&inode))
        });
        if holds {
            let command = std::fs::read_to_string(entry.path().join("comm"))
                .map(|c| c.trim_end().to_string())
                .unwrap_or_else(|_| "?".into());
            holders.push(Holder { pid, command });
        }
    }
    holders.sort_by_key(|h| h.pid);
    holders
}

/// "held by pid 12 (nonstop)", "held by pid 12 (a), pid 13 (b)", or "held by another process".
pub fn describe(holders: &[Holder]) -> String {
    if holders.is_empty() {
        return "held by another process".into();
    }
    let list: Vec<String> = holders.iter().map(|h| format!("pid {} ({})", h.pid, h.command)).collect();
    format!("held by {}", list.join(", "))
}

/// One socket of `/proc/net/tcp{,6}`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProcSocket {
    local: SocketAddr,
    state: u8,
    inode: u64,
}

/// Parses the text of `/proc/net/tcp` or `/proc/net/tcp6`; lines it cannot read are skipped.
fn parse_proc_net_tcp(text: &str) -> Vec<ProcSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = parse_hex_addr(f.get(1)?)?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let inode = f.get(9)?.parse().ok()?;
            Some(ProcSocket { local, state, inode })
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6). The kernel prints each 32-bit word of the address as
/// a host-order integer, so the words' native bytes are the address bytes; the port is plain hex.
fn parse_hex_addr(raw: &str) -> Option<SocketAddr> {
    let (ip, port) = raw.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| ip.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Whether a socket bound to `held` keeps `wanted` from being bound: same port, and the same address, or either
/// one a wildcard (an IPv4-mapped IPv6 address counts as its IPv4 address).
fn overlaps(held: SocketAddr, wanted: SocketAddr) -> bool {
    let plain = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let (h, w) = (plain(held.ip()), plain(wanted.ip()));
    held.port() == wanted.port() && (h == w || h.is_unspecified() || w.is_unspecified())
}

/// The inode of a descriptor's link text `socket:[12345]`.
fn socket_inode(link: &str) -> Option<u64> {
    link.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parses_proc_net_tcp_lines() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                  0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0 100 0 0 10 0\n   \
                  1: 0100007F:A0B1 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 999 1 0 20 4 30 10 -1\n\
                  garbage\n";
        let ip = u32::from_ne_bytes([127, 0, 0, 1]);
        assert_eq!(format!("{ip:08X}"), if cfg!(target_endian = "little") { "0100007F" } else { "7F000001" });
        let parsed = parse_proc_net_tcp(v4);
        if cfg!(target_endian = "little") {
            assert_eq!(
                parsed,
                [
                    ProcSocket { local: addr("127.0.0.1:8080"), state: 0x0A, inode: 12345 },
                    ProcSocket { local: addr("127.0.0.1:41137"), state: 0x01, inode: 999 },
                ]
            );
        }
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
                  0: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1 0 100 0 0 10 0\n   \
                  1: 0000000000000000FFFF00000100007F:0051 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 778 1 0 100 0 0 10 0\n";
        if cfg!(target_endian = "little") {
            let parsed = parse_proc_net_tcp(v6);
            assert_eq!(parsed[0], ProcSocket { local: addr("[::1]:80"), state: 0x0A, inode: 777 });
            assert_eq!(parsed[1].local, addr("[::ffff:127.0.0.1]:81"));
        }
    }

    #[test]
    fn an_address_overlaps_itself_and_wildcards_on_the_same_port() {
        assert!(overlaps(addr("127.0.0.1:80"), addr("127.0.0.1:80")));
        assert!(overlaps(addr("0.0.0.0:80"), addr("127.0.0.1:80")));
        assert!(overlaps(addr("127.0.0.1:80"), addr("0.0.0.0:80")));
        assert!(overlaps(addr("[::]:80"), addr("127.0.0.1:80")));
        assert!(overlaps(addr("[::ffff:127.0.0.1]:80"), addr("127.0.0.1:80")));
        assert!(!overlaps(addr("127.0.0.1:80"), addr("127.0.0.1:81")));
        assert!(!overlaps(addr("127.0.0.2:80"), addr("127.0.0.1:80")));
        assert!(!overlaps(addr("[::1]:80"), addr("127.0.0.1:80")));
    }

    #[test]
    fn reads_socket_links_and_describes_holders() {
        assert_eq!(socket_inode("socket:[4242]"), Some(4242));
        assert_eq!(socket_inode("pipe:[4242]"), None);
        assert_eq!(socket_inode("/dev/null"), None);
        assert_eq!(describe(&[]), "held by another process");
        let h = |pid, c: &str| Holder { pid, command: c.into() };
        assert_eq!(describe(&[h(12, "nonstop")]), "held by pid 12 (nonstop)");
        assert_eq!(describe(&[h(12, "a"), h(13, "b")]), "held by pid 12 (a), pid 13 (b)");
    }

    #[test]
    fn a_listening_socket_is_found_held_even_with_reuseport() {
        let held = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
        held.set_reuse_address(true).unwrap();
        held.set_reuse_port(true).unwrap();
        held.bind(&addr("127.0.0.1:0").into()).unwrap();
        held.listen(16).unwrap();
        let at = held.local_addr().unwrap().as_socket().unwrap();
        assert!(!is_free(at).unwrap(), "{at} is held by this test");
        assert!(!is_free(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), at.port())).unwrap());
        assert!(is_free(addr("127.0.0.1:0")).unwrap());
        drop(held);
        assert!(is_free(at).unwrap(), "{at} was let go");
    }
}
