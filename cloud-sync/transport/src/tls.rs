//! Certificates, keys and CRLs from PEM files, and the rustls
//! configurations for both ends: TLS 1.3 only, ring, ALPN `fogline/1`,
//! client certificates required and checked against the fleet CA and its
//! CRL.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fogline_protocol::ALPN;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use super::TransportError;

/// Where the aggregator's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    /// Fleet CA certificate (PEM): node certificates must chain to it.
    pub ca: PathBuf,
    /// The aggregator's certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM). Also the secret the stateless-reset key is
    /// derived from, so resets survive a restart.
    pub key: PathBuf,
    /// Certificate revocation list of the fleet CA (PEM), if any.
    pub crl: Option<PathBuf>,
}

impl ServerTls {
    /// The files, for change detection.
    pub fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.ca.as_path(), &self.cert, &self.key];
        files.extend(self.crl.as_deref());
        files
    }
}

/// What a file looks like now (modification time and size; `None` if it
/// cannot be read): compared between polls to notice replaced certificates.
pub type FileStamp = Option<(std::time::SystemTime, u64)>;

/// The stamps of `paths`.
pub fn stamps(paths: &[&Path]) -> Vec<FileStamp> {
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// Where a node's TLS material is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// Fleet CA certificate (PEM); the aggregator's certificate must chain to it.
    pub ca: PathBuf,
    /// This node's certificate (PEM); its CN is the node id.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

impl ClientTls {
    /// The files, for change detection.
    pub fn files(&self) -> [&Path; 3] {
        [&self.ca, &self.cert, &self.key]
    }
}

fn pem_err(path: &Path, reason: impl std::fmt::Display) -> TransportError {
    TransportError::Pem {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Every `T` block in a PEM file (at least one); `what` names the block
/// in errors.
fn load_all<T: PemObject>(path: &Path, what: &str) -> Result<Vec<T>, TransportError> {
    let bytes = std::fs::read(path).map_err(|e| pem_err(path, e))?;
    let items = T::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(path, format!("not a PEM {what} file: {e}")))?;
    if items.is_empty() {
        return Err(pem_err(path, format!("no {what} block found")));
    }
    Ok(items)
}

/// All certificates in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    load_all(path, "CERTIFICATE")
}

/// The private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TransportError> {
    let bytes = std::fs::read(path).map_err(|e| pem_err(path, e))?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| pem_err(path, format!("no usable private key: {e}")))
}

/// All CRLs in a PEM file (at least one).
pub fn load_crls(
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TransportError> {
    load_all(path, "X509 CRL")
}

fn roots(ca: &Path) -> Result<Arc<rustls::RootCertStore>, TransportError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| pem_err(ca, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The aggregator's TLS configuration: present `cert`/`key`, require a
/// client certificate signed by `ca` and not revoked by `crl`. 0-RTT is
/// accepted (QUIC only; the service reads nothing before the handshake is
/// complete, so replayed early data is never acted on).
pub fn server_rustls(tls: &ServerTls) -> Result<Arc<rustls::ServerConfig>, TransportError> {
    let mut verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(&tls.ca)?, provider());
    if let Some(crl) = &tls.crl {
        verifier = verifier.with_crls(load_crls(crl)?);
    }
    let verifier = verifier.build().map_err(|e| {
        TransportError::Tls(format!(
            "client verifier from {} (CRL {:?}): {e}",
            tls.ca.display(),
            tls.crl
        ))
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)
        .map_err(|e| {
            pem_err(
                &tls.key,
                format!("does not match {}: {e}", tls.cert.display()),
            )
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = u32::MAX;
    Ok(Arc::new(config))
}

/// The node's TLS configuration: trust servers signed by `ca`,
/// authenticate with `cert`/`key`, resume sessions with 0-RTT.
pub fn client_rustls(tls: &ClientTls) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(&tls.ca)?, provider())
            .build()
            .map_err(|e| {
                TransportError::Tls(format!("server verifier from {}: {e}", tls.ca.display()))
            })?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TransportError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FlooredClock { inner }))
        .with_client_auth_cert(load_certs(&tls.cert)?, load_key(&tls.key)?)
        .map_err(|e| {
            pem_err(
                &tls.key,
                format!("does not match {}: {e}", tls.cert.display()),
            )
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = true;
    Ok(Arc::new(config))
}

/// The latest time (ms since the epoch) this node knows has passed: its
/// clock may start far behind after a boot without RTC, but certificates are
/// checked against no earlier than this.
static CLOCK_FLOOR_MS: AtomicU64 = AtomicU64::new(0);

/// Raises the time certificates are checked against to at least `ms` (the
/// node clock's high-water mark: a time this node has already seen).
pub fn raise_clock_floor(ms: u64) {
    CLOCK_FLOOR_MS.fetch_max(ms, Ordering::AcqRel);
}

/// The standard server verifier, asked at the later of the wall clock and
/// [`raise_clock_floor`]'s mark: a gateway booted with its clock behind
/// still accepts an aggregator certificate issued before it last saw the
/// time. The floor is a time that has passed, so no certificate is taken
/// before its validity began.
#[derive(Debug)]
struct FlooredClock {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl rustls::client::danger::ServerCertVerifier for FlooredClock {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &rustls::pki_types::ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let floor = std::time::Duration::from_millis(CLOCK_FLOOR_MS.load(Ordering::Acquire));
        let now = if floor.as_secs() > now.as_secs() {
            rustls::pki_types::UnixTime::since_unix_epoch(floor)
        } else {
            now
        };
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// 32 bytes derived from the aggregator's private key file: the key of its
/// stateless resets and connection ids. The same key file gives the same
/// secret after a restart, so a restarted aggregator can tell nodes of its
/// previous life that their connection is gone (and they believe it).
pub(crate) fn reset_secret(key: &Path) -> Result<[u8; 32], TransportError> {
    let bytes = std::fs::read(key).map_err(|e| pem_err(key, e))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"fogline stateless reset v1\0");
    ctx.update(&bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    Ok(out)
}
