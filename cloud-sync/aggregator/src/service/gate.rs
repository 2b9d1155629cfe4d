//! Who may stay connected: certificates revoked by the CRL or outside their
//! validity are refused — at the handshake by rustls, and again here for
//! resumed sessions (which skip certificate checks) and for connections
//! already up when a CRL arrives or a certificate expires.

use std::collections::HashSet;
use std::path::Path;
use std::sync::RwLock;

use fogline_transport::identity::{crl_serials, PeerIdentity};
use fogline_transport::tls::load_crls;
use fogline_transport::TransportError;

/// The revoked serials now in force.
#[derive(Debug, Default)]
pub struct Gate {
    revoked: RwLock<HashSet<String>>,
}

/// Reads the serials a CRL file revokes.
pub fn revoked_serials(crl: Option<&Path>) -> Result<HashSet<String>, TransportError> {
    let Some(path) = crl else {
        return Ok(HashSet::new());
    };
    let mut out = HashSet::new();
    for der in load_crls(path)? {
        let serials = crl_serials(&der).map_err(|e| TransportError::Pem {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        out.extend(serials);
    }
    Ok(out)
}

impl Gate {
    /// Puts `revoked` in force.
    pub fn set(&self, revoked: HashSet<String>) {
        if let Ok(mut r) = self.revoked.write() {
            *r = revoked;
        }
    }

    /// Why `peer` may not be connected at `now_s` (seconds since the Unix
    /// epoch), if it may not.
    pub fn refuse(&self, peer: &PeerIdentity, now_s: i64) -> Option<String> {
        if self
            .revoked
            .read()
            .map(|r| r.contains(&peer.serial))
            .unwrap_or(false)
        {
            return Some(format!(
                "certificate {} of node {} is revoked",
                peer.serial, peer.node_id
            ));
        }
        if now_s > peer.not_after {
            return Some(format!(
                "certificate {} of node {} expired {} s ago (not after {})",
                peer.serial,
                peer.node_id,
                now_s - peer.not_after,
                peer.not_after
            ));
        }
        if now_s < peer.not_before {
            return Some(format!(
                "certificate {} of node {} is not valid for another {} s (not before {})",
                peer.serial,
                peer.node_id,
                peer.not_before - now_s,
                peer.not_before
            ));
        }
        None
    }
}
