//! Prometheus metrics: what an operator needs to see that the overlay is healthy (leases
//! programmed, churn, store trouble, renewals, time left on the own lease).
//!
//! One process-wide registry; the daemon and the stores bump counters, `/metrics` renders the
//! text exposition format 0.0.4 (which `promtool check metrics` accepts).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// flanneld's metric families.
pub struct Metrics {
    registry: Registry,
    build_info: IntGaugeVec,
    leases: IntGaugeVec,
    lease_events: IntCounterVec,
    store_errors: IntCounter,
    lease_renewals: IntCounter,
    lease_expiry: Gauge,
    dp_packets: IntCounterVec,
    dp_bytes: IntCounterVec,
    dp_drops: IntCounterVec,
    /// Unix time the own lease expires (0: unknown or never).
    expiry_unix: AtomicU64,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let build_info = IntGaugeVec::new(
        Opts::new(
            "flanneld_build_info",
            "flanneld build information; always 1.",
        ),
        &["version"],
    )?;
    let leases = IntGaugeVec::new(
        Opts::new(
            "flanneld_leases",
            "Remote leases currently programmed into the backend.",
        ),
        &["backend"],
    )?;
    let lease_events = IntCounterVec::new(
        Opts::new(
            "flanneld_lease_events_total",
            "Remote lease events handed to the backend, by type.",
        ),
        &["type"],
    )?;
    let store_errors = IntCounter::new(
        "flanneld_store_errors_total",
        "Failed requests to the subnet store (etcd or the Kubernetes API).",
    )?;
    let lease_renewals = IntCounter::new(
        "flanneld_lease_renewals_total",
        "Successful renewals of this host's lease.",
    )?;
    let lease_expiry = Gauge::new(
        "flanneld_lease_expiry_seconds",
        "Seconds until this host's lease expires (absent when it never expires).",
    )?;
    let dp_packets = IntCounterVec::new(
        Opts::new(
            "flanneld_datapath_packets_total",
            "Packets moved by a user-space data path (udp, user-space wireguard): out = read from the TUN device and sent, in = received and handed to the TUN device.",
        ),
        &["backend", "direction"],
    )?;
    let dp_bytes = IntCounterVec::new(
        Opts::new(
            "flanneld_datapath_bytes_total",
            "Bytes of the datagrams a user-space data path sent (out) or received (in), encapsulation included.",
        ),
        &["backend", "direction"],
    )?;
    let dp_drops = IntCounterVec::new(
        Opts::new(
            "flanneld_datapath_dropped_packets_total",
            "Packets a user-space data path dropped: no_peer (no lease routes the destination or the peer is unusable), send_error, tun_write_error.",
        ),
        &["backend", "reason"],
    )?;
    registry.register(Box::new(dp_packets.clone()))?;
    registry.register(Box::new(dp_bytes.clone()))?;
    registry.register(Box::new(dp_drops.clone()))?;
    registry.register(Box::new(build_info.clone()))?;
    registry.register(Box::new(leases.clone()))?;
    registry.register(Box::new(lease_events.clone()))?;
    registry.register(Box::new(store_errors.clone()))?;
    registry.register(Box::new(lease_renewals.clone()))?;
    build_info.with_label_values(&[crate::VERSION]).set(1);
    for t in ["added", "removed"] {
        lease_events.with_label_values(&[t]);
    }
    Ok(Metrics {
        registry,
        build_info,
        leases,
        lease_events,
        store_errors,
        lease_renewals,
        lease_expiry,
        dp_packets,
        dp_bytes,
        dp_drops,
        expiry_unix: AtomicU64::new(0),
    })
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| build().expect("static metric definitions are valid"))
}

/// The counters of one user-space data path, resolved once so that a worker only does an
/// atomic add per batch.
#[derive(Clone)]
pub struct DatapathCounters {
    /// Packets sent.
    pub packets_out: IntCounter,
    /// Packets received.
    pub packets_in: IntCounter,
    /// Bytes sent.
    pub bytes_out: IntCounter,
    /// Bytes received.
    pub bytes_in: IntCounter,
    /// Dropped: nothing routes the destination.
    pub drop_no_peer: IntCounter,
    /// Dropped: the UDP send failed.
    pub drop_send: IntCounter,
    /// Dropped: the TUN write failed.
    pub drop_tun: IntCounter,
}

impl Metrics {
    /// The data-path counters of `backend` (the families appear in `/metrics` from now on).
    pub fn datapath(&self, backend: &str) -> DatapathCounters {
        let p = |d| self.dp_packets.with_label_values(&[backend, d]);
        let b = |d| self.dp_bytes.with_label_values(&[backend, d]);
        let x = |r| self.dp_drops.with_label_values(&[backend, r]);
        DatapathCounters {
            packets_out: p("out"),
            packets_in: p("in"),
            bytes_out: b("out"),
            bytes_in: b("in"),
            drop_no_peer: x("no_peer"),
            drop_send: x("send_error"),
            drop_tun: x("tun_write_error"),
        }
    }

    /// Records how many remote leases the backend has now.
    pub fn set_leases(&self, backend: &str, n: usize) {
        self.leases
            .with_label_values(&[backend])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts lease events of a batch.
    pub fn lease_events(&self, added: usize, removed: usize) {
        self.lease_events
            .with_label_values(&["added"])
            .inc_by(added as u64);
        self.lease_events
            .with_label_values(&["removed"])
            .inc_by(removed as u64);
    }

    /// Counts one failed store request.
    pub fn store_error(&self) {
        self.store_errors.inc();
    }

    /// Counts a successful renewal.
    pub fn lease_renewed(&self) {
        self.lease_renewals.inc();
    }

    /// Records when the own lease expires (`None`: never, e.g. kube mode or a reservation).
    pub fn set_lease_expiry(&self, at: Option<SystemTime>) {
        let secs = at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        self.expiry_unix.store(secs, Ordering::Relaxed);
    }

    /// The text exposition of every family.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        let expiry = self.expiry_unix.load(Ordering::Relaxed);
        if expiry > 0 {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.lease_expiry.set(expiry as f64 - now as f64);
            families.extend(prometheus::core::Collector::collect(&self.lease_expiry));
        }
        let _ = &self.build_info;
        let mut out = vec![];
        if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
            tracing::error!("encoding metrics: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_every_family_with_help() {
        let m = metrics();
        m.set_leases("vxlan", 3);
        m.lease_events(2, 1);
        m.store_error();
        m.lease_renewed();
        m.set_lease_expiry(Some(
            SystemTime::now() + std::time::Duration::from_secs(100),
        ));
        let text = m.render();
        for name in [
            "flanneld_build_info",
            "flanneld_leases",
            "flanneld_lease_events_total",
            "flanneld_store_errors_total",
            "flanneld_lease_renewals_total",
            "flanneld_lease_expiry_seconds",
        ] {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
        }
        assert!(
            text.contains("flanneld_leases{backend=\"vxlan\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("flanneld_lease_events_total{type=\"added\"}"),
            "{text}"
        );
        assert!(
            !text.contains("flanneld_datapath"),
            "no data path yet: {text}"
        );
        let dp = m.datapath("udp");
        dp.packets_out.inc_by(3);
        dp.drop_no_peer.inc();
        let text = m.render();
        assert!(
            text.contains("flanneld_datapath_packets_total{backend=\"udp\",direction=\"out\"} 3"),
            "{text}"
        );
        assert!(
            text.contains(
                "flanneld_datapath_dropped_packets_total{backend=\"udp\",reason=\"no_peer\"} 1"
            ),
            "{text}"
        );
    }
}
