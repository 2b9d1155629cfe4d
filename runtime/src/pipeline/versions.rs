//! Function versions: which build of each function runs, where the builds
//! are kept, how the daemon starts them, and how a new build takes over on a
//! running daemon.
//!
//! A *version* is a module's bytes plus its init config (both hashed). Each
//! running version owns a *generation* of durable state in the outbox. A new
//! version — a changed file at start, or a reload (SIGHUP, a changed file) on
//! a running daemon — starts as a *candidate* from the running version's
//! state (its `restore` migrates what changed shape), runs in shadow on the
//! same inputs for `probation_batches` batches (outputs checked and dropped,
//! state committed under its own generation), and then takes over between
//! two batches. If it fails `init` or any call on probation, it is dropped
//! with its state: the running version and its state never stopped, so
//! nothing is lost or duplicated either way. Every build that ran is kept in
//! `<data_dir>/modules/<sha256>.wasm`, so the running version survives its
//! file being replaced and a restart in the middle of a probation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::{EdgeConfig, FunctionConfig};
use crate::functions::{FunctionError, FunctionInstance, FunctionRuntime, Limits, Module};
use crate::outbox::{Outbox, OutboxError, VersionWrite};

use super::breaker::BreakerConfig;
use super::chain::Chain;
use super::slot::{Candidate, FunctionSlot, OnOpen, Spec, Version};

