//! Throwaway certificates for local deployments, tests and the demo.

use std::path::Path;

pub use fogline_aggregator::certs::CertError;

/// Everything a local deployment needs in `dir`: a CA, a server certificate
/// for `localhost` and `127.0.0.1`, and one certificate per node. Overwrites.
pub fn dev_bundle(dir: &Path, nodes: &[&str]) -> Result<(), CertError> {
    fogline_aggregator::certs::dev_bundle(dir, nodes)
}
