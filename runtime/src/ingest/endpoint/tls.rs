//! The endpoint's TLS listener configuration (rustls): a server certificate,
//! and optionally client certificates from a CA (their CN is the client's
//! identity).

use std::path::Path;
use std::sync::Arc;

use fogline_transport::tls::{load_certs, load_key};
use rustls::pki_types::CertificateDer;

/// Builds the acceptor for `[broker.tls]`.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
    require_client_cert: bool,
) -> Result<tokio_rustls::TlsAcceptor, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca).map_err(|e| e.to_string())? {
                roots.add(c).map_err(|e| {
                    format!(
                        "broker.tls.client_ca {}: not a usable CA: {e}",
                        ca.display()
                    )
                })?;
            }
            let v = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let v = if require_client_cert {
                v
            } else {
                v.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                v.build()
                    .map_err(|e| format!("broker.tls.client_ca {}: {e}", ca.display()))?,
            )
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder
        .with_single_cert(
            load_certs(cert).map_err(|e| e.to_string())?,
            load_key(key).map_err(|e| e.to_string())?,
        )
        .map_err(|e| {
            format!(
                "broker.tls.key {} does not match broker.tls.cert {}: {e}",
                key.display(),
                cert.display()
            )
        })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// The CN of a verified client certificate, if one was presented.
pub fn client_cn(certs: Option<&[CertificateDer<'static>]>) -> Option<String> {
    let leaf = certs?.first()?;
    fogline_transport::identity::node_id_from_der(leaf).ok()
}