/// Why the functions could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    /// A module could not be read or compiled.
    #[error("{0}")]
    Function(#[from] FunctionError),
    /// The outbox could not record versions or read state.
    #[error("{0}")]
    Outbox(#[from] OutboxError),
    /// The module store could not be written.
    #[error("cannot keep a copy of {what} in {dir}: {source}")]
    Store {
        /// What.
        what: String,
        /// The module store.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// SHA-256, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every build of a function that ran, by content: `<dir>/<sha256>.wasm`.
#[derive(Debug, Clone)]
pub struct ModuleStore {
    dir: PathBuf,
}

impl ModuleStore {
    /// The store in `dir` (created on first write).
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// Where the build with this hash is (or would be) kept.
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.dir.join(format!("{sha256}.wasm"))
    }

    /// The kept build, if any.
    pub fn get(&self, sha256: &str) -> Option<PathBuf> {
        let p = self.path(sha256);
        p.is_file().then_some(p)
    }

    /// Keep `bytes` (through a temporary file and a rename).
    pub fn put(&self, sha256: &str, bytes: &[u8]) -> std::io::Result<PathBuf> {
        let path = self.path(sha256);
        if path.is_file() {
            return Ok(path);
        }
        std::fs::create_dir_all(&self.dir)?;
        let tmp = self.dir.join(format!(".{sha256}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Delete builds not in `keep`.
    pub fn prune(&self, keep: &[String]) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(sha) = name.strip_suffix(".wasm") else {
                continue;
            };
            if !keep.iter().any(|k| k == sha) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// A function's TOML table as the JSON its `init` receives. Datetimes
/// become their RFC 3339 text (serde would wrap them in a private marker).
pub fn config_json(table: &toml::Table) -> serde_json::Value {
    fn value(v: &toml::Value) -> serde_json::Value {
        match v {
            toml::Value::String(s) => serde_json::Value::String(s.clone()),
            toml::Value::Integer(i) => serde_json::Value::from(*i),
            toml::Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            toml::Value::Boolean(b) => serde_json::Value::Bool(*b),
            toml::Value::Datetime(d) => serde_json::Value::String(d.to_string()),
            toml::Value::Array(a) => serde_json::Value::Array(a.iter().map(value).collect()),
            toml::Value::Table(t) => {
                serde_json::Value::Object(t.iter().map(|(k, v)| (k.clone(), value(v))).collect())
            }
        }
    }
    serde_json::Value::Object(table.iter().map(|(k, v)| (k.clone(), value(v))).collect())
}

/// A function's limits from its config.
pub fn limits(f: &FunctionConfig) -> Limits {
    Limits {
        memory_bytes: f.memory_mib << 20,
        call_timeout: f.timeout,
        timeout_per_message: f.timeout_per_message,
        init_timeout: f.init_timeout,
        max_state_bytes: f.max_state_mib << 20,
        ..Limits::default()
    }
}

/// A function's breaker settings from its config.
pub fn breaker(f: &FunctionConfig) -> BreakerConfig {
    BreakerConfig {
        failures: f.breaker_failures,
        cooldown: f.breaker_cooldown,
        max_cooldown: f.breaker_max_cooldown.max(f.breaker_cooldown),
    }
}

/// What the config asks one slot to run.
pub struct Wanted {
    /// `pipeline/function`.
    pub owner: String,
    /// The pipeline.
    pub pipeline: String,
    /// The function.
    pub function: String,
    /// Position in the chain.
    pub step: usize,
    /// The module file.
    pub path: PathBuf,
    /// Its bytes.
    pub bytes: Vec<u8>,
    /// Their hash.
    pub module_sha256: String,
    /// The init config (JSON).
    pub config_json: String,
    /// Its hash.
    pub config_sha256: String,
    /// Limits.
    pub limits: Limits,
    /// Breaker settings.
    pub breaker: BreakerConfig,
    /// Inputs' fate while open.
    pub on_open: OnOpen,
    /// Batches a new version runs in shadow.
    pub probation: u32,
    /// Held-input budget.
    pub max_held_bytes: u64,
}

/// With `[modules] trusted_keys`, a module runs only with a `<module>.sig`
/// made by one of them for exactly these bytes.
pub fn check_signature(
    config: &EdgeConfig,
    path: &std::path::Path,
    bytes: &[u8],
) -> Result<(), FunctionError> {
    let trusted = config.modules.keys();
    if trusted.is_empty() {
        return Ok(());
    }
    let mut sig_path = path.as_os_str().to_owned();
    sig_path.push(".sig");
    let sig_path = std::path::PathBuf::from(sig_path);
    let refuse = |reason: String| FunctionError::Load {
        path: path.to_path_buf(),
        reason,
    };
    // A signature is a few hundred bytes: a huge file is not one.
    let text = match std::fs::metadata(&sig_path) {
        Ok(m) if m.len() > 64 * 1024 => {
            return Err(refuse(format!(
                "signature {} is {} bytes, not a signature",
                sig_path.display(),
                m.len()
            )))
        }
        Ok(_) => std::fs::read(&sig_path).map_err(|e| {
            refuse(format!("reading its signature {}: {e}", sig_path.display()))
        })?,
        Err(e) => {
            return Err(refuse(format!(
                "[modules] trusted_keys is set, and its signature {} cannot be read ({e}): sign it with `fogline-cloud modules publish`",
                sig_path.display()
            )))
        }
    };
    fogline_protocol::signing::ModuleSignature::parse(&text)
        .and_then(|s| s.verify(bytes, &trusted))
        .map_err(|e| refuse(format!("refused: {e}")))
}

/// Read every function the config's pipelines use (module bytes hashed).
pub fn wanted(config: &EdgeConfig) -> Result<Vec<Wanted>, FunctionError> {
    let mut out = Vec::new();
    for p in &config.pipelines {
        for (step, name) in p.functions.iter().enumerate() {
            let Some(f) = config.functions.get(name) else {
                continue; // validation already reported it
            };
            let path = config.resolve(&f.module);
            let bytes = std::fs::read(&path).map_err(|e| FunctionError::Load {
                path: path.clone(),
                reason: format!("reading the file: {e}"),
            })?;
            check_signature(config, &path, &bytes)?;
            let json = config_json(&f.config).to_string();
            out.push(Wanted {
                owner: format!("{}/{name}", p.name),
                pipeline: p.name.clone(),
                function: name.clone(),
                step,
                module_sha256: sha256_hex(&bytes),
                config_sha256: sha256_hex(json.as_bytes()),
                config_json: json,
                path,
                bytes,
                limits: limits(f),
                breaker: breaker(f),
                on_open: f.on_open,
                probation: f.probation_batches,
                max_held_bytes: (f.max_held_mib as u64) << 20,
            });
        }
    }
    Ok(out)
}

/// Load every module once and start each pipeline's functions: the
/// recorded version with its committed state, and — when the config names
/// another build — that build as a candidate on probation.
pub fn start_chains(
    config: &EdgeConfig,
    runtime: &FunctionRuntime,
    outbox: &mut Outbox,
    store: &ModuleStore,
    now_ms: u64,
) -> Result<Vec<Chain>, VersionError> {
    let wanted = wanted(config)?;
    let running: Vec<String> = wanted.iter().map(|w| w.owner.clone()).collect();
    let orphaned = outbox.orphan_held(&running)?;
    if orphaned > 0 {
        tracing::warn!(
            inputs = orphaned,
            "Inputs held for functions the config no longer has are now dead letters (reason `orphaned`): `fogline-edge dead-letters list --reason orphaned`."
        );
    }
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    let mut load = |path: &Path, sha: &str, bytes: &[u8]| -> Result<Module, FunctionError> {
        if let Some(m) = modules.get(sha) {
            return Ok(m.clone());
        }
        let m = runtime.load_bytes(path, bytes)?;
        modules.insert(sha.to_string(), m.clone());
        Ok(m)
    };
    let held = outbox.held_counts()?;
    let mut keep_state = Vec::new();
    let mut keep_modules = Vec::new();
    let mut by_pipeline: BTreeMap<String, Vec<FunctionSlot>> = BTreeMap::new();
    for w in wanted {
        let module = load(&w.path, &w.module_sha256, &w.bytes)?;
        store
            .put(&w.module_sha256, &w.bytes)
            .map_err(|source| VersionError::Store {
                what: w.path.display().to_string(),
                dir: store.dir.clone(),
                source,
            })?;
        keep_modules.push(w.module_sha256.clone());
        let record = outbox.function_record(&w.owner)?;
        let wanted_version = Version {
            generation: 0,
            module_sha256: w.module_sha256.clone(),
            config_sha256: w.config_sha256.clone(),
            config_json: w.config_json.clone(),
        };
        // What runs now, and what (if anything) goes on probation.
        let (active_spec, active_version, candidate) = match &record {
            None => {
                let generation = outbox.next_generation()?;
                let version = Version {
                    generation,
                    ..wanted_version.clone()
                };
                outbox.activate_version(activate(&w.owner, &version, None))?;
                let spec = spec(module, &w);
                (spec, version, None)
            }
            Some(r) if r.module_sha256 == w.module_sha256 && r.config_sha256 == w.config_sha256 => {
                let version = Version {
                    generation: r.generation,
                    ..wanted_version.clone()
                };
                (spec(module, &w), version, None)
            }
            Some(r) => {
                let refused = r
                    .rejected
                    .as_ref()
                    .is_some_and(|(m, c, _, _)| *m == w.module_sha256 && *c == w.config_sha256);
                let recorded = Version {
                    generation: r.generation,
                    module_sha256: r.module_sha256.clone(),
                    config_sha256: r.config_sha256.clone(),
                    config_json: r.config_json.clone(),
                };
                match store.get(&r.module_sha256) {
                    Some(old_path) => {
                        let old_bytes =
                            std::fs::read(&old_path).map_err(|e| FunctionError::Load {
                                path: old_path.clone(),
                                reason: format!("reading the kept build: {e}"),
                            })?;
                        let old = load(&old_path, &r.module_sha256, &old_bytes)?;
                        keep_modules.push(r.module_sha256.clone());
                        let spec = Spec {
                            module: old,
                            config_json: r.config_json.clone(),
                            limits: w.limits.clone(),
                        };
                        if refused {
                            let why = r.rejected.as_ref().map(|x| x.2.clone()).unwrap_or_default();
                            tracing::warn!(
                                function = %w.owner,
                                module = %w.path.display(),
                                reason = %why,
                                "The configured build of this function was refused before; running the recorded one. Change the module or its config to try again."
                            );
                            (spec, recorded, None)
                        } else {
                            (spec, recorded, Some((module, wanted_version.clone())))
                        }
                    }
                    None => {
                        // The recorded build is gone: the configured one takes
                        // over its state directly (no probation possible).
                        tracing::warn!(
                            function = %w.owner,
                            recorded = %recorded.label(),
                            "The recorded build of this function is not in the module store; the configured build takes over its state without probation."
                        );
                        let version = Version {
                            generation: r.generation,
                            ..wanted_version.clone()
                        };
                        outbox.activate_version(activate(&w.owner, &version, None))?;
                        (spec(module, &w), version, None)
                    }
                }
            }
        };
        let state = outbox.load_state(&w.owner, active_version.generation)?;
        keep_state.push((w.owner.clone(), active_version.generation));
        let started = FunctionInstance::from_module(
            &active_spec.module,
            &w.function,
            &active_spec.config_json,
            active_spec.limits.clone(),
            state.clone(),
        )
        .map_err(|e| (e, state.clone()));
        if let Err((e, _)) = &started {
            tracing::error!(
                function = %w.owner,
                error = %e,
                "Function failed to start; its inputs are set aside until a retry succeeds."
            );
        }
        let mut slot = FunctionSlot::new(
            &w.pipeline,
            &w.function,
            w.step,
            active_spec,
            active_version,
            started,
            w.breaker,
            w.on_open,
            now_ms,
        );
        slot.probation = w.probation.max(1);
        slot.max_held_bytes = w.max_held_bytes;
        if let Some((count, bytes)) = held.get(&w.owner) {
            slot.held = *count;
            slot.held_bytes = *bytes;
        }
        if let Some(r) = &record {
            slot.refused = r
                .rejected
                .as_ref()
                .map(|(m, c, _, _)| (m.clone(), c.clone()));
        }
        if let Some((module, version)) = candidate {
            let spec = Spec {
                module,
                config_json: w.config_json.clone(),
                limits: w.limits.clone(),
            };
            if let Some(write) = propose(&mut slot, outbox, spec, version, now_ms)? {
                keep_state.push((w.owner.clone(), write));
            }
        }
        by_pipeline
            .entry(w.pipeline.clone())
            .or_default()
            .push(slot);
    }
    outbox.prune_state(&keep_state)?;
    store.prune(&keep_modules);
    Ok(config
        .pipelines
        .iter()
        .map(|p| {
            Chain::new(
                p.name.clone(),
                by_pipeline.remove(&p.name).unwrap_or_default(),
            )
        })
        .collect())
}

fn spec(module: Module, w: &Wanted) -> Spec {
    Spec {
        module,
        config_json: w.config_json.clone(),
        limits: w.limits.clone(),
    }
}

fn activate(owner: &str, v: &Version, retire: Option<u64>) -> VersionWrite {
    VersionWrite::Activate {
        owner: owner.to_string(),
        generation: v.generation,
        module_sha256: v.module_sha256.clone(),
        config_sha256: v.config_sha256.clone(),
        config_json: v.config_json.clone(),
        retire,
    }
}

/// Put a new version on `slot`: a candidate started from the running
/// version's state (committed under a new generation), or — if nothing runs
/// — the running version directly. A candidate that fails to start is
/// refused at once. Returns the new generation if it holds state now.
pub fn propose(
    slot: &mut FunctionSlot,
    outbox: &mut Outbox,
    spec: Spec,
    version: Version,
    now_ms: u64,
) -> Result<Option<u64>, VersionError> {
    let generation = outbox.next_generation()?;
    let version = Version {
        generation,
        ..version
    };
    let from = match &slot.active {
        Some(a) => a.state().clone(),
        None => slot.start_state.clone(),
    };
    let seed = VersionWrite::Seed {
        owner: slot.owner.clone(),
        generation,
        entries: from.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
    };
    if slot.active.is_none() {
        // Nothing runs (it failed to start): the new version takes over now.
        tracing::info!(
            function = %slot.owner,
            version = %version.label(),
            "New version takes over a function that was not running."
        );
        outbox.activate_version(seed)?;
        outbox.activate_version(activate(
            &slot.owner,
            &version,
            Some(slot.version.generation),
        ))?;
        slot.spec = spec;
        slot.version = version;
        slot.start_state = from;
        slot.candidate = None;
        slot.breaker = super::breaker::Breaker::new(slot.breaker_config());
        slot.last_error = None;
        return Ok(Some(generation));
    }
    match FunctionInstance::from_module(
        &spec.module,
        &slot.function,
        &spec.config_json,
        spec.limits.clone(),
        from,
    ) {
        Ok(instance) => {
            outbox.activate_version(seed)?;
            tracing::info!(
                function = %slot.owner,
                running = %slot.version.label(),
                candidate = %version.label(),
                probation_batches = slot.probation,
                "New version started on probation, in shadow of the running one."
            );
            slot.candidate = Some(Candidate {
                instance,
                version,
                passed: 0,
            });
            Ok(Some(generation))
        }
        Err(e) => {
            refuse(slot, outbox, version, e.to_string(), now_ms)?;
            Ok(None)
        }
    }
}

/// A new version failed to start: record it as refused (not tried again
/// until its module or config changes); the running version carries on.
pub fn refuse(
    slot: &mut FunctionSlot,
    outbox: &mut Outbox,
    version: Version,
    reason: String,
    now_ms: u64,
) -> Result<(), VersionError> {
    tracing::warn!(
        function = %slot.owner,
        version = %version.label(),
        error = %reason,
        "New version failed to start: rolled back; the running version and its state carry on."
    );
    outbox.activate_version(VersionWrite::Reject {
        owner: slot.owner.clone(),
        generation: version.generation,
        module_sha256: version.module_sha256.clone(),
        config_sha256: version.config_sha256.clone(),
        reason: reason.clone(),
    })?;
    slot.refused = Some((version.module_sha256.clone(), version.config_sha256.clone()));
    slot.note_swap(now_ms, "rolled_back", &version, Some(reason));
    super::events::Swapped {
        owner: &slot.owner,
        outcome: "rolled_back",
    }
    .emit();
    Ok(())
}

/// How long the daemon waits between looks at the config and module files.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);
