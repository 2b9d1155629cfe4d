//! The standard Prometheus process metrics — resident and virtual memory,
//! CPU seconds, open and maximum file descriptors, start time, threads —
//! read from the OS at each scrape (`metrics-process`) and rendered as
//! text after the recorder's own series. Not through the `metrics` crate:
//! its counters are integers, and CPU seconds need their fractions.

use std::fmt::Write;

/// Every series [`render`] writes, for tests and documentation.
pub const NAMES: &[&str] = &[
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_virtual_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_start_time_seconds",
    "process_threads",
];

/// The process metrics in the Prometheus text format, each with HELP and
/// TYPE. A value the OS does not give is left out.
pub fn render() -> String {
    let m = metrics_process::collector::collect();
    let u = |v: Option<u64>| v.map(|v| v as f64);
    let series: [(&str, &str, &str, Option<f64>); 7] = [
        (
            NAMES[0],
            "counter",
            "Total user and system CPU time spent, in seconds.",
            m.cpu_seconds_total,
        ),
        (
            NAMES[1],
            "gauge",
            "Resident memory size, in bytes.",
            u(m.resident_memory_bytes),
        ),
        (
            NAMES[2],
            "gauge",
            "Virtual memory size, in bytes.",
            u(m.virtual_memory_bytes),
        ),
        (NAMES[3], "gauge", "Open file descriptors.", u(m.open_fds)),
        (
            NAMES[4],
            "gauge",
            "Most file descriptors the process may open (0: unlimited).",
            u(m.max_fds),
        ),
        (
            NAMES[5],
            "gauge",
            "Start time of the process, in seconds since the Unix epoch.",
            u(m.start_time_seconds),
        ),
        (
            NAMES[6],
            "gauge",
            "OS threads of the process.",
            u(m.threads),
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, value) in series {
        if let Some(v) = value {
            // Writing to a String cannot fail.
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n\n"
            );
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn every_series_is_there_with_help_type_and_a_plausible_value() {
        let text = render();
        for name in NAMES {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}:\n{text}");
            assert!(text.contains(&format!("# TYPE {name} ")), "{name}:\n{text}");
        }
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(rss > 1e6, "{rss}");
    }
}
