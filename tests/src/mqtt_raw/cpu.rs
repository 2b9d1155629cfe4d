//! CPU time and memory of a process, read from `/proc` (Linux only).
//!
//! CPU time is `utime + stime` from `/proc/<pid>/stat`, in clock ticks,
//! converted with the kernel's tick rate. The crate cannot call
//! `sysconf(_SC_CLK_TCK)` (no libc, no unsafe), so the rate is read once
//! with `getconf CLK_TCK`, falling back to Linux's default of 100 Hz.
//! Memory is `VmRSS` (current) and `VmHWM` (peak) from `/proc/<pid>/status`.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};

/// One reading of a process's CPU time and memory.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// When it was taken.
    pub at: Instant,
    /// User plus system CPU time since the process started.
    pub cpu: Duration,
    /// Resident set size now (`VmRSS`).
    pub rss_bytes: u64,
    /// Peak resident set size so far (`VmHWM`).
    pub peak_rss_bytes: u64,
}

impl Sample {
    /// CPU time used between `earlier` and this sample.
    pub fn cpu_since(&self, earlier: &Sample) -> Duration {
        self.cpu.saturating_sub(earlier.cpu)
    }

    /// Average number of cores busy between `earlier` and this sample.
    pub fn cores_since(&self, earlier: &Sample) -> f64 {
        let wall = self.at.saturating_duration_since(earlier.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        self.cpu_since(earlier).as_secs_f64() / wall
    }
}

/// Resident memory of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmRSS`, in bytes.
    pub rss_bytes: u64,
    /// `VmHWM` (peak RSS), in bytes.
    pub peak_rss_bytes: u64,
}

/// Clock ticks per second used by `/proc/<pid>/stat` (`getconf CLK_TCK`,
/// asked once; 100 if that fails).
pub fn clock_ticks_per_sec() -> u64 {
    static TCK: OnceLock<u64> = OnceLock::new();
    *TCK.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// User plus system CPU time of process `pid` since it started.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let ticks = parse_stat_ticks(&text).with_context(|| format!("unexpected format of {path}"))?;
    Ok(ticks_to_duration(ticks, clock_ticks_per_sec()))
}

/// Current and peak resident memory of process `pid`.
pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    parse_status_memory(&text).with_context(|| format!("in {path} (has the process exited?)"))
}

/// CPU time and memory of process `pid`, now.
pub fn sample(pid: u32) -> Result<Sample> {
    let cpu = cpu_time(pid)?;
    let mem = memory(pid)?;
    Ok(Sample {
        at: Instant::now(),
        cpu,
        rss_bytes: mem.rss_bytes,
        peak_rss_bytes: mem.peak_rss_bytes,
    })
}

/// CPU time and memory of the calling process.
pub fn sample_self() -> Result<Sample> {
    sample(std::process::id())
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The
/// command name (field 2) is in parentheses and may itself contain spaces
/// and parentheses, so fields are counted after the *last* `)`.
fn parse_stat_ticks(stat: &str) -> Result<u64> {
    let close = stat
        .rfind(')')
        .ok_or_else(|| anyhow!("no ')' after the command name"))?;
    // After ')' the first field is field 3 (state): utime is field 14.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        let s = fields
            .get(n - 3)
            .ok_or_else(|| anyhow!("only {} fields", fields.len() + 2))?;
        s.parse::<u64>()
            .with_context(|| format!("field {n} is {s:?}, not a number"))
    };
    Ok(field(14)? + field(15)?)
}

fn parse_status_memory(status: &str) -> Result<Memory> {
    let kb = |key: &str| -> Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(key))
            .ok_or_else(|| anyhow!("no {key} line"))?;
        let value = line[key.len()..]
            .split_whitespace()
            .next()
            .ok_or_else(|| anyhow!("empty {key} line"))?;
        let kb: u64 = value
            .parse()
            .with_context(|| format!("{key} is {value:?}, not a number"))?;
        Ok(kb * 1024)
    };
    Ok(Memory {
        rss_bytes: kb("VmRSS:")?,
        peak_rss_bytes: kb("VmHWM:")?,
    })
}

fn ticks_to_duration(ticks: u64, per_sec: u64) -> Duration {
    let per_sec = per_sec.max(1);
    Duration::from_secs(ticks / per_sec)
        + Duration::from_nanos((ticks % per_sec) * 1_000_000_000 / per_sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_the_name() -> Result<()> {
        let line = "4242 (my (weird) proc) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    250 75 0 0 20 0 1 0 123456 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_ticks(line)?, 325);
        assert!(parse_stat_ticks("4242 (x) S 1 2").is_err());
        Ok(())
    }

    #[test]
    fn status_memory_lines() -> Result<()> {
        let status = "Name:\tmosquitto\nVmHWM:\t    8000 kB\nVmRSS:\t    6000 kB\n";
        let m = parse_status_memory(status)?;
        assert_eq!(m.rss_bytes, 6000 * 1024);
        assert_eq!(m.peak_rss_bytes, 8000 * 1024);
        assert!(parse_status_memory("Name:\tzombie\n").is_err());
        Ok(())
    }

    #[test]
    fn ticks_convert_exactly() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(3, 1000), Duration::from_millis(3));
    }

    #[test]
    fn own_process_is_readable_and_burning_cpu_shows() -> Result<()> {
        assert!(clock_ticks_per_sec() >= 100);
        let before = sample_self()?;
        // Spin ~150 ms so at least one tick (10 ms at 100 Hz) is charged.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(150) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let after = sample_self()?;
        assert!(after.cpu_since(&before) >= Duration::from_millis(50));
        assert!(after.rss_bytes > 0 && after.peak_rss_bytes >= after.rss_bytes);
        assert!(cpu_time(u32::MAX).is_err());
        Ok(())
    }
}
