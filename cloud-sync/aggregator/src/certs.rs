//! Fleet certificates with rcgen: a fleet CA, the aggregator's server
//! certificate and one client certificate per node.
//!
//! The node id *is* the node certificate's subject common name; the
//! aggregator trusts nothing else a node says about itself. Files written to
//! a directory: `ca.pem`/`ca.key`, `server.pem`/`server.key`,
//! `node-<id>.pem`/`node-<id>.key`, `crl.pem`. Keys are created with mode
//! 0600; every file is written to a temporary name and renamed, so a reader
//! (the edge watching its certificate, the aggregator watching its CRL)
//! never sees half a file.
//!
//! Lifetimes: CA 10 years, server and node certificates 1 year (see
//! [`Validity`]); every certificate has a random 127-bit serial, the handle
//! a CRL revokes it by.

use std::io::Write;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer};
use time::{Duration, OffsetDateTime};

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
    /// A certificate or CRL file that cannot be parsed.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A validity period that makes no sense.
    #[error("validity: {0}")]
    Validity(String),
    /// The CRL is gone but the ledger records revocations: writing a new CRL
    /// would silently undo them.
    #[error(
        "{crl} is missing, but {ledger} records {count} earlier revocation(s): writing a new CRL \
         would undo them. Restore {crl} from a backup, or rebuild it from the ledger with \
         `fogline-cloud certs revoke --dir DIR --rebuild`"
    )]
    CrlMissing {
        /// The CRL file.
        crl: PathBuf,
        /// The ledger.
        ledger: PathBuf,
        /// Revocations it records.
        count: usize,
    },
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// Start ([`BACKDATE_DAYS`] in the past by default: gateways without a
    /// real-time clock often boot with theirs behind).
    pub not_before: OffsetDateTime,
    /// End.
    pub not_after: OffsetDateTime,
}

/// Certificates are valid from this many days before they are issued, so
/// a node whose clock is behind by up to that much still accepts them
/// (beyond, the edge checks against the latest time it has seen).
pub const BACKDATE_DAYS: i64 = 2;

/// Default lifetime of the fleet CA.
pub const CA_DAYS: u32 = 3650;
/// Default lifetime of server and node certificates.
pub const LEAF_DAYS: u32 = 365;

impl Validity {
    /// From [`BACKDATE_DAYS`] ago until `days` days from now.
    pub fn days(days: u32) -> Result<Self, CertError> {
        if days == 0 {
            return Err(CertError::Validity("--days must be at least 1".into()));
        }
        let now = OffsetDateTime::now_utc();
        Ok(Self {
            not_before: now - Duration::days(BACKDATE_DAYS),
            not_after: now + Duration::days(i64::from(days)),
        })
    }

