//! Simulated sensors: readings with unique ids, published at QoS 1.
//! The temperature is a function of the id, so the test knows which
//! readings a threshold function must pass.

use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

/// The temperature of reading `n` of sensor `s`: spread over 10..40.
pub fn temperature(sensor: usize, n: usize) -> f64 {
    let x = (sensor * 7919 + n * 104_729) % 3000;
    10.0 + x as f64 / 100.0
}

pub fn reading_id(sensor: usize, n: usize) -> String {
    format!("s{sensor}-{n:07}")
}

pub fn topic(sensor: usize) -> String {
    format!("sensors/s{sensor}/reading")
}

/// About 100 bytes of JSON.
pub fn payload(sensor: usize, n: usize, ts: u64) -> String {
    format!(
        r#"{{"id":"{}","sensor":"s{sensor}","n":{n},"temp":{:.2},"hum":{:.1},"ts":{ts}}}"#,
        reading_id(sensor, n),
        temperature(sensor, n),
        40.0 + (n % 200) as f64 / 10.0,
    )
}

/// Publish `per_sensor` readings from each of `sensors` sensors (one MQTT
/// connection each, QoS 1), calling `progress(published_so_far)` now and then.
/// Returns when the broker acknowledged every one.
pub async fn publish(
    broker_host: &str,
    broker_port: u16,
    sensors: usize,
    per_sensor: usize,
    rate_per_sensor: Option<u32>,
    progress: impl Fn(usize) + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let progress = std::sync::Arc::new(progress);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for s in 0..sensors {
        let mut o = MqttOptions::new(
            format!("sensor-{s}-{}", rand::random::<u32>()),
            broker_host,
            broker_port,
        );
        o.set_keep_alive(Duration::from_secs(30));
        o.set_inflight(100);
        let (client, mut el) = AsyncClient::new(o, 1000);
        let progress = progress.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let pub_task = tokio::spawn(async move {
                let gap = rate_per_sensor.map(|r| Duration::from_secs_f64(1.0 / r as f64));
                for n in 0..per_sensor {
                    let ts = fogline_edge::clock::now_ms();
                    client
                        .publish(topic(s), QoS::AtLeastOnce, false, payload(s, n, ts))
                        .await?;
                    if let Some(g) = gap {
                        tokio::time::sleep(g).await;
                    }
                }
                Ok::<_, anyhow::Error>(client)
            });
            let mut acked = 0usize;
            while acked < per_sensor {
                match el.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked += 1;
                        let total = done.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
                        if total.is_multiple_of(500) {
                            progress(total);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, sensor = s, "sensor connection error; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            let client = pub_task.await??;
            let _ = client.disconnect().await;
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// [`publish`] on its own thread and runtime, for tests that kill and
/// restart processes while readings flow.
pub struct BackgroundPublisher {
    published: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl BackgroundPublisher {
    /// Starts publishing `per_sensor` readings from each of `sensors`
    /// sensors to the broker on 127.0.0.1:`port`.
    pub fn start(
        port: u16,
        sensors: usize,
        per_sensor: usize,
        rate_per_sensor: Option<u32>,
    ) -> Self {
        let published = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let p = published.clone();
        let thread = std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(publish(
                    "127.0.0.1",
                    port,
                    sensors,
                    per_sensor,
                    rate_per_sensor,
                    move |n| p.store(n, std::sync::atomic::Ordering::Release),
                ))
        });
        Self { published, thread }
    }

    /// Readings the broker acknowledged so far (updated every 500).
    pub fn published(&self) -> usize {
        self.published.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits up to `timeout` until at least `n` readings are acknowledged.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        crate::process::wait_until(timeout, || self.published() >= n)
    }

    /// Waits until every reading is acknowledged.
    pub fn finish(self) -> anyhow::Result<()> {
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("publisher thread panicked"))?
    }
}
