//! The real `fogline-edge` and `fogline-cloud` binaries as child processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Path of a workspace binary next to the test executable
/// (`target/<profile>/`), building it if it is missing.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no target dir")?;
    let path = dir.join(name);
    if !path.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--bin", name])
            .status()
            .with_context(|| format!("building {name}"))?;
        if !status.success() || !path.is_file() {
            bail!(
                "{name} is not built at {}; run `cargo build --bins` first",
                path.display()
            );
        }
    }
    Ok(path)
}

/// A running daemon, killed (SIGKILL) on drop.
pub struct Daemon {
    pub name: &'static str,
    child: Option<Child>,
    pub log: PathBuf,
    args: Vec<String>,
    /// Extra environment (e.g. `FAILPOINTS`), applied at every (re)start.
    pub env: Vec<(String, String)>,
}

impl Daemon {
    pub fn spawn(name: &'static str, args: &[&str], log: &Path) -> anyhow::Result<Self> {
        let mut d = Self::spawn_idle(name, args, log);
        d.start()?;
        Ok(d)
    }

    /// The same, not started yet.
    pub fn spawn_idle(name: &'static str, args: &[&str], log: &Path) -> Self {
        Self {
            name,
            child: None,
            log: log.to_path_buf(),
            args: args.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        }
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(binary(self.name)?)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("spawning {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// Start with `env` set (e.g. a fault point), replacing any process running.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.kill9();
        self.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.start()
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends SIGTERM (an orderly shutdown request).
    pub fn terminate(&self) -> anyhow::Result<()> {
        let pid = self.pid().context("not running")?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill")?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.as_mut()?.try_wait() {
                Ok(Some(status)) => {
                    self.child = None;
                    return Some(status);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => return None,
            }
        }
    }

    /// `kill -9`.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.start()
    }

    /// Still running?
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Run a binary to completion.
pub fn run(name: &str, args: &[&str]) -> anyhow::Result<Output> {
    Ok(Command::new(binary(name)?).args(args).output()?)
}

/// Poll `f` until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    f()
}
