//! `fogline-edge module deploy`: install a build on a running daemon and
//! report whether it took over or was rolled back, and why.
//!
//! The daemon's own hot swap does the work (`pipeline::versions`): it sees
//! the function's module file change, starts the new build on probation
//! beside the running one and promotes it after `probation_batches` good
//! batches, or rolls back to the running version with its state. This
//! command replaces the file atomically (write beside it, fsync, rename),
//! keeps the previous file as `<module>.previous`, then follows the swap on
//! the daemon's `/status`; after a rollback it puts the previous file back,
//! so the file on disk is what runs. Who may deploy is who may write the
//! module file: the daemon's configuration decides where that is.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fogline_edge::config::EdgeConfig;
use fogline_edge::deploy::files::{sig_path, write_atomic};
use fogline_edge::pipeline::versions::sha256_hex;
use serde_json::Value;

use super::super::status::{fetch_status, status_addr, Answer};

/// What to install where.
#[derive(Debug, clap::Args)]
pub struct DeployArgs {
    /// The function's crate, built first (default: the current directory).
    pub dir: Option<PathBuf>,
    /// Install this component instead of building a crate.
    #[arg(long, conflicts_with = "dir")]
    pub wasm: Option<PathBuf>,
    /// The running daemon's configuration.
    #[arg(long, short)]
    pub config: PathBuf,
    /// The function to replace (default: the config's only one).
    #[arg(long)]
    pub function: Option<String>,
    /// How long to follow the swap before reporting it undecided.
    #[arg(long, default_value = "60s")]
    pub wait: humantime::Duration,
}

/// Exit status when the build is still on probation at `--wait`.
const EXIT_UNDECIDED: u8 = 2;
const POLL: Duration = Duration::from_millis(250);

/// The function's slots in `/status` (one per pipeline that runs it).
fn slots<'a>(status: &'a Value, function: &str) -> Vec<&'a Value> {
    let suffix = format!("/{function}");
    status["functions"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|f| f["owner"].as_str().is_some_and(|o| o.ends_with(&suffix)))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `bytes` over `target` atomically, keeping the old file as
/// `<target>.previous`.
fn replace(target: &Path, bytes: &[u8]) -> anyhow::Result<Option<PathBuf>> {
    let previous = if target.is_file() {
        let mut p = target.as_os_str().to_owned();
        p.push(".previous");
        let p = PathBuf::from(p);
        std::fs::copy(target, &p)
            .with_context(|| format!("cannot keep the previous build as {}", p.display()))?;
        Some(p)
    } else {
        None
    };
    write_atomic(target, bytes).with_context(|| {
        format!(
            "cannot write {} (deploying needs write access to the module's directory)",
            target.display()
        )
    })?;
    Ok(previous)
}

