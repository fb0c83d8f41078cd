//! A small blocking client of the admin API (plain HTTP/1.1 over loopback), for `nonstop queue`, `deploy`,
//! `rollback`, `status` and `demo`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// How long a plain call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a followed deploy may stay silent (its longest step is bounded by the app's timeouts).
const STREAM_SILENCE_MAX: Duration = Duration::from_secs(3600);

fn send(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    // The admin API refuses a body of any other type (a web page could send it one), and a Host that is not its
    // own address (DNS rebinding): name the address actually reached, 127.0.0.1 rather than 0.0.0.0.
    let kind = if body.is_empty() { "" } else { "Content-Type: application/json\r\n" };
    let host = s.peer_addr().unwrap_or(addr);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}{kind}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(s)
}

/// One request; the status and the whole body.
pub fn call(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut s = send(addr, token, method, path, body)?;
    s.set_read_timeout(Some(CALL_TIMEOUT))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let body = if chunked { dechunk(body) } else { body.to_string() };
    Ok((status, body))
}

/// One request whose 2xx answer is a stream of lines (chunked), handed to `on_line` as they come. A non-2xx
/// answer's body is returned whole as the error text.
pub fn stream(
    addr: SocketAddr,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
    mut on_line: impl FnMut(&str),
) -> std::io::Result<Result<(), (u16, String)>> {
    let s = send(addr, token, method, path, body)?;
    s.set_read_timeout(Some(STREAM_SILENCE_MAX))?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    if !(200..300).contains(&status) || !chunked {
        let mut rest = String::new();
        r.read_to_string(&mut rest)?;
        let text = if chunked { dechunk(&rest) } else { rest };
        if (200..300).contains(&status) {
            text.lines().for_each(&mut on_line);
            return Ok(Ok(()));
        }
        return Ok(Err((status, text)));
    }
    let mut pending = String::new();
    loop {
        let mut size = String::new();
        if r.read_line(&mut size)? == 0 {
            break;
        }
        let n = usize::from_str_radix(size.trim(), 16).map_err(|_| std::io::Error::other("bad chunk size"))?;
        if n == 0 {
            break;
        }
        let mut data = vec![0u8; n + 2];
        r.read_exact(&mut data)?;
        pending.push_str(&String::from_utf8_lossy(&data[..n]));
        while let Some(i) = pending.find('\n') {
            let line: String = pending.drain(..=i).collect();
            on_line(line.trim_end());
        }
    }
    if !pending.trim().is_empty() {
        on_line(pending.trim_end());
    }
    Ok(Ok(()))
}

fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Where the admin API is and its token: the options every admin command shares. Precedence: the flag, then the
/// environment variable, then the `[admin]` section of `--config FILE`, then 127.0.0.1:9900.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct AdminConn {
    /// The proxy's admin API [default: the [admin] listen of --config, else 127.0.0.1:9900].
    #[arg(long, env = "NONSTOP_ADMIN", global = true, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Bearer token of the admin API, if it has one. A token given on the command line shows in `ps`: prefer
    /// NONSTOP_TOKEN or --config.
    #[arg(long, env = "NONSTOP_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Read the admin address and token from the [admin] section of this config file (the one serve uses).
    #[arg(long = "config", value_name = "FILE", global = true)]
    pub config: Option<std::path::PathBuf>,
}

/// The admin API to call: its address and token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admin {
    pub addr: SocketAddr,
    pub token: Option<String>,
}

impl AdminConn {
    /// The address and token to use, or why there are none (a bad --config file).
    pub fn resolve(&self) -> Result<Admin, String> {
        let file = match &self.config {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| format!("--config {}: {e}", path.display()))?;
                Some(from_config(&text).map_err(|e| format!("--config {}: {e}", path.display()))?)
            }
        };
        let addr = match (self.admin, &file) {
            (Some(a), _) => a,
            (None, Some(f)) => f.addr.clone().map_err(|e| format!("--config {}: {e}", self.path()))?,
            (None, None) => SocketAddr::from(([127, 0, 0, 1], 9900)),
        };
        let token = self.token.clone().or_else(|| file.and_then(|f| f.token));
        Ok(Admin { addr, token })
    }

    fn path(&self) -> String {
        self.config.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
    }
}

/// What a config file says of its admin API: the address to connect to (or why it cannot be reached this way),
/// and the token.
pub struct FromConfig {
    pub addr: Result<SocketAddr, String>,
    pub token: Option<String>,
}

/// Reads the `[admin]` section of a config file's text.
pub fn from_config(text: &str) -> Result<FromConfig, String> {
    let config = nonstop_config::Config::parse(text).map_err(|e| e.to_string().trim_end().to_string())?;
    let Some(admin) = config.admin else {
        return Err("the file has no [admin] section, so its proxy has no admin API".into());
    };
    let mut addr = admin.listen;
    let addr = if addr.port() == 0 {
        Err("the file's [admin] listen has port 0, chosen when serve starts, so it cannot be reached this way: \
             give --admin (serve prints the address it chose)"
            .to_string())
    } else {
        // A wildcard address is reached on loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        Ok(addr)
    };
    Ok(FromConfig { addr, token: admin.token })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "[[listeners]]\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\nservice = \"s\"\n\n\
                        [services.s]\nservers = [{ addr = \"127.0.0.1:1\" }]\n";

    #[test]
    fn a_wildcard_admin_address_is_reached_on_loopback() {
        let f = from_config(&format!("{BASE}\n[admin]\nlisten = \"0.0.0.0:9911\"\ntoken = \"t0ken\"\n")).unwrap();
        assert_eq!(f.addr.unwrap(), "127.0.0.1:9911".parse().unwrap());
        assert_eq!(f.token.as_deref(), Some("t0ken"));
        let f = from_config(&format!("{BASE}\n[admin]\nlisten = \"[::]:9911\"\ntoken = \"t\"\n")).unwrap();
        assert_eq!(f.addr.unwrap(), "[::1]:9911".parse().unwrap());
    }

    #[test]
    fn port_0_and_no_admin_section_are_errors() {
        let f = from_config(&format!("{BASE}\n[admin]\nlisten = \"127.0.0.1:0\"\n")).unwrap();
        assert!(f.addr.unwrap_err().contains("port 0"));
        assert!(from_config(BASE).err().unwrap().contains("no [admin]"));
        assert!(from_config("listeners = 3").is_err());
    }

    #[test]
    fn the_flag_beats_the_file() {
        let dir = std::env::temp_dir().join(format!("nonstop-admin-conn-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, format!("{BASE}\n[admin]\nlisten = \"127.0.0.1:9912\"\ntoken = \"file\"\n")).unwrap();
        let conn = AdminConn { admin: None, token: None, config: Some(path.clone()) };
        assert_eq!(
            conn.resolve().unwrap(),
            Admin { addr: "127.0.0.1:9912".parse().unwrap(), token: Some("file".into()) }
        );
        let conn =
            AdminConn { admin: Some("127.0.0.1:1".parse().unwrap()), token: Some("flag".into()), config: Some(path) };
        assert_eq!(conn.resolve().unwrap(), Admin { addr: "127.0.0.1:1".parse().unwrap(), token: Some("flag".into()) });
        assert_eq!(AdminConn::default().resolve().unwrap().addr, "127.0.0.1:9900".parse().unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
