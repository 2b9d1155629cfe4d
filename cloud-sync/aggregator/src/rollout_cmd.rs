//! `fogline-cloud rollout start|status|stop`: rollouts of signed builds,
//! through the running aggregator's API (`/api/v1/rollouts`, an admin
//! token to start or stop one).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use base64::Engine;
use fogline_aggregator::config::CloudConfig;
use serde_json::{json, Value};

/// Exit status of `start` when `--wait` ran out with the rollout running.
const EXIT_STILL_RUNNING: u8 = 2;

#[derive(Debug, clap::Args)]
pub struct Api {
    /// Path to cloud.toml (where the API listens, its TLS).
    #[arg(long, short)]
    config: PathBuf,
    /// An API token, admin to start or stop (or the environment variable FOGLINE_TOKEN).
    #[arg(long, env = "FOGLINE_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum RolloutCommand {
    /// Roll a signed build of a function out to nodes, stage by stage, and
    /// follow it: exits 0 when every stage passed, 1 when it stopped, 2
    /// when `--wait` ran out first.
    Start {
        #[command(flatten)]
        api: Api,
        /// The build; its signature is FILE.sig (`fogline-cloud modules publish`).
        module: PathBuf,
        /// The function on the nodes (`[functions.NAME]` in their config).
        #[arg(long)]
        function: String,
        /// These nodes, in this order: the first stages take the first ones.
        #[arg(long, value_delimiter = ',', value_parser = trimmed, conflicts_with_all = ["percent", "label"], required_unless_present_any = ["percent", "label"])]
        nodes: Vec<String>,
        /// This percentage of the nodes the aggregator knows.
        #[arg(long, conflicts_with = "label")]
        percent: Option<u32>,
        /// The nodes with this label (`name=value`, `[uplink] labels` on the node).
        #[arg(long)]
        label: Option<String>,
        /// Cumulative percentages of the nodes per stage, e.g. `10,50,100`.
        #[arg(long, value_delimiter = ',', default_value = "100", value_parser = percent)]
        stages: Vec<u32>,
        /// Share of a stage's nodes that may fail before the rollout stops
        /// and reverts the nodes it reached (0 to 1).
        #[arg(long, default_value_t = 0.0)]
        max_failure_rate: f64,
        /// Follow the rollout this long (`0s`: return once it started).
        #[arg(long, default_value = "10m")]
        wait: humantime::Duration,
    },
    /// Show the rollouts, or one with its nodes.
    Status {
        #[command(flatten)]
        api: Api,
        /// The rollout.
        id: Option<u64>,
    },
    /// Stop a rollout: the nodes that took its build go back to the one before.
    Stop {
        #[command(flatten)]
        api: Api,
        /// The rollout.
        id: u64,
    },
}

/// A stage's percentage, spaces around it allowed (`10, 50, 100`).
fn percent(s: &str) -> Result<u32, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a percentage (1 to 100)"))
}

/// A node id, spaces around it allowed (`gw-1, gw-2`).
fn trimmed(s: &str) -> Result<String, String> {
    Ok(s.trim().to_string())
}