pub async fn run(a: &DeployArgs) -> anyhow::Result<ExitCode> {
    let config = EdgeConfig::load(&a.config)?;
    let name = super::pick_function(&config, &a.config, a.function.as_deref())?;
    let function = &config.functions[&name];
    let target = config.resolve(&function.module);

    let wasm = match &a.wasm {
        Some(w) => w.clone(),
        None => {
            let dir = a.dir.clone().unwrap_or_else(|| PathBuf::from("."));
            super::build::build(&dir, super::build::Verbosity::Quiet)?.wasm
        }
    };
    let bytes = std::fs::read(&wasm).with_context(|| format!("cannot read {}", wasm.display()))?;
    // A file that is no component of this contract never reaches the daemon.
    fogline_edge::functions::FunctionRuntime::new(Default::default())?.load(&wasm)?;
    // Signed fleets ([modules] trusted_keys): the signature next to the
    // build goes with it, checked here first so a refusal is local.
    let (sig_src, sig_target) = (sig_path(&wasm), sig_path(&target));
    fogline_edge::pipeline::versions::check_signature(&config, &wasm, &bytes)?;
    let sig = if sig_src.is_file() {
        Some(
            std::fs::read(&sig_src)
                .with_context(|| format!("cannot read {}", sig_src.display()))?,
        )
    } else {
        None
    };
    let sha = sha256_hex(&bytes);
    let tag = fogline_edge::deploy::tag(&sha);
    if std::fs::read(&target).is_ok_and(|old| sha256_hex(&old) == sha) {
        eprintln!(
            "{} already holds this build ({tag}): nothing to do.",
            target.display()
        );
        return Ok(ExitCode::SUCCESS);
    }

    let addr = status_addr(&config);
    let before = match addr {
        Some(addr) => match fetch_status(addr).await {
            Some(Answer::Status(v)) => Some(v),
            _ => None,
        },
        None => None,
    };
    // The signature first: the daemon reloads when the module changes.
    let previous_sig = match &sig {
        Some(sig) => Some(replace(&sig_target, sig)?),
        None => None,
    };
    let previous = replace(&target, &bytes)?;
    eprintln!(
        "Installed {} as {} ({tag}).",
        wasm.display(),
        target.display()
    );
    let (Some(addr), Some(before)) = (addr, before) else {
        eprintln!("The daemon is not running (no answer on /status): it starts with this build.");
        return Ok(ExitCode::SUCCESS);
    };
    let seen_swap = |s: &Value, owner: &Value| -> u64 {
        slots(s, &name)
            .into_iter()
            .find(|f| &f["owner"] == owner)
            .and_then(|f| f["last_swap"]["at_ms"].as_u64())
            .unwrap_or(0)
    };
    if slots(&before, &name).is_empty() {
        eprintln!("No pipeline runs `{name}`: installed, and nothing runs it yet.");
        return Ok(ExitCode::SUCCESS);
    }

    let deadline = Instant::now() + Duration::from(a.wait);
    let mut said_probation = false;
    loop {
        tokio::time::sleep(POLL).await;
        let Some(Answer::Status(now)) = fetch_status(addr).await else {
            if Instant::now() >= deadline {
                bail!("the daemon stopped answering on {addr} while the new build was being swapped in");
            }
            continue;
        };
        let slots = slots(&now, &name);
        // A rollback of this build, newer than what was there before.
        let rolled_back = slots.iter().find(|f| {
            f["last_swap"]["outcome"] == "rolled_back"
                && f["last_swap"]["version"]
                    .as_str()
                    .is_some_and(|v| v.contains(&tag))
                && f["last_swap"]["at_ms"].as_u64().unwrap_or(0) > seen_swap(&before, &f["owner"])
        });
        if let Some(f) = rolled_back {
            let reason = f["last_swap"]["reason"]
                .as_str()
                .unwrap_or("no reason given");
            if let Some(p) = &previous {
                if let Some(Some(ps)) = &previous_sig {
                    std::fs::rename(ps, &sig_target)
                        .with_context(|| format!("cannot put {} back", sig_target.display()))?;
                }
                std::fs::rename(p, &target)
                    .with_context(|| format!("cannot put {} back", target.display()))?;
            }
            eprintln!(
                "ROLLED BACK on {}: {reason}\nThe daemon runs the previous version with its state{}.",
                f["owner"].as_str().unwrap_or(&name),
                if previous.is_some() {
                    format!("; {} is the previous build again", target.display())
                } else {
                    String::new()
                }
            );
            return Ok(ExitCode::FAILURE);
        }
        let running = slots.iter().all(|f| {
            f["version"].as_str().is_some_and(|v| v.contains(&tag)) && f["candidate"].is_null()
        });
        if running {
            let label = slots
                .first()
                .and_then(|f| f["version"].as_str())
                .unwrap_or(&tag);
            eprintln!(
                "Deployed: `{name}` runs {label} on {} pipeline(s).",
                slots.len()
            );
            return Ok(ExitCode::SUCCESS);
        }
        let probation = slots.iter().find_map(|f| {
            let c = f["candidate"].as_array()?;
            if !c.first()?.as_str()?.contains(&tag) {
                return None;
            }
            Some((c.get(1)?.as_u64()?, c.get(2)?.as_u64()?))
        });
        if let Some((passed, of)) = probation {
            if !said_probation {
                eprintln!("On probation: {passed}/{of} batches passed (it takes over after {of} good batches)...");
                said_probation = true;
            }
        }
        if Instant::now() >= deadline {
            eprintln!(
                "Still undecided after {}: {}. `fogline-edge status` shows the outcome.",
                humantime::format_duration(a.wait.into()),
                match probation {
                    Some((p, of)) =>
                        format!("on probation, {p}/{of} batches passed (it needs traffic)"),
                    None => "the daemon has not picked the build up (is it watching this config?)"
                        .into(),
                }
            );
            return Ok(ExitCode::from(EXIT_UNDECIDED));
        }
    }
}
