//! Fleet certificates with rcgen: a fleet CA, the aggregator's server
//! certificate and one client certificate per node.
//!
//! The node id *is* the node certificate's subject common name; the
//! aggregator trusts nothing else a node says about itself. Files written to
//! a directory: `ca.pem`/`ca.key`, `server.pem`/`server.key`,
//! `node-<id>.pem`/`node-<id>.key`. Keys are created with mode 0600.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

pub use fogline_transport::identity::{node_id_from_der, validate_node_id, MAX_NODE_ID_BYTES};

/// A certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A file exists and `force` was not given.
    #[error("{path} already exists (pass --force to overwrite)")]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// rcgen refused to generate or parse something.
    #[error("{what}: {source}")]
    Rcgen {
        /// What was being done.
        what: String,
        /// Cause.
        source: rcgen::Error,
    },
    /// A node id that cannot be used, or a certificate without one.
    #[error("{0}")]
    Identity(#[from] fogline_transport::identity::IdentityError),
}

fn rc(what: impl Into<String>) -> impl FnOnce(rcgen::Error) -> CertError {
    let what = what.into();
    move |source| CertError::Rcgen { what, source }
}

fn write_file(path: &Path, contents: &str, private: bool, force: bool) -> Result<(), CertError> {
    if !force && path.exists() {
        return Err(CertError::Exists {
            path: path.to_path_buf(),
        });
    }
    let io = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = opts.open(path).map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

fn read_file(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates a fleet CA (`ca.pem`, `ca.key`) in `dir`.
pub fn init_ca(dir: &Path, fleet_name: &str, force: bool) -> Result<(), CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = KeyPair::generate().map_err(rc("generating the CA key"))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{fleet_name} fleet CA"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params
        .self_signed(&key)
        .map_err(rc("signing the CA certificate"))?;
    write_file(&dir.join("ca.key"), &key.serialize_pem(), true, force)?;
    write_file(&dir.join("ca.pem"), &cert.pem(), false, force)
}

fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>, CertError> {
    let key_path = dir.join("ca.key");
    let cert_path = dir.join("ca.pem");
    let key = KeyPair::from_pem(&read_file(&key_path)?)
        .map_err(rc(format!("reading {}", key_path.display())))?;
    Issuer::from_ca_cert_pem(&read_file(&cert_path)?, key)
        .map_err(rc(format!("reading {}", cert_path.display())))
}

fn issue(
    dir: &Path,
    stem: &str,
    common_name: &str,
    names: Vec<String>,
    usage: ExtendedKeyUsagePurpose,
    force: bool,
) -> Result<(), CertError> {
    let issuer = load_issuer(dir)?;
    let key = KeyPair::generate().map_err(rc("generating a key"))?;
    let mut params =
        CertificateParams::new(names).map_err(rc(format!("subject names for {common_name}")))?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(rc(format!("signing the certificate for {common_name}")))?;
    write_file(
        &dir.join(format!("{stem}.key")),
        &key.serialize_pem(),
        true,
        force,
    )?;
    write_file(&dir.join(format!("{stem}.pem")), &cert.pem(), false, force)
}

/// Issues the aggregator's certificate (`server.pem`, `server.key`) for the
/// given DNS names and IP addresses, signed by the CA in `dir`.
pub fn issue_server(dir: &Path, names: &[String], force: bool) -> Result<(), CertError> {
    let cn = names
        .first()
        .map(String::as_str)
        .unwrap_or("fogline-aggregator");
    issue(
        dir,
        "server",
        cn,
        names.to_vec(),
        ExtendedKeyUsagePurpose::ServerAuth,
        force,
    )
}

/// Issues a node certificate (`node-<id>.pem`, `node-<id>.key`) whose CN is
/// the node id, signed by the CA in `dir`.
pub fn issue_node(dir: &Path, node_id: &str, force: bool) -> Result<(), CertError> {
    validate_node_id(node_id)?;
    issue(
        dir,
        &format!("node-{node_id}"),
        node_id,
        vec![node_id.to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
        force,
    )
}

/// Everything a local deployment needs: a CA, a server certificate for
/// `localhost` and `127.0.0.1`, and one certificate per node. Overwrites.
pub fn dev_bundle(dir: &Path, nodes: &[&str]) -> Result<(), CertError> {
    init_ca(dir, "fogline-dev", true)?;
    issue_server(dir, &["localhost".into(), "127.0.0.1".into()], true)?;
    for node in nodes {
        issue_node(dir, node, true)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    #[test]
    fn bundle_node_id_is_the_common_name() {
        let dir = tempfile::tempdir().unwrap();
        dev_bundle(dir.path(), &["gw-1"]).unwrap();
        let der = CertificateDer::from_pem_file(dir.path().join("node-gw-1.pem")).unwrap();
        assert_eq!(node_id_from_der(&der).unwrap(), "gw-1");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("node-gw-1.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn refuses_to_overwrite_and_bad_ids() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), "t", false).unwrap();
        assert!(matches!(
            init_ca(dir.path(), "t", false),
            Err(CertError::Exists { .. })
        ));
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(issue_node(dir.path(), bad, false).is_err(), "{bad:?}");
        }
        let missing = tempfile::tempdir().unwrap();
        let err = issue_node(missing.path(), "gw", false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.key"), "{err}");
    }
}
