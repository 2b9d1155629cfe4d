//! [`FunctionRuntime`] (the engine, the sandboxed linker, the epoch ticker,
//! the compile cache) and [`Module`] (a compiled, pre-linked component).

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{Cache, CacheConfig, Config, Engine};

use super::bindings::{FunctionPre, PACKAGE_VERSION};
use super::error::FunctionError;
use super::sandbox::StoreState;

/// How the runtime is set up.
#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// Where compiled modules are cached, so a restart does not recompile.
    /// `None`: compile on every load.
    pub cache_dir: Option<PathBuf>,
    /// How often the epoch advances; call deadlines are measured in these
    /// ticks, so a deadline fires between `call_timeout` and
    /// `call_timeout + epoch_tick` after the call started.
    pub epoch_tick: Duration,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            cache_dir: None,
            epoch_tick: Duration::from_millis(10),
        }
    }
}

/// What runtime, modules and instances share. The epoch ticker runs while
/// any of them is alive: instances need it for their deadlines.
pub(crate) struct Shared {
    pub(crate) engine: Engine,
    pub(crate) epoch_tick: Duration,
    _ticker: Ticker,
}

/// The thread that advances the engine's epoch every `epoch_tick`. Stops
/// (and is joined) when dropped.
struct Ticker {
    // Dropping the sender wakes the thread with `Disconnected`.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(engine: Engine, tick: Duration) -> Result<Self, FunctionError> {
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("fogline-epoch".into())
            .spawn(move || {
                // Ends on a message or when the sender is dropped.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
                    engine.increment_epoch();
                }
            })
            .map_err(|e| FunctionError::Engine {
                reason: format!("cannot start the epoch thread: {e}"),
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // The thread only sleeps and bumps a counter; it cannot panic.
            let _ = thread.join();
        }
    }
}

/// The function runtime: one per daemon.
///
/// Holds the wasmtime [`Engine`] (epoch interruption on, optional on-disk
/// compile cache), a [`Linker`] that grants WASI p2 with *no* capabilities
/// (no preopened directories, no environment, no arguments, no network;
/// stdin empty, stdout/stderr discarded; blocking refused) plus the
/// contract's `host` interface, and a background thread advancing the epoch.
pub struct FunctionRuntime {
    shared: Arc<Shared>,
    linker: Linker<StoreState>,
    cache: Option<Cache>,
    // Serialises loads so `Module::loaded_from_cache` is exact.
    load_lock: Mutex<()>,
}

