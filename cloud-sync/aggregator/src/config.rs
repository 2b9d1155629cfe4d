//! `cloud.toml`: the aggregator's configuration.
//!
//! ```toml
//! [quic]
//! listen = "0.0.0.0:7400"        # UDP, where nodes connect
//! [tcp]
//! listen = "0.0.0.0:7400"        # TLS over TCP for networks that block UDP (default: the QUIC address)
//! [tls]
//! ca = "certs/ca.pem"            # fleet CA: node certificates must chain to it
//! cert = "certs/server.pem"
//! key = "certs/server.key"
//! crl = "certs/crl.pem"          # optional; reloaded when it changes
//! [store]
//! path = "data/cloud.db"         # SQLite, created if missing; or, to share
//! # url = "postgres://fogline@db/fogline"  # one PostgreSQL among several aggregators
//! [cluster]
//! name = "agg-1"                 # written on the node leases this aggregator takes
//! [http]
//! listen = "127.0.0.1:7480"      # JSON read API, /metrics, /healthz
//! [limits]
//! node_pending_bytes = 67108864  # batches held per node before its reads pause
//! ```
//!
//! Relative paths are resolved against the directory of the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
    /// TLS over TCP, for nodes whose network blocks UDP.
    #[serde(default)]
    pub tcp: TcpConfig,
    /// Budgets and timeouts of node sessions.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// This aggregator among others on one database.
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// `[cluster]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This aggregator's name, written on the node leases it takes (shown
    /// by `/api/v1/leases`). Default: the host name and process id.
    pub name: Option<String>,
}

impl ClusterConfig {
    /// The configured name, or `<hostname>-<pid>`.
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "aggregator".into());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// `[tcp]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// Serve TLS over TCP. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// TCP address. Default: the QUIC address (same port number).
    pub listen: Option<SocketAddr>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: None,
        }
    }
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Memory of one node's batches received and not yet applied before
    /// reading from it pauses (flow control holds the node back). Default
    /// 64 MiB.
    #[serde(default = "default_node_pending")]
    pub node_pending_bytes: usize,
    /// The same, summed over every node: a node waits its turn (first come,
    /// first served) when it is reached, so one node cannot starve the
    /// others. Default 512 MiB.
    #[serde(default = "default_total_pending")]
    pub total_pending_bytes: usize,
    /// Most records applied in one store transaction. Default 32768.
    #[serde(default = "default_group_records")]
    pub group_records: usize,
    /// A node must finish its handshake and say Hello within this.
    #[serde(default = "default_hello_timeout", with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// A node that pings and has not been heard from for this long is
    /// disconnected. Default 180 s (nodes ping every 60 s when idle).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            node_pending_bytes: default_node_pending(),
            total_pending_bytes: default_total_pending(),
            group_records: default_group_records(),
            hello_timeout: default_hello_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_node_pending() -> usize {
    64 * 1024 * 1024
}
fn default_total_pending() -> usize {
    512 * 1024 * 1024
}
fn default_group_records() -> usize {
    32 * 1024
}
fn default_hello_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(180)
}
fn default_reload_every() -> Duration {
    Duration::from_secs(5)
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
    /// Certificate revocation list of the fleet CA (PEM), written by
    /// `fogline-cloud certs revoke`. Optional.
    pub crl: Option<PathBuf>,
    /// How often the files are checked for changes (a new CRL closes the
    /// revoked nodes' live connections). Default 5 s.
    #[serde(default = "default_reload_every", with = "humantime_serde")]
    pub reload_every: Duration,
}

impl TlsConfig {
    /// The transport's view of it.
    pub fn server_tls(&self) -> fogline_transport::tls::ServerTls {
        fogline_transport::tls::ServerTls {
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            key: self.key.clone(),
            crl: self.crl.clone(),
        }
    }
}

/// `[store]`: `path` (SQLite) or `url` (PostgreSQL), not both.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// SQLite database file.
    pub path: Option<PathBuf>,
    /// PostgreSQL: `postgres://user[:password]@host[:port]/database`.
    pub url: Option<String>,
    /// PostgreSQL connections per aggregator. Default 16.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// PostgreSQL: records whose event time is older than this are dropped,
    /// a whole day's partition at a time. Default: kept for ever.
    #[serde(default, with = "humantime_serde")]
    pub retention: Option<Duration>,
}

