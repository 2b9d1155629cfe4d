//! Threshold filter: passes readings whose numeric JSON field is strictly
//! above `above` and/or strictly below `below`.
//!
//! ```toml
//! [functions.hot]
//! module = "threshold.wasm"
//! config = { field = "temp", above = 30.0 }   # and/or below = -5.0
//! ```
//!
//! With both bounds, a reading passes if it is above `above` **or** below
//! `below` (an alarm band), unless `above < below`, in which case it must lie
//! strictly between them (a pass band). A payload that is not JSON, lacks the
//! field or holds a non-number there is rejected (dead-lettered) with the
//! reason.

use fogline_sdk::prelude::*;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Top-level or dotted path of the numeric field.
    field: String,
    above: Option<f64>,
    below: Option<f64>,
}

struct Threshold {
    field: String,
    bounds: Bounds,
}

enum Bounds {
    Above(f64),
    Below(f64),
    /// Outside `[below, above]`: `v > above || v < below`.
    Outside {
        above: f64,
        below: f64,
    },
    /// Inside `(above, below)`: `above < v < below`.
    Between {
        above: f64,
        below: f64,
    },
}

impl Bounds {
    fn passes(&self, v: f64) -> bool {
        match *self {
            Bounds::Above(a) => v > a,
            Bounds::Below(b) => v < b,
            Bounds::Outside { above, below } => v > above || v < below,
            Bounds::Between { above, below } => v > above && v < below,
        }
    }
}

impl Function for Threshold {
    fn init(config: fogline_sdk::Config) -> Result<Self> {
        let Config {
            field,
            above,
            below,
        } = config.parse()?;
        if field.is_empty() {
            bail!("invalid config: `field` is empty");
        }
        for (name, bound) in [("above", above), ("below", below)] {
            if bound.is_some_and(|b| !b.is_finite()) {
                bail!("invalid config: `{name}` must be a finite number");
            }
        }
        let bounds = match (above, below) {
            (Some(a), None) => Bounds::Above(a),
            (None, Some(b)) => Bounds::Below(b),
            (Some(above), Some(below)) if above < below => Bounds::Between { above, below },
            (Some(above), Some(below)) => Bounds::Outside { above, below },
            (None, None) => bail!("invalid config: set `above`, `below` or both"),
        };
        Ok(Threshold { field, bounds })
    }

    fn on_message(&mut self, msg: Message, out: &mut Output) -> Result<()> {
        if self.bounds.passes(msg.json_f64(&self.field)?) {
            out.emit(msg);
        }
        Ok(())
    }
}

export_function!(Threshold);
