//! The example Fogline functions, built for `wasm32-wasip2` by this crate's
//! build script, and where to find them.
//!
//! Depend on this crate (usually as a dev-dependency) to get paths to ready
//! WebAssembly components for tests, benches and the demo. The build script
//! compiles `modules/` (the guest workspace: SDK + examples) with a nested
//! `cargo build --release --target wasm32-wasip2` into `target/wasm`, so the
//! first build takes a while and later ones are cached.
#![warn(missing_docs)]

use std::path::Path;

/// The threshold filter (`modules/examples/threshold`): passes readings
/// whose numeric field is above and/or below a bound.
pub fn threshold() -> &'static Path {
    Path::new(env!("FOGLINE_WASM_THRESHOLD"))
}

/// The tumbling-window average (`modules/examples/window-avg`).
pub fn window_avg() -> &'static Path {
    Path::new(env!("FOGLINE_WASM_WINDOW_AVG"))
}

/// Report by exception per sensor (`modules/examples/deadband`).
pub fn deadband() -> &'static Path {
    Path::new(env!("FOGLINE_WASM_DEADBAND"))
}

/// Unit conversion of a numeric field (`modules/examples/scale`).
pub fn scale() -> &'static Path {
    Path::new(env!("FOGLINE_WASM_SCALE"))
}

/// The first reading per stream and interval (`modules/examples/downsample`).
pub fn downsample() -> &'static Path {
    Path::new(env!("FOGLINE_WASM_DOWNSAMPLE"))
}

/// An alarm with hysteresis that commands an actuator (`modules/examples/alert`).
pub fn alert() -> &'static Path {
    Path::new(env!("FOGLINE_WASM_ALERT"))
}

/// A test fixture that misbehaves on purpose (`modules/examples/hostile`:
/// traps, spins, exhausts memory, returns invalid output, as its config
/// says). For sandbox tests only; never deploy it. Not part of [`all`].
pub fn hostile() -> &'static Path {
    Path::new(env!("FOGLINE_WASM_HOSTILE"))
}

/// The deployable example functions, by their directory in `modules/examples/`.
pub fn all() -> [(&'static str, &'static Path); 6] {
    [
        ("threshold", threshold()),
        ("window-avg", window_avg()),
        ("deadband", deadband()),
        ("scale", scale()),
        ("downsample", downsample()),
        ("alert", alert()),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn components_exist_and_are_components() {
        for (name, path) in super::all()
            .into_iter()
            .chain([("hostile", super::hostile())])
        {
            let bytes = std::fs::read(path)
                .unwrap_or_else(|e| panic!("{name}: reading {}: {e}", path.display()));
            // Component binaries: "\0asm", then version 0x0d and layer 1.
            assert_eq!(&bytes[..4], b"\0asm", "{name}: not WASM");
            assert_eq!(
                &bytes[6..8],
                &[1, 0],
                "{name}: a core module, not a component"
            );
        }
    }
}
