//! `cloud.toml`: the aggregator's configuration.
//!
//! ```toml
//! [quic]
//! listen = "0.0.0.0:7400"        # UDP, where nodes connect
//! [tls]
//! ca = "certs/ca.pem"            # fleet CA: node certificates must chain to it
//! cert = "certs/server.pem"
//! key = "certs/server.key"
//! [store]
//! path = "data/cloud.db"         # SQLite, created if missing
//! [http]
//! listen = "127.0.0.1:7480"      # JSON read API, /metrics, /healthz
//! ```
//!
//! Relative paths are resolved against the directory of the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid TOML or not the expected shape (names the key and line).
    #[error("{path}: {message}")]
    Parse {
        /// The file (or `<string>`).
        path: String,
        /// The TOML error, with line and key.
        message: String,
    },
}

/// Aggregator configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// QUIC listener.
    #[serde(default)]
    pub quic: QuicConfig,
    /// TLS material.
    pub tls: TlsConfig,
    /// Where records are stored.
    pub store: StoreConfig,
    /// HTTP read API and metrics.
    #[serde(default)]
    pub http: HttpConfig,
}

/// `[quic]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuicConfig {
    /// UDP address to listen on. Default `0.0.0.0:7400`.
    #[serde(default = "default_quic_listen")]
    pub listen: SocketAddr,
}

/// `[tls]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
}

/// `[store]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database file.
    pub path: PathBuf,
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// TCP address of the read API and `/metrics`. Default `127.0.0.1:7480`.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

fn default_quic_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 7400))
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7480))
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            listen: default_quic_listen(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: default_http_listen(),
        }
    }
}

impl CloudConfig {
    /// Parses TOML text; relative paths stay relative to the working directory.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_named(text, "<string>")
    }

    fn parse_named(text: &str, name: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            message: e.to_string(),
        })
    }

    /// Reads and parses `path`, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::parse_named(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.tls.ca,
            &mut config.tls.cert,
            &mut config.tls.key,
            &mut config.store.path,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_relative_paths_and_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.toml");
        std::fs::write(
            &path,
            "[tls]\nca = \"c/ca.pem\"\ncert = \"c/s.pem\"\nkey = \"/abs/s.key\"\n[store]\npath = \"db\"\n",
        )
        .unwrap();
        let c = CloudConfig::load(&path).unwrap();
        assert_eq!(c.quic.listen.port(), 7400);
        assert_eq!(c.http.listen.port(), 7480);
        assert_eq!(c.tls.ca, dir.path().join("c/ca.pem"));
        assert_eq!(c.tls.key, PathBuf::from("/abs/s.key"));

        std::fs::write(
            &path,
            "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\nkye = 1\n[store]\npath = \"db\"\n",
        )
        .unwrap();
        let err = CloudConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("cloud.toml") && err.contains("kye") && err.contains("line 5"),
            "{err}"
        );
    }
}
