//! A deployment for tests and benchmarks, as real processes in a temp dir:
//! a `fogline-cloud` aggregator and `fogline-edge` daemons with configs
//! written here, plus small clients for their HTTP endpoints and the store.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::process::{self, Daemon};

/// The bearer token the test deployments' aggregators accept (admin).
pub const TEST_TOKEN: &str = "fgl_test_token_for_the_test_deployments_only";

/// The `[http]` lines that make an aggregator accept [`TEST_TOKEN`].
pub fn test_token_toml() -> String {
    format!(
        "[[http.tokens]]\nname = \"tests\"\nscope = \"admin\"\nsha256 = \"{}\"\n",
        fogline_aggregator::http::auth::digest(TEST_TOKEN)
    )
}

/// `GET path` on 127.0.0.1:`port` (with [`TEST_TOKEN`]; the edge ignores
/// it): status code and body.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {TEST_TOKEN}\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.take(16 << 20).read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The aggregator, as a child process.
pub struct Cloud {
    pub daemon: Daemon,
    pub quic_port: u16,
    pub http_port: u16,
    pub store: PathBuf,
    pub config: PathBuf,
}

impl Cloud {
    /// Writes `dir/cloud.toml` (store `dir/cloud.db`) and starts it.
    pub fn start(dir: &Path, certs: &Path) -> anyhow::Result<Self> {
        let mut cloud = Self::configure(dir, certs)?;
        cloud.daemon.restart()?;
        Ok(cloud)
    }

    /// Writes the config as [`Cloud::start`] does (ports chosen now) without
    /// starting it: `daemon.restart()` starts it later, e.g. once an edge has
    /// built up a backlog it could not send.
    pub fn configure(dir: &Path, certs: &Path) -> anyhow::Result<Self> {
        let store = dir.join("cloud.db");
        let store_toml = format!("[store]\npath = \"{}\"\n", store.display());
        Self::configure_with(dir, certs, store, &store_toml)
    }

    /// One of several aggregators on the PostgreSQL database `url`, named
    /// `name` on the leases it takes; its config and log in `dir`. Started.
    pub fn start_postgres(dir: &Path, certs: &Path, url: &str, name: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let store_toml =
            format!("[store]\nurl = \"{url}\"\npool_size = 4\n[cluster]\nname = \"{name}\"\n");
        let mut cloud = Self::configure_with(dir, certs, PathBuf::new(), &store_toml)?;
        cloud.daemon.restart()?;
        Ok(cloud)
    }

    fn configure_with(
        dir: &Path,
        certs: &Path,
        store: PathBuf,
        store_toml: &str,
    ) -> anyhow::Result<Self> {
        let quic_port = crate::free_udp_tcp_port()?;
        let http_port = crate::free_tcp_port()?;
        let config = dir.join("cloud.toml");
        std::fs::write(
            &config,
            format!(
                "[quic]\nlisten = \"127.0.0.1:{quic_port}\"\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/server.pem\"\nkey = \"{c}/server.key\"\n{store_toml}[http]\nlisten = \"127.0.0.1:{http_port}\"\n{tokens}",
                c = certs.display(),
                tokens = test_token_toml(),
            ),
        )?;
        let daemon = Daemon::spawn_idle(
            "fogline-cloud",
            &["run", "--config", &config.to_string_lossy()],
            &dir.join("cloud.log"),
        );
        Ok(Self {
            daemon,
            quic_port,
            http_port,
            store,
            config,
        })
    }

    /// The node's cursor in the store (0 if unknown or unreadable).
    pub fn cursor(&self, node: &str) -> u64 {
        store_cursor(&self.store, node)
    }

    /// `/healthz`: status code and JSON body.
    pub fn healthz(&self) -> Option<(u16, serde_json::Value)> {
        let (code, body) = http_get(self.http_port, "/healthz")?;
        Some((code, serde_json::from_str(&body).ok()?))
    }

    /// Puts the (not yet started) aggregator's store at `store` instead.
    pub fn move_store(&mut self, store: &Path) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.config)?;
        let old = format!("path = \"{}\"", self.store.display());
        anyhow::ensure!(
            text.contains(&old),
            "no store path in {}",
            self.config.display()
        );
        let new = format!("path = \"{}\"", store.display());
        std::fs::write(&self.config, text.replace(&old, &new))?;
        self.store = store.to_path_buf();
        Ok(())
    }

    /// The nodes connected to it now (`/api/v1/connections`).
    pub fn connected_nodes(&self) -> Vec<String> {
        let Some((200, body)) = http_get(self.http_port, "/api/v1/connections") else {
            return Vec::new();
        };
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some(c.get("node")?.as_str()?.to_string()))
            .collect()
    }

    /// `/api/v1/nodes` as JSON.
    pub fn nodes(&self) -> Option<serde_json::Value> {
        let (code, body) = http_get(self.http_port, "/api/v1/nodes")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }
}

/// The cursor of `node` in an aggregator store file.
pub fn store_cursor(store: &Path, node: &str) -> u64 {
    let Ok(conn) = Connection::open_with_flags(store, OpenFlags::SQLITE_OPEN_READ_ONLY) else {
        return 0;
    };
    let _ = conn.busy_timeout(Duration::from_secs(2));
    conn.query_row("SELECT seq FROM cursors WHERE node = ?1", [node], |r| {
        r.get::<_, i64>(0)
    })
    .optional()
    .ok()
    .flatten()
    .map(|v| v as u64)
    .unwrap_or(0)
}

