//! The PROXY protocol header (HAProxy's, v1 text or v2 binary) that a load balancer in front sends first on each
//! connection, naming the client it accepted: parsed with the `ppp` crate into how long it is and whose address
//! it carries. The proxy's listener reads exactly that many bytes before HTTP or TLS begins.

use std::net::SocketAddr;

/// The longest header accepted (a v2 header with TLVs such as TLS details and a unique id fits well within it).
pub const HEADER_BYTES_MAX: usize = 1024;

/// What the first bytes of a connection say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not all of the header is here yet.
    Incomplete,
    /// A header of `len` bytes; `source` is the client it names, or `None` for a connection of the load balancer's
    /// own (v2 LOCAL, v1 UNKNOWN: a health check), whose peer is the client.
    Header { len: usize, source: Option<SocketAddr> },
}

/// Parses the start of a connection.
pub fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    use ppp::{v1, v2, HeaderResult, PartialResult};
    let result = HeaderResult::parse(bytes);
    if result.is_incomplete() {
        if bytes.len() >= HEADER_BYTES_MAX {
            return Err(format!("no complete PROXY protocol header in the first {HEADER_BYTES_MAX} bytes"));
        }
        return Ok(Parsed::Incomplete);
    }
    match result {
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
                v1::Addresses::Unknown => None,
            };
            Ok(Parsed::Header { len: h.header.len(), source })
        }
        HeaderResult::V2(Ok(h)) => {
            let source = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                (v2::Command::Proxy, _) => None,
            };
            Ok(Parsed::Header { len: h.len(), source })
        }
        HeaderResult::V1(Err(e)) => Err(format!("not a PROXY protocol header: {e}")),
        HeaderResult::V2(Err(e)) => Err(format!("not a PROXY protocol header: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addrs: &[u8]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
        h.extend_from_slice(addrs);
        h
    }

    #[test]
    fn v1_headers_name_the_client_and_their_length() {
        let line = "PROXY TCP4 10.1.2.3 127.0.0.1 5555 80\r\n";
        let bytes = format!("{line}GET / HTTP/1.1\r\n\r\n");
        let want = Parsed::Header { len: line.len(), source: Some("10.1.2.3:5555".parse().unwrap()) };
        assert_eq!(parse(bytes.as_bytes()), Ok(want));
        let six = "PROXY TCP6 2001:db8::1 ::1 6000 443\r\n";
        assert_eq!(
            parse(six.as_bytes()),
            Ok(Parsed::Header { len: six.len(), source: Some("[2001:db8::1]:6000".parse().unwrap()) })
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Parsed::Header { len: 15, source: None }));
        assert_eq!(parse(b"PROXY TCP4 10.1.2.3 127.0.0.1 55"), Ok(Parsed::Incomplete));
        assert_eq!(parse(b"PRO"), Ok(Parsed::Incomplete));
    }

    #[test]
    fn v2_headers_name_the_client_unless_local() {
        let mut addrs = vec![192, 0, 2, 7, 127, 0, 0, 1];
        addrs.extend_from_slice(&4000u16.to_be_bytes());
        addrs.extend_from_slice(&443u16.to_be_bytes());
        let h = v2(1, 0x11, &addrs);
        let mut bytes = h.clone();
        bytes.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(parse(&bytes), Ok(Parsed::Header { len: h.len(), source: Some("192.0.2.7:4000".parse().unwrap()) }));
        let local = v2(0, 0x00, &[]);
        assert_eq!(parse(&local), Ok(Parsed::Header { len: 16, source: None }));
        assert_eq!(parse(&h[..20]), Ok(Parsed::Incomplete));
    }

    #[test]
    fn anything_else_is_refused() {
        assert!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap_err().contains("not a PROXY protocol header"));
        assert!(parse(b"PROXY TCP9 a b c d\r\n").is_err());
        let long = format!("PROXY TCP4 {}", "1".repeat(HEADER_BYTES_MAX));
        assert!(parse(long.as_bytes()).is_err());
    }
}