pub fn run(c: RolloutCommand) -> ExitCode {
    match run_inner(c) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    fn new(api: &Api) -> anyhow::Result<Self> {
        let config = CloudConfig::load(&api.config)?;
        let (http, base) = super::api_client(&config)?;
        Ok(Self {
            http,
            base,
            token: api.token.clone(),
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut r = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            // Uploading a build of several MB to a distant aggregator.
            .timeout(Duration::from_secs(120));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.with_context(|| {
            format!(
                "{method} {}{path}: the aggregator does not answer",
                self.base
            )
        })?;
        let status = resp.status();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!(
                "{method} {path}: {status}: {}",
                v["error"].as_str().unwrap_or("no reason given")
            );
        }
        Ok(v)
    }
}

fn run_inner(c: RolloutCommand) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        match c {
            RolloutCommand::Start {
                api,
                module,
                function,
                nodes,
                percent,
                label,
                stages,
                max_failure_rate,
                wait,
            } => {
                let client = Client::new(&api)?;
                let bytes = std::fs::read(&module)
                    .with_context(|| format!("cannot read {}", module.display()))?;
                let mut sig = module.as_os_str().to_owned();
                sig.push(".sig");
                let sig = PathBuf::from(sig);
                let signature = std::fs::read_to_string(&sig).with_context(|| {
                    format!(
                        "cannot read its signature {} (sign it with `fogline-cloud modules publish`)",
                        sig.display()
                    )
                })?;
                let target = match (percent, label) {
                    (Some(p), _) => json!({ "percent": p }),
                    (None, Some(l)) => json!({ "label": l }),
                    (None, None) => json!({ "nodes": nodes }),
                };
                let r = client
                    .call(
                        reqwest::Method::POST,
                        "/api/v1/rollouts",
                        Some(json!({
                            "function": function,
                            "module_base64": base64::engine::general_purpose::STANDARD.encode(&bytes),
                            "signature": signature,
                            "target": target,
                            "stages": stages,
                            "max_failure_rate": max_failure_rate,
                        })),
                    )
                    .await?;
                let id = r["id"].as_u64().unwrap_or(0);
                println!(
                    "rollout #{id}: {} {} ({}) to `{function}` on {} node(s), stages {}",
                    r["module"].as_str().unwrap_or("?"),
                    r["version"].as_str().unwrap_or("?"),
                    r["sha256"].as_str().unwrap_or("").chars().take(12).collect::<String>(),
                    r["nodes"].as_array().map_or(0, |n| n.len()),
                    stages.iter().map(|s| format!("{s}%")).collect::<Vec<_>>().join(" → ")
                );
                follow(&client, id, wait.into()).await
            }
            RolloutCommand::Status { api, id } => {
                let client = Client::new(&api)?;
                match id {
                    Some(id) => {
                        let r = client
                            .call(reqwest::Method::GET, &format!("/api/v1/rollouts/{id}"), None)
                            .await?;
                        print_one(&r);
                    }
                    None => {
                        let all = client.call(reqwest::Method::GET, "/api/v1/rollouts", None).await?;
                        let all = all.as_array().cloned().unwrap_or_default();
                        if all.is_empty() {
                            println!("no rollouts");
                        }
                        for r in &all {
                            println!("{}", summary(r));
                        }
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            RolloutCommand::Stop { api, id } => {
                let client = Client::new(&api)?;
                let r = client
                    .call(reqwest::Method::POST, &format!("/api/v1/rollouts/{id}/stop"), None)
                    .await?;
                println!("{}", summary(&r));
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

/// Follows rollout `id`, printing each node's outcome as it comes, until it
/// completes or stops, or `wait` runs out.
async fn follow(client: &Client, id: u64, wait: Duration) -> anyhow::Result<ExitCode> {
    let deadline = Instant::now() + wait;
    let mut said: std::collections::HashMap<String, String> = Default::default();
    let mut stage = None;
    loop {
        let r = client
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/rollouts/{id}"),
                None,
            )
            .await?;
        if stage != r["stage"].as_u64() {
            stage = r["stage"].as_u64();
            let n = r["stages"].as_array().map_or(0, |s| s.len());
            println!("stage {} of {n}", stage.unwrap_or(0) + 1);
        }
        for p in r["nodes"].as_array().into_iter().flatten() {
            let node = p["node"].as_str().unwrap_or("?").to_string();
            let state = p["state"].as_str().unwrap_or("?").to_string();
            if state != "pending" && said.get(&node) != Some(&state) {
                println!("  {}", node_line(p));
                said.insert(node, state);
            }
        }
        match r["state"].as_str() {
            Some("completed") => {
                println!("completed: {}", r["reason"].as_str().unwrap_or(""));
                return Ok(ExitCode::SUCCESS);
            }
            Some("stopped") => {
                println!("STOPPED: {}", r["reason"].as_str().unwrap_or(""));
                if any_told_to_revert(&r) {
                    println!("the nodes it reached are told to revert: `fogline-cloud rollout status --config … {id}` shows them");
                }
                return Ok(ExitCode::FAILURE);
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            if !wait.is_zero() {
                println!(
                    "still running after {}: `fogline-cloud rollout status --config … {id}` follows it",
                    humantime::format_duration(wait)
                );
            }
            return Ok(ExitCode::from(EXIT_STILL_RUNNING));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn any_told_to_revert(r: &Value) -> bool {
    r["nodes"]
        .as_array()
        .is_some_and(|n| n.iter().any(|p| p["revert"] == true))
}

fn node_line(p: &Value) -> String {
    format!(
        "{:<20} {}{}{}",
        p["node"].as_str().unwrap_or("?"),
        p["state"].as_str().unwrap_or("?").replace('_', " "),
        if p["revert"] == true {
            " (told to revert)"
        } else {
            ""
        },
        p["reason"]
            .as_str()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    )
}

fn summary(r: &Value) -> String {
    let nodes = r["nodes"].as_array().cloned().unwrap_or_default();
    let count = |s: &str| nodes.iter().filter(|p| p["state"] == s).count();
    format!(
        "#{} {} {} {} → `{}`: {} (stage {} of {}) — {} node(s): {} promoted, {} failed, {} reverted, {} pending{}",
        r["id"],
        r["module"].as_str().unwrap_or("?"),
        r["version"].as_str().unwrap_or("?"),
        r["sha256"].as_str().unwrap_or("").chars().take(8).collect::<String>(),
        r["function"].as_str().unwrap_or("?"),
        r["state"].as_str().unwrap_or("?"),
        r["stage"].as_u64().unwrap_or(0) + 1,
        r["stages"].as_array().map_or(0, |s| s.len()),
        nodes.len(),
        count("promoted"),
        count("rolled_back") + count("refused"),
        count("reverted"),
        count("pending") + count("probation"),
        r["reason"]
            .as_str()
            .map(|s| format!("\n  {s}"))
            .unwrap_or_default()
    )
}

fn print_one(r: &Value) {
    println!("{}", summary(r));
    for p in r["nodes"].as_array().into_iter().flatten() {
        println!("  stage {}  {}", p["stage"], node_line(p));
    }
}