/// Which store `[store]` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind<'a> {
    /// SQLite file.
    Sqlite(&'a Path),
    /// PostgreSQL URL.
    Postgres(&'a str),
}

impl StoreConfig {
    /// The store to open (the parse made sure exactly one is set).
    pub fn kind(&self) -> StoreKind<'_> {
        match (&self.path, &self.url) {
            (_, Some(url)) => StoreKind::Postgres(url),
            (Some(path), None) => StoreKind::Sqlite(path),
            (None, None) => StoreKind::Sqlite(Path::new("cloud.db")),
        }
    }

    /// For messages: the file, or the URL without its password.
    pub fn describe(&self) -> String {
        match self.kind() {
            StoreKind::Sqlite(p) => p.display().to_string(),
            StoreKind::Postgres(url) => crate::store::redact_url(url),
        }
    }
}

fn default_pool_size() -> usize {
    16
}

/// `[http]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// TCP address of the read API and `/metrics`. Default `127.0.0.1:7480`.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
    /// Paths that answer without a token: `/healthz`, `/metrics`. Default
    /// none: no token, no data.
    #[serde(default)]
    pub open: Vec<String>,
    /// API tokens (name, scope `read` or `admin`, SHA-256).
    #[serde(default)]
    pub tokens: Vec<crate::http::auth::TokenConfig>,
    /// More tokens, in a file of their own that `fogline-cloud token new`
    /// appends to and the aggregator re-reads when it changes.
    pub tokens_file: Option<PathBuf>,
    /// TLS on the HTTP listener: both files, or neither (plain HTTP).
    pub tls_cert: Option<PathBuf>,
    /// See `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Payload bytes of one page of records, at most (a page always holds
    /// one record if any matches). Default 4 MiB.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Bytes of the latest-value cache (the newest record per stream of
    /// the nodes this aggregator holds, for `/api/v1/latest`). 0: off.
    /// Default 64 MiB.
    #[serde(default = "default_latest_cache_bytes")]
    pub latest_cache_bytes: usize,
}

fn default_latest_cache_bytes() -> usize {
    64 * 1024 * 1024
}

fn default_max_response_bytes() -> usize {
    crate::store::DEFAULT_PAGE_BYTES
}

impl HttpConfig {
    /// Which paths are open.
    pub fn open_paths(&self) -> crate::http::auth::Open {
        crate::http::auth::Open {
            healthz: self.open.iter().any(|p| p == "/healthz"),
            metrics: self.open.iter().any(|p| p == "/metrics"),
        }
    }
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
            open: Vec::new(),
            tokens: Vec::new(),
            tokens_file: None,
            tls_cert: None,
            tls_key: None,
            max_response_bytes: default_max_response_bytes(),
            latest_cache_bytes: default_latest_cache_bytes(),
        }
    }
}

