//! Node identity: the node id *is* the subject common name of the node's
//! client certificate. Nothing a node says about itself is trusted.

/// Longest node id accepted, in bytes.
pub const MAX_NODE_ID_BYTES: usize = 64;

/// A certificate does not carry a usable node id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// A node id that cannot be used.
    #[error("invalid node id {id:?}: {reason}")]
    InvalidNodeId {
        /// The id given.
        id: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The certificate has no usable subject common name.
    #[error("certificate has no usable subject common name: {0}")]
    NoCommonName(String),
}

/// Checks a node id: 1–64 bytes of ASCII letters, digits, `.`, `_`, `-`,
/// starting with a letter or digit (it becomes a file name and a DNS name).
pub fn validate_node_id(id: &str) -> Result<(), IdentityError> {
    let bad = |reason| {
        Err(IdentityError::InvalidNodeId {
            id: id.to_string(),
            reason,
        })
    };
    if id.is_empty() {
        return bad("it is empty");
    }
    if id.len() > MAX_NODE_ID_BYTES {
        return bad("it is longer than 64 bytes");
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return bad("only ASCII letters, digits, '.', '_' and '-' are allowed");
    }
    if !id.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return bad("it must start with a letter or digit");
    }
    Ok(())
}

/// The node id carried by a DER client certificate: its subject CN.
pub fn node_id_from_der(der: &[u8]) -> Result<String, IdentityError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::NoCommonName(format!("unparseable certificate: {e}")))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .ok_or_else(|| IdentityError::NoCommonName("subject has no CN".into()))?;
    let id = cn
        .as_str()
        .map_err(|e| IdentityError::NoCommonName(format!("CN is not a string: {e}")))?;
    validate_node_id(id)?;
    Ok(id.to_string())
}

/// What the aggregator knows of a connected node from its certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The node id (subject CN).
    pub node_id: String,
    /// The certificate's serial number, lower-case hex without separators
    /// (as CRLs and `fogline-cloud certs` print it).
    pub serial: String,
    /// Start of validity, seconds since the Unix epoch.
    pub not_before: i64,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
}

/// Reads the node's identity from its DER leaf certificate.
pub fn peer_identity(der: &[u8]) -> Result<PeerIdentity, IdentityError> {
    let node_id = node_id_from_der(der)?;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| IdentityError::NoCommonName(format!("unparseable certificate: {e}")))?;
    let validity = cert.validity();
    Ok(PeerIdentity {
        node_id,
        serial: serial_hex(cert.raw_serial()),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

/// A serial number as lower-case hex, leading zero bytes dropped.
pub fn serial_hex(raw: &[u8]) -> String {
    let trimmed = match raw.iter().position(|b| *b != 0) {
        Some(i) => &raw[i..],
        None => &raw[raw.len().saturating_sub(1)..],
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

/// The serials (as [`serial_hex`]) a DER CRL revokes.
pub fn crl_serials(der: &[u8]) -> Result<Vec<String>, IdentityError> {
    let (_, crl) = x509_parser::parse_x509_crl(der)
        .map_err(|e| IdentityError::NoCommonName(format!("unparseable CRL: {e}")))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| serial_hex(r.raw_serial()))
        .collect())
}
