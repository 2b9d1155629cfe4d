//! `fogline-edge check`: validate the config and load every module.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use fogline_edge::config::EdgeConfig;
use fogline_edge::functions::{FunctionRuntime, RuntimeOptions};

pub async fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = EdgeConfig::load(path)?;
    let started = Instant::now();
    let runtime = FunctionRuntime::new(RuntimeOptions {
        cache_dir: Some(config.module_cache_dir()),
        ..RuntimeOptions::default()
    })?;
    let chains = fogline_edge::pipeline::build_chains(&config, &runtime)?;
    println!(
        "{}: ok — {} pipeline(s), {} function(s) loaded and initialised in {} ms",
        path.display(),
        chains.len(),
        config.functions.len(),
        started.elapsed().as_millis()
    );
    for p in &config.pipelines {
        println!(
            "  pipeline {:<16} {} → {}",
            p.name,
            p.topics.join(", "),
            if p.functions.is_empty() {
                "(pass-through)".to_string()
            } else {
                p.functions.join(" → ")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}
