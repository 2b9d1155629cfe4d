//! A private mosquitto on a free 127.0.0.1 port with a temp config, killed on
//! drop. It can keep a persistence database, be killed with SIGKILL mid-run
//! and be restarted on the same port (the fault tests need that). Never the
//! system broker on 1883.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};

/// How to configure a [`Mosquitto`].
#[derive(Debug, Clone)]
pub struct MosquittoConfig {
    /// Keep sessions in `mosquitto.db` in the temp dir (saved on SIGUSR1,
    /// see [`Mosquitto::save_db`], on clean exit, and every
    /// `autosave_interval`, default 1800 s).
    pub persistence: bool,
    /// `log_type all`: logs every packet, e.g. `Received PUBLISH from c
    /// (d1, q1, r0, m7, 't', ... (100 bytes))`, so a test can see DUP flags
    /// on the wire. Slows the broker down: not for benchmarks.
    pub debug_log: bool,
    /// `allow_anonymous`; with `false` and no password file every CONNECT is
    /// refused (not authorised).
    pub allow_anonymous: bool,
    /// Further config lines, appended verbatim.
    pub extra: Vec<String>,
}

impl Default for MosquittoConfig {
    fn default() -> Self {
        Self {
            persistence: false,
            debug_log: false,
            allow_anonymous: true,
            extra: Vec::new(),
        }
    }
}

/// A running private mosquitto.
pub struct Mosquitto {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    config: MosquittoConfig,
    /// How many times it was started; each start logs to its own file.
    starts: u32,
}

impl Mosquitto {
    /// Start one with the default configuration: no persistence, unbounded
    /// queues and in-flight windows (a stopped subscriber with a persistent
    /// session loses nothing while it is away).
    pub fn start() -> Result<Self> {
        Self::start_with(MosquittoConfig::default())
    }

    /// Start one with `config`.
    pub fn start_with(config: MosquittoConfig) -> Result<Self> {
        let dir = tempfile::tempdir().context("cannot create a temp dir for mosquitto")?;
        // Started as root, mosquitto drops to user `mosquitto`, which must
        // still be able to write its log and database here.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .context("cannot open up mosquitto's temp dir")?;
        let port = free_tcp_port()?;
        let mut m = Self {
            child: None,
            port,
            dir,
            config,
            starts: 0,
        };
        m.spawn()?;
        Ok(m)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Process id while it runs (for [`super::cpu`]).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The temp dir holding the config, logs and persistence database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Log file of the current (latest) start.
    pub fn log_path(&self) -> PathBuf {
        self.dir
            .path()
            .join(format!("mosquitto-{}.log", self.starts))
    }

    /// Text of the current start's log (empty if unreadable).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL it and reap it: no goodbye, no final database save.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("cannot SIGKILL mosquitto")?;
            child.wait().context("cannot reap mosquitto")?;
        }
        Ok(())
    }

    /// Start it again on the same port with the same config (and the same
    /// persistence database); kills the running one first if any.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9()?;
        self.spawn()
    }

    /// Make it write its persistence database now (SIGUSR1) and wait until
    /// the file has changed, so a following SIGKILL cannot lose what was
    /// there (sessions, subscriptions, in-flight QoS 2 ids).
    pub fn save_db(&self) -> Result<()> {
        if !self.config.persistence {
            bail!("save_db needs MosquittoConfig::persistence");
        }
        let pid = self.pid().context("mosquitto is not running")?;
        let db = self.dir.path().join("mosquitto.db");
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)))
        };
        let before = stamp(&db);
        // No libc in this crate: signal through kill(1).
        let status = Command::new("kill")
            .args(["-USR1", &pid.to_string()])
            .status()
            .context("cannot run kill -USR1")?;
        if !status.success() {
            bail!("kill -USR1 {pid} failed: {status}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = stamp(&db);
            if now.is_some() && now != before {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("mosquitto did not write {} within 10 s", db.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let conf = self.dir.path().join("mosquitto.conf");
        let log = self.log_path();
        let c = &self.config;
        let mut text = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous {anon}\n\
             persistence {persist}\n\
             persistence_location {dir}/\n\
             max_queued_messages 0\n\
             max_queued_bytes 0\n\
             max_inflight_messages 0\n\
             log_dest file {log}\n",
            port = self.port,
            anon = c.allow_anonymous,
            persist = c.persistence,
            dir = self.dir.path().display(),
            log = log.display(),
        );
        if c.debug_log {
            text.push_str("log_type all\n");
        }
        for line in &c.extra {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
        let bin = if Path::new("/usr/sbin/mosquitto").exists() {
            "/usr/sbin/mosquitto"
        } else {
            "mosquitto"
        };
        let mut child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start mosquitto (install it: apt-get install mosquitto)")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "mosquitto exited ({status}) before listening on {}; log:\n{}",
                    self.port,
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("mosquitto did not listen on {} within 10 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_tcp_port() -> Result<u16> {
    Ok(crate::free_tcp_port()?)
}
