//! `fogline-edge check`: validate the config and load every module.

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use fogline_edge::config::EdgeConfig;
use fogline_edge::functions::{FunctionInstance, FunctionRuntime, RuntimeOptions};

pub async fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = EdgeConfig::load(path)?;
    let started = Instant::now();
    let runtime = FunctionRuntime::new(RuntimeOptions {
        cache_dir: Some(config.module_cache_dir()),
        ..RuntimeOptions::default()
    })?;
    // Every function the pipelines use: compiled, linked, and its `init`
    // run on its config (with no state: `check` does not touch the outbox).
    for w in fogline_edge::pipeline::versions::wanted(&config)? {
        let module = runtime.load_bytes(&w.path, &w.bytes)?;
        FunctionInstance::new(&runtime, &module, &w.function, &w.config_json, w.limits)?;
    }
    println!(
        "{}: ok — {} pipeline(s), {} function(s) loaded and initialised in {} ms",
        path.display(),
        config.pipelines.len(),
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