    /// An explicit window (tests: expired, not yet valid).
    pub fn between(
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Self, CertError> {
        if not_after <= not_before {
            return Err(CertError::Validity(format!(
                "not_after {not_after} is not after not_before {not_before}"
            )));
        }
        Ok(Self {
            not_before,
            not_after,
        })
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte: DER-canonical as is.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
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
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = opts.open(&tmp).map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn read_file(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Creates a fleet CA (`ca.pem`, `ca.key`) in `dir`, valid for `validity`.
pub fn init_ca(
    dir: &Path,
    fleet_name: &str,
    validity: Validity,
    force: bool,
) -> Result<(), CertError> {
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
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial());
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
    validity: Validity,
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
    params.not_before = validity.not_before;
    params.not_after = validity.not_after;
    params.serial_number = Some(random_serial());
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
pub fn issue_server(
    dir: &Path,
    names: &[String],
    validity: Validity,
    force: bool,
) -> Result<(), CertError> {
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
        validity,
        force,
    )
}

/// Issues a node certificate (`node-<id>.pem`, `node-<id>.key`) whose CN is
/// the node id, signed by the CA in `dir`.
pub fn issue_node(
    dir: &Path,
    node_id: &str,
    validity: Validity,
    force: bool,
) -> Result<(), CertError> {
    validate_node_id(node_id)?;
    issue(
        dir,
        &format!("node-{node_id}"),
        node_id,
        vec![node_id.to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
        validity,
        force,
    )
}

/// Everything a local deployment needs: a CA, a server certificate for
/// `localhost` and `127.0.0.1`, and one certificate per node. Overwrites.
pub fn dev_bundle(dir: &Path, nodes: &[&str]) -> Result<(), CertError> {
    init_ca(dir, "fogline-dev", Validity::days(CA_DAYS)?, true)?;
    let leaf = Validity::days(LEAF_DAYS)?;
    issue_server(dir, &["localhost".into(), "127.0.0.1".into()], leaf, true)?;
    for node in nodes {
        issue_node(dir, node, leaf, true)?;
    }
    Ok(())
}

/// Issues a fresh key and certificate for `node_id` in place of the current
/// ones (the edge picks them up without a restart). The old certificate
/// stays valid until it expires unless revoked.
pub fn renew_node(dir: &Path, node_id: &str, validity: Validity) -> Result<(), CertError> {
    let cert = dir.join(format!("node-{node_id}.pem"));
    if !cert.exists() {
        return Err(CertError::Io {
            path: cert,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no certificate to renew (issue one with `certs node`)",
            ),
        });
    }
    issue_node(dir, node_id, validity, true)
}

/// The serial (hex, as the aggregator logs it) and node id of a
/// certificate file.
pub fn certificate_serial(path: &Path) -> Result<(String, String), CertError> {
    let der = CertificateDer::from_pem_file(path).map_err(|e| CertError::Parse {
        path: path.to_path_buf(),
        reason: format!("not a PEM certificate: {e}"),
    })?;
    let id = fogline_transport::identity::peer_identity(&der)?;
    Ok((id.serial, id.node_id))
}

/// Where the fleet's CRL lives in `dir`.
pub fn crl_path(dir: &Path) -> PathBuf {
    dir.join("crl.pem")
}

fn hex_bytes(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.trim_start_matches("0x");
    if hex.is_empty() || !hex.len().is_multiple_of(2) {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Adds `serials` (hex) to the fleet CRL in `dir` (`crl.pem`, created if
/// missing), signed by the CA, with the next CRL number. Serials already
/// revoked stay revoked. Returns how many serials the CRL now holds.
pub fn revoke(dir: &Path, serials: &[String]) -> Result<usize, CertError> {
    revoke_with(dir, serials, false)
}

/// Where every revocation is also recorded, one `serial unix-time` line
/// each, so a lost CRL can neither shrink the list unnoticed nor stay lost.
pub fn ledger_path(dir: &Path) -> PathBuf {
    dir.join("revoked.txt")
}

/// The ledger's revocations: `(serial hex, unix time)`.
fn read_ledger(dir: &Path) -> Result<Vec<(String, i64)>, CertError> {
    let path = ledger_path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CertError::Io { path, source }),
    };
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        let (Some(serial), Some(at)) = (parts.next(), parts.next()) else {
            return Err(CertError::Parse {
                path: path.clone(),
                reason: format!("line {}: expected `SERIAL UNIX-TIME`", n + 1),
            });
        };
        let at: i64 = at.parse().map_err(|_| CertError::Parse {
            path: path.clone(),
            reason: format!("line {}: `{at}` is not a unix time", n + 1),
        })?;
        out.push((serial.to_lowercase(), at));
    }
    Ok(out)
}

/// [`revoke`]; `rebuild`: write the CRL from the ledger when it is missing.
/// The CRL and the ledger are merged both ways: a revocation recorded in
/// either stays in both, so the list never shrinks.
pub fn revoke_with(dir: &Path, serials: &[String], rebuild: bool) -> Result<usize, CertError> {
    let issuer = load_issuer(dir)?;
    let path = crl_path(dir);
    let now = OffsetDateTime::now_utc();
    let ledger = read_ledger(dir)?;
    if !path.exists() && !ledger.is_empty() && !rebuild {
        return Err(CertError::CrlMissing {
            crl: path,
            ledger: ledger_path(dir),
            count: ledger.len(),
        });
    }
    let mut revoked: Vec<RevokedCertParams> = Vec::new();
    // A rebuilt CRL numbers after anything issued before: the time will do.
    let mut number: u64 = if !path.exists() && !ledger.is_empty() {
        u64::try_from(now.unix_timestamp()).unwrap_or(1)
    } else {
        1
    };
    if path.exists() {
        let der =
            CertificateRevocationListDer::from_pem_file(&path).map_err(|e| CertError::Parse {
                path: path.clone(),
                reason: format!("not a PEM CRL: {e}"),
            })?;
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| CertError::Parse {
            path: path.clone(),
            reason: format!("unparseable CRL: {e}"),
        })?;
        if let Some(n) = crl.crl_number() {
            number = u64::try_from(n.clone())
                .unwrap_or(u64::MAX - 1)
                .saturating_add(1);
        }
        for r in crl.iter_revoked_certificates() {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(r.raw_serial()),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                    .unwrap_or(now),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    let mut known: std::collections::HashSet<String> = revoked
        .iter()
        .map(|r| fogline_transport::identity::serial_hex(r.serial_number.as_ref()))
        .collect();
    for (serial, at) in &ledger {
        let Some(bytes) = hex_bytes(serial) else {
            continue;
        };
        if known.insert(fogline_transport::identity::serial_hex(&bytes)) {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(&bytes),
                revocation_time: OffsetDateTime::from_unix_timestamp(*at).unwrap_or(now),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    for s in serials {
        let bytes = hex_bytes(s).ok_or_else(|| CertError::Parse {
            path: PathBuf::from(s),
            reason: "a serial is an even number of hex digits".into(),
        })?;
        if known.contains(&fogline_transport::identity::serial_hex(&bytes)) {
            continue;
        }
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&bytes),
            revocation_time: now,
            reason_code: Some(RevocationReason::Unspecified),
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + Duration::days(i64::from(LEAF_DAYS)),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let count = params.revoked_certs.len();
    let crl = params
        .signed_by(&issuer)
        .map_err(rc(format!("signing {}", path.display())))?;
    let pem = crl
        .pem()
        .map_err(rc(format!("encoding {}", path.display())))?;
    // The ledger first: a revocation is on record before the CRL says it.
    let mut lines = String::from(
        "# Every revocation: SERIAL UNIX-TIME. Kept by `fogline-cloud certs revoke`.\n",
    );
    for r in &params.revoked_certs {
        lines += &format!(
            "{} {}\n",
            fogline_transport::identity::serial_hex(r.serial_number.as_ref()),
            r.revocation_time.unix_timestamp()
        );
    }
    write_file(&ledger_path(dir), &lines, false, true)?;
    write_file(&path, &pem, false, true)?;
    Ok(count)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_crl_is_an_error_not_a_fresh_start_and_can_be_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        dev_bundle(dir.path(), &["gw-1", "gw-2"]).unwrap();
        let (s1, _) = certificate_serial(&dir.path().join("node-gw-1.pem")).unwrap();
        let (s2, _) = certificate_serial(&dir.path().join("node-gw-2.pem")).unwrap();
        assert_eq!(revoke(dir.path(), std::slice::from_ref(&s1)).unwrap(), 1);
        std::fs::remove_file(crl_path(dir.path())).unwrap();
        let err = revoke(dir.path(), std::slice::from_ref(&s2)).unwrap_err();
        assert!(
            matches!(err, CertError::CrlMissing { count: 1, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--rebuild"), "{err}");
        assert_eq!(
            revoke_with(dir.path(), std::slice::from_ref(&s2), true).unwrap(),
            2
        );
        let crl = CertificateRevocationListDer::from_pem_file(crl_path(dir.path())).unwrap();
        let mut listed = fogline_transport::identity::crl_serials(&crl).unwrap();
        listed.sort();
        let mut want = vec![s1, s2];
        want.sort();
        assert_eq!(listed, want, "nothing earlier was undone");
    }

    #[test]
    fn lifetimes_serials_and_a_crl_that_accumulates() {
        let dir = tempfile::tempdir().unwrap();
        dev_bundle(dir.path(), &["gw-1", "gw-2"]).unwrap();
        let der = CertificateDer::from_pem_file(dir.path().join("node-gw-1.pem")).unwrap();
        let id = fogline_transport::identity::peer_identity(&der).unwrap();
        let days = (id.not_after - id.not_before) / 86_400 - BACKDATE_DAYS;
        assert_eq!(days, i64::from(LEAF_DAYS), "node certificates live a year");
        let (s1, node) = certificate_serial(&dir.path().join("node-gw-1.pem")).unwrap();
        assert_eq!(node, "gw-1");
        let (s2, _) = certificate_serial(&dir.path().join("node-gw-2.pem")).unwrap();
        assert_ne!(s1, s2, "serials are random");
        assert_eq!(revoke(dir.path(), std::slice::from_ref(&s1)).unwrap(), 1);
        assert_eq!(revoke(dir.path(), &[s1.clone(), s2.clone()]).unwrap(), 2);
        let crl = CertificateRevocationListDer::from_pem_file(crl_path(dir.path())).unwrap();
        let mut listed = fogline_transport::identity::crl_serials(&crl).unwrap();
        listed.sort();
        let mut want = vec![s1.clone(), s2];
        want.sort();
        assert_eq!(listed, want);
        let (_, parsed) = x509_parser::parse_x509_crl(&crl).unwrap();
        assert_eq!(parsed.crl_number().map(|n| n.to_string()), Some("2".into()));
        renew_node(dir.path(), "gw-1", Validity::days(30).unwrap()).unwrap();
        let (s3, _) = certificate_serial(&dir.path().join("node-gw-1.pem")).unwrap();
        assert_ne!(s3, s1, "a renewal is a new certificate");
        assert!(renew_node(dir.path(), "nobody", Validity::days(1).unwrap()).is_err());
        assert!(revoke(dir.path(), &["xyz".into()]).is_err());
    }

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
        let v = Validity::days(1).unwrap();
        init_ca(dir.path(), "t", v, false).unwrap();
        assert!(matches!(
            init_ca(dir.path(), "t", v, false),
            Err(CertError::Exists { .. })
        ));
        for bad in ["", "-x", "a/b", "a b", &"x".repeat(65)] {
            assert!(issue_node(dir.path(), bad, v, false).is_err(), "{bad:?}");
        }
        let missing = tempfile::tempdir().unwrap();
        let err = issue_node(missing.path(), "gw", v, false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ca.key"), "{err}");
    }
}
