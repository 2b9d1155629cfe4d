//! Sample telemetry for tests and benches.

use fogline_protocol::Record;

/// Sample telemetry like the edge produces: `n` 100-byte-ish JSON readings from
/// `sensors` sensors, seq from 1, one reading per sensor every 100 ms, temperature and
/// humidity drifting. Deterministic for a given seed. Used by tests and benchmarks.
pub fn sample_readings(n: usize, sensors: usize, seed: u64) -> Vec<Record> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let sensors = sensors.max(1);
    let mut temp: Vec<f64> = (0..sensors).map(|_| rng.random_range(15.0..25.0)).collect();
    let mut hum: Vec<f64> = (0..sensors).map(|_| rng.random_range(35.0..60.0)).collect();
    let mut counter = vec![0u64; sensors];
    let start_ms = 1_764_000_000_000u64;
    (0..n)
        .map(|i| {
            let s = i % sensors;
            counter[s] += 1;
            temp[s] = (temp[s] + rng.random_range(-0.05..0.05)).clamp(-40.0, 85.0);
            hum[s] = (hum[s] + rng.random_range(-0.1..0.1)).clamp(0.0, 100.0);
            let ts = start_ms + (i / sensors) as u64 * 100 + rng.random_range(0..20);
            let payload = format!(
                r#"{{"id":"s{s}-{:06}","sensor":"s{s}","temp":{:.2},"hum":{:.1},"ts":{ts}}}"#,
                counter[s], temp[s], hum[s]
            );
            Record {
                seq: i as u64 + 1,
                stream: format!("sensors/s{s}"),
                timestamp_ms: ts,
                payload: payload.into_bytes(),
            }
        })
        .collect()
}