/// A polling reader of one node's cursor (keeps the store open).
pub struct CursorWatch {
    conn: Connection,
    node: String,
}

impl CursorWatch {
    pub fn open(store: &Path, node: &str) -> anyhow::Result<Self> {
        let conn = Connection::open_with_flags(store, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .with_context(|| format!("opening {}", store.display()))?;
        conn.busy_timeout(Duration::from_secs(2))?;
        Ok(Self {
            conn,
            node: node.to_string(),
        })
    }

    pub fn get(&self) -> u64 {
        self.conn
            .query_row(
                "SELECT seq FROM cursors WHERE node = ?1",
                [&self.node],
                |r| r.get::<_, i64>(0),
            )
            .optional()
            .ok()
            .flatten()
            .map(|v| v as u64)
            .unwrap_or(0)
    }
}

/// `[uplink]` for `node` to the aggregator on `quic_port`, certificates in `certs`.
pub fn uplink_toml(node: &str, certs: &Path, quic_port: u16) -> String {
    format!(
        "[uplink]\nserver = \"127.0.0.1:{quic_port}\"\nserver_name = \"localhost\"\nca = \"{c}/ca.pem\"\ncert = \"{c}/node-{node}.pem\"\nkey = \"{c}/node-{node}.key\"\nreconnect_max = \"500ms\"\n",
        c = certs.display()
    )
}

/// An edge daemon, as a child process.
pub struct Edge {
    pub daemon: Daemon,
    pub config: PathBuf,
    pub http_port: u16,
    pub data_dir: PathBuf,
}

impl Edge {
    /// Writes `dir/edge-<node>.toml` — `[node]` (data in
    /// `dir/edge-<node>`), `[metrics]` on a free port, then `body` verbatim —
    /// and starts it.
    pub fn start(dir: &Path, node: &str, body: &str) -> anyhow::Result<Self> {
        Self::start_with_env(dir, node, body, &[])
    }

    /// [`Edge::start`] with extra environment (e.g. `FAILPOINTS`).
    pub fn start_with_env(
        dir: &Path,
        node: &str,
        body: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::start_in(dir, node, &dir.join(format!("edge-{node}")), "", body, env)
    }

    /// [`Edge::start_with_env`] with the data in `data_dir` (say on a small
    /// tmpfs) and more `[node]` keys (`node_keys` verbatim, e.g.
    /// `shutdown_timeout = "2s"`). The config is still `dir/edge-<node>.toml`
    /// and the log `dir/edge-<node>.log`.
    pub fn start_in(
        dir: &Path,
        node: &str,
        data_dir: &Path,
        node_keys: &str,
        body: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let http_port = crate::free_tcp_port()?;
        let config = dir.join(format!("edge-{node}.toml"));
        std::fs::write(
            &config,
            format!(
                "[node]\nid = \"{node}\"\ndata_dir = \"{d}\"\n{node_keys}\n[metrics]\nlisten = \"127.0.0.1:{http_port}\"\n{body}\n",
                d = data_dir.display()
            ),
        )?;
        let mut daemon = Daemon::spawn_idle(
            "fogline-edge",
            &["run", "--config", &config.to_string_lossy()],
            &dir.join(format!("edge-{node}.log")),
        );
        daemon.restart_with_env(env)?;
        Ok(Self {
            daemon,
            config,
            http_port,
            data_dir: data_dir.to_path_buf(),
        })
    }

    /// `/status` as JSON, if the daemon answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        let (code, body) = http_get(self.http_port, "/status")?;
        (code == 200).then(|| serde_json::from_str(&body).ok())?
    }

    /// `/healthz`: status code and body.
    pub fn healthz(&self) -> Option<(u16, String)> {
        http_get(self.http_port, "/healthz")
    }

    /// The sum of every series of a Prometheus metric (0 if absent); one
    /// series of it when `name` comes from [`series`].
    pub fn metric(&self, name: &str) -> f64 {
        let Some((_, body)) = http_get(self.http_port, "/metrics") else {
            return 0.0;
        };
        body.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Waits until `/status` answers and `ready` holds for it.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<()> {
        if process::wait_until(timeout, || self.status().is_some_and(|v| ready(&v))) {
            Ok(())
        } else {
            anyhow::bail!(
                "edge: {what} did not happen within {timeout:?}; log:\n{}",
                self.daemon.log_text()
            )
        }
    }
}

/// An aggregator in this process, on free loopback ports (QUIC, TCP, HTTP),
/// with the certificates `dev_bundle` wrote in `certs` and its store at
/// `store`.
pub async fn in_process_aggregator(
    certs: &Path,
    store: &Path,
) -> anyhow::Result<fogline_aggregator::RunningAggregator> {
    let toml = format!(
        "[quic]\nlisten = \"127.0.0.1:0\"\n[tcp]\nlisten = \"127.0.0.1:0\"\n[tls]\nca = \"{c}/ca.pem\"\ncert = \"{c}/server.pem\"\nkey = \"{c}/server.key\"\n[store]\npath = \"{s}\"\n[http]\nlisten = \"127.0.0.1:0\"\n{t}",
        c = certs.display(),
        s = store.display(),
        t = test_token_toml()
    );
    let config = fogline_aggregator::config::CloudConfig::parse(&toml)?;
    Ok(fogline_aggregator::start(config).await?)
}

/// One labelled series of a metric as `/metrics` writes it,
/// `name{k="v",...}` (labels in the order the daemon gives them), for
/// [`Edge::metric`].
pub fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    format!("{name}{{{}}}", labels.join(","))
}
