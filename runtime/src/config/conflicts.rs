//! Checks across sections: settings that each make sense alone but
//! contradict each other — the edge subscribing to its own endpoint, two
//! listeners on one address, no way in at all, endpoint settings for an
//! endpoint that does not run.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::EdgeConfig;

impl EdgeConfig {
    /// Appends a problem, naming its keys and values, for each contradiction.
    pub(super) fn check_conflicts(&self, p: &mut Vec<String>) {
        let b = &self.broker;
        let external = self.external_broker_enabled();
        let listeners = self.listeners();

        if b.embedded && external {
            if let Some((key, addr)) = self.own_endpoint_in_mqtt_broker(&listeners) {
                p.push(format!(
                    "mqtt.broker: `{}` is this gateway's own MQTT endpoint ({key} = {addr}): the edge \
                     would subscribe to itself, and the endpoint refuses every SUBSCRIBE. Sensors \
                     publish to the endpoint directly: remove [mqtt] (or set mqtt.enabled = false), \
                     or point mqtt.broker at another broker",
                    self.mqtt.broker
                ));
            }
        }
        if !b.embedded && !external {
            p.push(
                "mqtt.enabled: false, and broker.embedded is false too: nothing would take MQTT in; \
                 set [broker] embedded = true (sensors publish to the gateway) or enable [mqtt] \
                 (subscribe to a broker)"
                    .to_string(),
            );
        }
        if !b.embedded {
            if b.tls.is_some() {
                p.push(
                    "broker.tls: set, but broker.embedded = false: the endpoint does not run, so \
                     neither does its TLS listener; set [broker] embedded = true or remove [broker.tls]"
                        .to_string(),
                );
            }
            if !b.users.is_empty() {
                p.push(format!(
                    "broker.users: {} user(s), but broker.embedded = false: the endpoint does not \
                     run; set [broker] embedded = true or remove [[broker.users]]",
                    b.users.len()
                ));
            }
        }
        for (i, (key_a, a)) in listeners.iter().enumerate() {
            for (key_b, c) in &listeners[i + 1..] {
                if same_socket(*a, *c) {
                    p.push(format!(
                        "{key_b}: {c} is also {key_a} ({a}): two listeners cannot share a port; \
                         change one of them"
                    ));
                }
            }
        }
    }

    /// Every address this daemon listens on, with its key.
    fn listeners(&self) -> Vec<(&'static str, SocketAddr)> {
        let b = &self.broker;
        let mut out = Vec::new();
        if b.embedded {
            if b.plaintext {
                out.push(("broker.listen", b.listen));
            }
            if let Some(v5) = b.listen_v5 {
                out.push(("broker.listen_v5", v5));
            }
            if let Some(t) = &b.tls {
                out.push(("broker.tls.listen", t.listen));
            }
        }
        if self.metrics.enabled {
            out.push(("metrics.listen", self.metrics.listen));
        }
        out
    }

    /// The endpoint listener `mqtt.broker` points at, if it does. Only IP
    /// literals and `localhost` are compared: other names would need DNS,
    /// which a config check must not wait on.
    fn own_endpoint_in_mqtt_broker(
        &self,
        listeners: &[(&'static str, SocketAddr)],
    ) -> Option<(&'static str, SocketAddr)> {
        let (host, port) = self.mqtt.broker.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let host = host.trim_matches(['[', ']']);
        let ips: Vec<IpAddr> = if host.eq_ignore_ascii_case("localhost") {
            vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
        } else {
            vec![host.parse().ok()?]
        };
        listeners
            .iter()
            .filter(|(key, addr)| key.starts_with("broker.") && addr.port() == port)
            .find(|(_, addr)| ips.iter().any(|ip| reaches(*ip, addr.ip())))
            .copied()
    }
}

/// Whether connecting to `target` reaches a socket listening on `listen`.
fn reaches(target: IpAddr, listen: IpAddr) -> bool {
    target == listen
        // A wildcard listener takes loopback connections; connecting to
        // the wildcard address reaches this host.
        || (listen.is_unspecified() && (target.is_loopback() || target.is_unspecified()))
        || (target.is_unspecified() && listen.is_loopback())
}

/// Whether two listeners would fight over one port (port 0: the system
/// picks a free one, never a conflict).
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}