impl FunctionRuntime {
    /// Set up the engine, linker, cache and epoch thread.
    pub fn new(opts: RuntimeOptions) -> Result<Self, FunctionError> {
        let engine_err = |what: &str, e: &dyn std::fmt::Display| FunctionError::Engine {
            reason: format!("{what}: {e}"),
        };
        if opts.epoch_tick.is_zero() {
            return Err(FunctionError::Engine {
                reason: "epoch_tick must be > 0".into(),
            });
        }
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        let cache = match &opts.cache_dir {
            None => None,
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    engine_err(&format!("creating cache directory {}", dir.display()), &e)
                })?;
                let mut cache_config = CacheConfig::new();
                cache_config.with_directory(dir);
                let cache = Cache::new(cache_config).map_err(|e| {
                    engine_err(&format!("opening cache directory {}", dir.display()), &e)
                })?;
                config.cache(Some(cache.clone()));
                Some(cache)
            }
        };
        let engine = Engine::new(&config).map_err(|e| engine_err("creating engine", &e))?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| engine_err("linking WASI", &e))?;
        super::imports::add_to_linker(&mut linker)
            .map_err(|e| engine_err("linking the host interface", &e))?;
        super::events::describe();

        let ticker = Ticker::start(engine.clone(), opts.epoch_tick)?;
        Ok(Self {
            shared: Arc::new(Shared {
                engine,
                epoch_tick: opts.epoch_tick,
                _ticker: ticker,
            }),
            linker,
            cache,
            load_lock: Mutex::new(()),
        })
    }

    /// Compile the component at `path`, or load its compiled code from the
    /// cache directory (keyed by a SHA-256 of the wasm bytes and the
    /// engine's version and settings; a corrupt entry is recompiled and
    /// replaced). Checks that the component implements the
    /// `fogline:function/function` world and imports nothing the sandbox
    /// does not provide.
    pub fn load(&self, path: &Path) -> Result<Module, FunctionError> {
        let bytes = std::fs::read(path).map_err(|e| FunctionError::Load {
            path: path.to_path_buf(),
            reason: format!("reading the file: {e}"),
        })?;
        self.load_bytes(path, &bytes)
    }

    /// [`load`](Self::load) from bytes already read (`path` names them in
    /// errors).
    pub fn load_bytes(&self, path: &Path, bytes: &[u8]) -> Result<Module, FunctionError> {
        let load_err = |reason: String| FunctionError::Load {
            path: path.to_path_buf(),
            reason,
        };
        if !bytes.starts_with(b"\0asm") {
            return Err(load_err(
                "not a WebAssembly binary (no `\\0asm` header); build functions with \
                 `cargo build --release --target wasm32-wasip2`"
                    .into(),
            ));
        }
        // A poisoned lock only means another load panicked; the guard
        // protects no data.
        let guard = self
            .load_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let hits_before = self.cache.as_ref().map(Cache::cache_hits);
        let component = Component::new(&self.shared.engine, bytes).map_err(|e| {
            let hint = if bytes.get(4..8) == Some(&[1, 0, 0, 0]) {
                " (this is a core module, not a component: build for wasm32-wasip2)"
            } else {
                ""
            };
            load_err(format!("{e:#}{hint}"))
        })?;
        check_contract_version(&self.shared.engine, &component).map_err(&load_err)?;
        let loaded_from_cache = match (&self.cache, hits_before) {
            (Some(cache), Some(before)) => cache.cache_hits() > before,
            _ => false,
        };
        drop(guard);

        let instance_pre = self.linker.instantiate_pre(&component).map_err(|e| {
            load_err(format!(
                "imports something the sandbox does not provide: {e:#}"
            ))
        })?;
        let pre = FunctionPre::new(instance_pre).map_err(|e| {
            load_err(format!(
                "does not implement the fogline:function/function@{PACKAGE_VERSION} world (init, restore, process, tick): {e:#}"
            ))
        })?;
        Ok(Module {
            inner: Arc::new(ModuleInner {
                path: path.to_path_buf(),
                pre,
                loaded_from_cache,
                shared: Arc::clone(&self.shared),
            }),
        })
    }

    /// The engine (tests build stores on it).
    #[cfg(test)]
    pub(crate) fn engine(&self) -> Engine {
        self.shared.engine.clone()
    }

    /// Cache statistics since the runtime started: `(hits, misses)`;
    /// `None` without a cache directory.
    pub fn cache_stats(&self) -> Option<(usize, usize)> {
        self.cache
            .as_ref()
            .map(|c| (c.cache_hits(), c.cache_misses()))
    }
}

/// A compiled, pre-linked function module. Cheap to clone; instantiate it
/// with [`FunctionInstance::new`](super::FunctionInstance::new).
#[derive(Clone)]
pub struct Module {
    pub(crate) inner: Arc<ModuleInner>,
}

pub(crate) struct ModuleInner {
    pub(crate) path: PathBuf,
    pub(crate) pre: FunctionPre<StoreState>,
    loaded_from_cache: bool,
    pub(crate) shared: Arc<Shared>,
}

impl Module {
    /// The file it was loaded from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether the compiled code came from the cache directory rather than
    /// a fresh compilation.
    pub fn loaded_from_cache(&self) -> bool {
        self.inner.loaded_from_cache
    }
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("path", &self.inner.path)
            .field("loaded_from_cache", &self.inner.loaded_from_cache)
            .finish_non_exhaustive()
    }
}

/// A component built against another version of the contract is named as
/// such, with what to do, rather than failing with a linker error.
fn check_contract_version(engine: &Engine, component: &Component) -> Result<(), String> {
    let ty = component.component_type();
    for (name, _) in ty.imports(engine) {
        let Some(rest) = name.strip_prefix("fogline:function/") else {
            continue;
        };
        let version = rest.split_once('@').map(|(_, v)| v).unwrap_or("");
        let compatible = version
            .split('.')
            .take(2)
            .eq(PACKAGE_VERSION.split('.').take(2));
        if !compatible {
            return Err(format!(
                "it was built for the function contract {version:?} (it imports `{name}`); \
                 this daemon runs fogline:function@{PACKAGE_VERSION}: rebuild it against the \
                 current fogline-sdk (modules/README.md, \"Migrating from 0.1\")"
            ));
        }
    }
    Ok(())
}
