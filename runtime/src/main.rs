//! `fogline-edge`: the gateway daemon and its operator commands.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Fault points for the fault tests (FAILPOINTS=...); nothing without the
    // `failpoints` feature.
    let _faults = fail::FailScenario::setup();
    let args = cli::Cli::parse();
    // `run` logs as its config says; a config that does not load is
    // reported by the command itself.
    match args
        .run_config()
        .map(fogline_edge::config::EdgeConfig::load)
    {
        Some(Ok(c)) => fogline_telemetry::init_logging(
            &c.log.level,
            c.log.format == fogline_edge::config::LogFormat::Json,
        ),
        _ => fogline_telemetry::init_tracing("info"),
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(cli::dispatch(args));
    // The daemon stopped within its bound; a blocking task still waiting on
    // the disk (a stuck commit, a locked outbox) must not hold the exit.
    rt.shutdown_timeout(std::time::Duration::from_millis(200));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
