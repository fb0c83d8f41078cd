//! TLS for client listeners: rustls (ring provider) with ALPN offering HTTP/2 and HTTP/1.1.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
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
}

/// Builds the acceptor for one listener from its PEM certificate chain and key.
pub fn acceptor(tls: &nonstop_config::Tls) -> Result<TlsAcceptor, TlsError> {
    let cert_path = tls.cert.display().to_string();
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Cert { path: cert_path.clone(), source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert_path));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|source| TlsError::Key { path: tls.key.display().to_string(), source })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
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
