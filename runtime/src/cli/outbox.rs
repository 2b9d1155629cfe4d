//! `fogline-edge outbox check | recover`: the outbox file by hand.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use fogline_edge::config::EdgeConfig;
use fogline_edge::outbox::salvage::{self, Integrity};

pub fn check(config: &Path, timeout: Duration) -> anyhow::Result<ExitCode> {
    let config = EdgeConfig::load(config)?;
    let path = config.outbox_path();
    anyhow::ensure!(path.exists(), "there is no outbox at {}", path.display());
    let started = std::time::Instant::now();
    match salvage::check(&path, timeout).with_context(|| format!("checking {}", path.display()))? {
        Integrity::Ok => {
            println!(
                "{}: ok (checked in {:.1?})",
                path.display(),
                started.elapsed()
            );
            Ok(ExitCode::SUCCESS)
        }
        Integrity::Unfinished => {
            println!(
                "{}: the check did not finish within {timeout:?}; try a longer --timeout",
                path.display()
            );
            Ok(ExitCode::from(2))
        }
        Integrity::Damaged(found) => {
            println!("{}: DAMAGED", path.display());
            for line in found {
                println!("  {line}");
            }
            println!(
                "Stop the daemon and run `fogline-edge outbox recover --config ...`, or restart it: it salvages the file at start."
            );
            Ok(ExitCode::FAILURE)
        }
    }
}

/// How long `recover` spends finding out whether there is anything to do.
const RECOVER_CHECK: Duration = Duration::from_secs(300);

pub async fn recover(config: &Path, force: bool) -> anyhow::Result<ExitCode> {
    let config = EdgeConfig::load(config)?;
    let path = config.outbox_path();
    anyhow::ensure!(path.exists(), "there is no outbox at {}", path.display());
    if config.metrics.enabled {
        let mut addr = config.metrics.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            anyhow::bail!(
                "a daemon answers on {addr} (metrics.listen): stop it first — it salvages a damaged outbox by itself at start"
            );
        }
    }
    if !force {
        let found = salvage::check(&path, RECOVER_CHECK)
            .with_context(|| format!("checking {}", path.display()))?;
        if found == Integrity::Ok {
            println!(
                "{}: sound, nothing to salvage (--force rebuilds it anyway)",
                path.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
    }
    let s = salvage::recover(&path).with_context(|| format!("salvaging {}", path.display()))?;
    println!("{}: salvaged into a new file", path.display());
    println!("  records kept        {}", s.records);
    println!(
        "  records lost        {}{}",
        s.lost_records(),
        if s.lost.is_empty() {
            String::new()
        } else {
            format!(" (seq {})", s.lost_ranges())
        }
    );
    println!("  other rows kept     {}", s.other_rows);
    for u in &s.unreadable {
        println!("  unreadable          {u}");
    }
    println!(
        "  incarnation         {:#018x} ({})",
        s.incarnation,
        if s.new_incarnation {
            "new: its numbering could not be read"
        } else {
            "kept"
        }
    );
    println!("  damaged file        {}", s.kept_as.display());
    Ok(ExitCode::SUCCESS)
}