impl CloudConfig {
    /// Parses TOML text; relative paths stay relative to the working directory.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_named(text, "<string>")
    }

    fn parse_named(text: &str, name: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: name.to_string(),
            message: e.to_string(),
        })?;
        let mut problems = Vec::new();
        let l = &config.limits;
        if l.node_pending_bytes < fogline_protocol::MAX_FRAME_BYTES {
            problems.push(format!(
                "limits.node_pending_bytes: {} is below the largest frame ({} bytes)",
                l.node_pending_bytes,
                fogline_protocol::MAX_FRAME_BYTES
            ));
        }
        if l.total_pending_bytes < l.node_pending_bytes {
            problems.push(format!(
                "limits.total_pending_bytes: {} is below limits.node_pending_bytes ({})",
                l.total_pending_bytes, l.node_pending_bytes
            ));
        }
        if l.group_records == 0 {
            problems.push("limits.group_records: must be at least 1".into());
        }
        let st = &config.store;
        match (&st.path, &st.url) {
            (Some(_), Some(_)) => problems
                .push("store: both path (SQLite) and url (PostgreSQL) are set; keep one".into()),
            (None, None) => problems
                .push("store: neither path (SQLite file) nor url (postgres://…) is set".into()),
            (None, Some(url))
                if !url.starts_with("postgres://") && !url.starts_with("postgresql://") =>
            {
                problems.push(format!(
                    "store.url: {:?} is not a postgres:// URL",
                    crate::store::redact_url(url)
                ))
            }
            _ => {}
        }
        if st.pool_size == 0 {
            problems.push("store.pool_size: must be at least 1".into());
        }
        if st.path.is_some() && st.retention.is_some() {
            problems.push(
                "store.retention: only the PostgreSQL store drops old records (SQLite keeps all)"
                    .into(),
            );
        }
        let h = &config.http;
        for p in &h.open {
            if p != "/healthz" && p != "/metrics" {
                problems.push(format!(
                    "http.open: {p:?} cannot be opened; only \"/healthz\" and \"/metrics\" answer without a token"
                ));
            }
        }
        if h.tls_cert.is_some() != h.tls_key.is_some() {
            problems.push("http: tls_cert and tls_key go together (both, or neither)".into());
        }
        if h.max_response_bytes < 1024 {
            problems.push(format!(
                "http.max_response_bytes: {} is below 1024",
                h.max_response_bytes
            ));
        }
        if config.cluster.name.as_deref() == Some("") {
            problems.push("cluster.name: must not be empty".into());
        }
        for (key, d) in [
            ("limits.hello_timeout", l.hello_timeout),
            ("limits.idle_timeout", l.idle_timeout),
            ("tls.reload_every", config.tls.reload_every),
        ] {
            if d.is_zero() {
                problems.push(format!("{key}: must be above zero"));
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Parse {
                path: name.to_string(),
                message: problems.join("; "),
            });
        }
        Ok(config)
    }

    /// The TCP address to serve, if any.
    pub fn tcp_listen(&self) -> Option<SocketAddr> {
        self.tcp
            .enabled
            .then(|| self.tcp.listen.unwrap_or(self.quic.listen))
    }

    /// Reads and parses `path`, resolving relative paths against its directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::parse_named(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        let crl = config.tls.crl.as_mut();
        for p in [
            Some(&mut config.tls.ca),
            Some(&mut config.tls.cert),
            Some(&mut config.tls.key),
            config.store.path.as_mut(),
            config.http.tokens_file.as_mut(),
            config.http.tls_cert.as_mut(),
            config.http.tls_key.as_mut(),
            crl,
        ]
        .into_iter()
        .flatten()
        {
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
    fn the_example_config_parses_with_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cloud.example.toml");
        let c = CloudConfig::parse(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(c.tcp_listen(), Some(c.quic.listen));
        assert_eq!(c.limits.total_pending_bytes, 512 * 1024 * 1024);
        assert_eq!(c.tls.reload_every, Duration::from_secs(5));
    }

    #[test]
    fn the_store_is_a_file_or_a_postgres_url_not_both() {
        let tls = "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n";
        let c = CloudConfig::parse(&format!(
            "{tls}[store]\nurl = \"postgres://fog:pw@db/f\"\nretention = \"30d\"\n[cluster]\nname = \"agg-2\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.store.kind(),
            StoreKind::Postgres("postgres://fog:pw@db/f")
        );
        assert_eq!(c.store.describe(), "postgres://fog:***@db/f");
        assert_eq!(c.store.retention, Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(c.cluster.name(), "agg-2");
        for (store, expected) in [
            (
                "path = \"x\"\nurl = \"postgres://db/f\"",
                "both path (SQLite) and url",
            ),
            ("pool_size = 4", "neither path"),
            (
                "url = \"mysql://db/f\"",
                "store.url: \"mysql://db/f\" is not a postgres:// URL",
            ),
            (
                "url = \"postgres://db/f\"\npool_size = 0",
                "store.pool_size: must be at least 1",
            ),
            (
                "path = \"x\"\nretention = \"1d\"",
                "store.retention: only the PostgreSQL store",
            ),
        ] {
            let err = CloudConfig::parse(&format!("{tls}[store]\n{store}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{store}: {err}");
        }
    }

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
        assert_eq!(c.tcp_listen(), Some(c.quic.listen));
        assert_eq!(c.limits.node_pending_bytes, 64 * 1024 * 1024);
        assert_eq!(c.tls.reload_every, Duration::from_secs(5));

        std::fs::write(
            &path,
            "[tls]\nca = \"a\"\ncert = \"b\"\nkey = \"c\"\n[store]\npath = \"db\"\n[limits]\nnode_pending_bytes = 10\ntotal_pending_bytes = 5\n",
        )
        .unwrap();
        let err = CloudConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("limits.node_pending_bytes: 10 is below the largest frame")
                && err.contains("limits.total_pending_bytes: 5"),
            "{err}"
        );

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
