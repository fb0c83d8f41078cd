//! TLS for tests: a self-signed certificate for the proxy's listener, and a client that trusts it.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

pub use rustls;
pub use rustls::pki_types::CertificateDer;

use crate::TempDir;

/// Writes a self-signed certificate for localhost and 127.0.0.1 to `dir/cert.pem` and its key to `dir/key.pem`;
/// returns it for the client to trust.
pub fn make_cert(dir: &TempDir) -> CertificateDer<'static> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("generate a certificate");
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).expect("write cert.pem");
    std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem()).expect("write key.pem");
    ck.cert.der().clone()
}

/// The listener's `tls = { cert, key }` line for the files [`make_cert`] wrote.
pub fn listener_line(dir: &TempDir) -> String {
    format!(
        "tls = {{ cert = \"{}\", key = \"{}\" }}",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display()
    )
}

/// Connects to `addr` over TLS as `localhost`, trusting only `cert`, offering `alpn`.
pub async fn connect(
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    alpn: &[u8],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).expect("trust the certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("server name");
    connector.connect(name, tcp).await.expect("TLS handshake")
}

/// Writes a self-signed certificate valid for `names` (DNS names, wildcards or IP addresses) to `dir/STEM.pem` and
/// its key to `dir/STEM.key`; returns it for a client to trust.
pub fn make_named_cert(dir: &std::path::Path, stem: &str, names: &[&str]) -> CertificateDer<'static> {
    let ck = rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .expect("generate a certificate");
    std::fs::write(dir.join(format!("{stem}.pem")), ck.cert.pem()).expect("write the certificate");
    std::fs::write(dir.join(format!("{stem}.key")), ck.signing_key.serialize_pem()).expect("write the key");
    ck.cert.der().clone()
}

/// Connects to `addr` over TLS asking for `name` (as SNI, unless it is an IP address), trusting only `roots`, with
/// these TLS versions; gives the stream and the certificate the server presented, or why the handshake failed.
pub async fn try_connect(
    addr: SocketAddr,
    name: &str,
    roots: &[CertificateDer<'static>],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<(tokio_rustls::client::TlsStream<TcpStream>, CertificateDer<'static>)> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).expect("trust the certificate");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("TLS versions")
        .with_root_certificates(store)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let stream = connector.connect(server_name, tcp).await?;
    let peer = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned().expect("a server certificate");
    Ok((stream, peer))
}
