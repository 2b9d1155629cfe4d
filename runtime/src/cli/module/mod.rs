//! `fogline-edge module new | build | test | deploy`: from an idea to a
//! function running on a gateway, without a checkout of this repository.

mod build;
mod deploy;
mod scaffold;
pub mod script;
mod test;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;

pub use test::TestArgs;

/// The function a command means: `requested`, or the config's only one;
/// an error names what the config has.
fn pick_function(
    config: &fogline_edge::config::EdgeConfig,
    path: &std::path::Path,
    requested: Option<&str>,
) -> anyhow::Result<String> {
    let names = || {
        config
            .functions
            .keys()
            .cloned()
            .collect::<Vec<_>>()
            .join(", ")
    };
    let name = match requested {
        Some(n) => n.to_string(),
        None => match config.functions.keys().collect::<Vec<_>>().as_slice() {
            [only] => (*only).clone(),
            [] => anyhow::bail!("{} defines no functions", path.display()),
            many => anyhow::bail!(
                "{} defines {} functions ({}): name one with --function",
                path.display(),
                many.len(),
                names()
            ),
        },
    };
    if !config.functions.contains_key(&name) {
        anyhow::bail!(
            "{} has no function `{name}` (it has: {}); add a [functions.{name}] table first",
            path.display(),
            names()
        );
    }
    Ok(name)
}

#[derive(Subcommand, Debug)]
pub enum ModuleCommand {
    /// Create a function crate: the SDK vendored (no checkout needed), the
    /// target defaulted, a sample input, its expected output and settings.
    New {
        /// The crate's name (and directory).
        name: String,
        /// What it starts from.
        #[arg(long, value_enum, default_value = "filter")]
        template: scaffold::Template,
        /// Create it in this directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Build a function crate into a component (installs the wasm32-wasip2
    /// target if missing) and check that it loads.
    Build {
        /// The crate (default: the current directory).
        dir: Option<PathBuf>,
    },
    /// Run a function over samples and ticks, as the daemon would; compare
    /// with an expected output (exit 1 and a diff when they differ).
    Test(TestArgs),
    /// Install a build on a running daemon (atomic replace; the daemon
    /// swaps it in on probation) and report whether it took over or was
    /// rolled back, and why. Exit 0 deployed, 1 rolled back or failed, 2
    /// still on probation at `--wait`.
    Deploy(deploy::DeployArgs),
}

pub async fn dispatch(command: ModuleCommand) -> anyhow::Result<ExitCode> {
    match command {
        ModuleCommand::New {
            name,
            template,
            dir,
        } => {
            let made = scaffold::create(&name, template, &dir)?;
            let shown = made.display();
            eprintln!(
                "Created {shown} ({template:?} template). Next:\n  cd {shown}\n  fogline-edge module build\n  fogline-edge module test --input samples.jsonl --expect expected.jsonl"
            );
            Ok(ExitCode::SUCCESS)
        }
        ModuleCommand::Build { dir } => {
            let dir = dir.unwrap_or_else(|| PathBuf::from("."));
            build::build(&dir, build::Verbosity::Report)?;
            Ok(ExitCode::SUCCESS)
        }
        ModuleCommand::Test(args) => test::run(&args),
        ModuleCommand::Deploy(args) => deploy::run(&args).await,
    }
}
