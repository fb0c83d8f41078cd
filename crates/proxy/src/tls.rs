//! TLS for client listeners: rustls (ring provider) with ALPN offering HTTP/2 and HTTP/1.1, certificates chosen by
//! SNI, the versions offered, and the watch that loads changed certificate files for new connections.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// Why a listener's certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {source}")]
    Cert { path: String, source: rustls::pki_types::pem::Error },
    #[error("certificate file {0} holds no certificate")]
    NoCert(String),
    #[error("cannot read private key {path}: {source}")]
    Key { path: String, source: rustls::pki_types::pem::Error },
    #[error("certificate and key do not make a TLS config: {0}")]
    Config(#[from] rustls::Error),
    #[error("the key {key} is not the key of certificate {cert}: {source}")]
    Mismatch { cert: String, key: String, source: rustls::Error },
}

/// Builds the acceptor for one listener: its certificates (the default, and those chosen by SNI), the TLS
/// versions it offers, and ALPN offering HTTP/2 and HTTP/1.1.
pub fn acceptor(tls: &nonstop_config::Tls) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let default = certified(&provider, &tls.cert, &tls.key)?;
    let sni = tls.sni.iter().map(|c| certified(&provider, &c.cert, &c.key)).collect::<Result<Vec<_>, _>>()?;
    let versions: &[&'static rustls::SupportedProtocolVersion] = match tls.min_version {
        nonstop_config::TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        nonstop_config::TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Certs { default, sni }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// One certificate chain and its key, checked to belong together.
fn certified(
    provider: &rustls::crypto::CryptoProvider,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_path = cert.display().to_string();
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert { path: cert_path.clone(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert_path));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|source| TlsError::Key { path: key.display().to_string(), source })?;
    let signing = provider.key_provider.load_private_key(key_der)?;
    let ck = CertifiedKey::new(certs, signing);
    match ck.keys_match() {
        // A key type that cannot show its public half is taken on trust (the handshake would fail anyway).
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(e) => return Err(TlsError::Mismatch { cert: cert_path, key: key.display().to_string(), source: e }),
    }
    Ok(Arc::new(ck))
}

/// A listener's certificates: the first SNI certificate valid for the name a client asks for, else the default.
#[derive(Debug)]
struct Certs {
    default: Arc<CertifiedKey>,
    sni: Vec<Arc<CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for Certs {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name().and_then(|n| ServerName::try_from(n).ok());
        if let Some(name) = name {
            for ck in &self.sni {
                let valid = ck.cert.first().is_some_and(|end| {
                    webpki::EndEntityCert::try_from(end)
                        .is_ok_and(|e| e.verify_is_valid_for_subject_name(&name).is_ok())
                });
                if valid {
                    return Some(ck.clone());
                }
            }
        }
        Some(self.default.clone())
    }
}

/// Every reason the listener's certificate and key could not be used (for `nonstop check`): a missing or bad
/// certificate does not hide a missing or bad key.
pub fn problems(tls: &nonstop_config::Tls) -> Vec<String> {
    match acceptor(tls) {
        Ok(_) => Vec::new(),
        Err(e @ (TlsError::Cert { .. } | TlsError::NoCert(_))) => {
            let mut out = vec![e.to_string()];
            if let Err(source) = PrivateKeyDer::from_pem_file(&tls.key) {
                out.push(TlsError::Key { path: tls.key.display().to_string(), source }.to_string());
            }
            out
        }
        Err(e) => vec![e.to_string()],
    }
}

/// A file's identity for the watch: its modification time and length (a renewal changes at least one).
type Stamp = Option<(Option<std::time::SystemTime>, u64)>;

fn stamp(path: &std::path::Path) -> Stamp {
    std::fs::metadata(path).ok().map(|m| (m.modified().ok(), m.len()))
}

/// Checks the TLS listeners' certificate and key files every `watch_interval` (the shortest of them); when one
/// changes, loads them all again for new connections. A set that does not load (a key written before its
/// certificate, a bad file) is logged once and the one in use kept; it is tried again at the next change.
pub async fn watch(shared: Arc<crate::Shared>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut seen: std::collections::HashMap<std::path::PathBuf, Stamp> = std::collections::HashMap::new();
    // What was loaded at start is the first baseline, so that a change right after start is not missed.
    for t in shared.snapshot.load().config.listeners.iter().filter_map(|l| l.tls.as_ref()) {
        for f in t.files() {
            seen.insert(f.to_path_buf(), stamp(f));
        }
    }
    loop {
        let snap = shared.snapshot.load_full();
        let watched: Vec<&nonstop_config::Tls> = snap
            .config
            .listeners
            .iter()
            .filter_map(|l| l.tls.as_ref())
            .filter(|t| !t.watch_interval.is_zero())
            .collect();
        let interval = watched.iter().map(|t| t.watch_interval).min().unwrap_or(std::time::Duration::from_secs(1));
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let files: Vec<std::path::PathBuf> =
            watched.iter().flat_map(|t| t.files()).map(std::path::Path::to_path_buf).collect();
        let mut changed = false;
        for f in &files {
            let now = stamp(f);
            if let Some(before) = seen.insert(f.clone(), now) {
                changed |= before != now;
            }
        }
        seen.retain(|f, _| files.contains(f));
        if !changed {
            continue;
        }
        // A renewal writes the certificate and the key one after the other: let it finish.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        for f in &files {
            seen.insert(f.clone(), stamp(f));
        }
        match shared.reload_certificates() {
            Ok(()) => tracing::info!("certificate files changed: loaded for new connections"),
            Err(e) => tracing::warn!(error = %e, "certificate files changed but do not load; keeping the ones in use"),
        }
    }
}
