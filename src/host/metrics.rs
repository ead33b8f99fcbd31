//! Prometheus text exposition of a [`MetricsSnapshot`] (prometheus-client).
//!
//! The host keeps its counters as plain integers on the tick thread (no atomics on the hot
//! path); a scrape builds a registry from a snapshot. Histograms are kept with hdrhistogram and
//! exported as quantile gauges (`quantile="0.5" | "0.99" | "0.999"`) plus a count.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::stats::{Hist, MetricsSnapshot};

type Labels = Vec<(String, String)>;
/// prometheus-client's f64 gauge, whose storage is a std atomic: the scrape's registry, not
/// plugbus's concurrency, so it is exempt from the sync-module rule.
#[allow(clippy::disallowed_types)]
type F64Gauge = Gauge<f64, std::sync::atomic::AtomicU64>;

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    registry.register(name, help, f.clone());
    f
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, F64Gauge> {
    let f = Family::<Labels, F64Gauge>::default();
    registry.register(name, help, f.clone());
    f
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn quantiles(family: &Family<Labels, F64Gauge>, base: &[(&str, &str)], h: &Hist, scale: f64) {
    for (q, name) in [(0.5, "0.5"), (0.99, "0.99"), (0.999, "0.999")] {
        let mut l = labels(base);
        l.push(("quantile".into(), name.into()));
        family.get_or_create(&l).set(h.quantile(q) as f64 * scale);
    }
}

impl MetricsSnapshot {
    /// The snapshot as Prometheus text (OpenMetrics), for a `/metrics` endpoint.
    pub fn to_prometheus(&self) -> String {
        let mut r = Registry::with_prefix("plugbus");
        let offered = counter_family(&mut r, "events_offered", "Events offered to the host, by type");
        for (ty, n) in self.host.offered_by_type() {
            offered.get_or_create(&labels(&[("type", ty)])).inc_by(n);
        }
        let host = counter_family(&mut r, "host", "Host-wide counters");
        for (what, n) in [
            ("ticks", self.host.ticks),
            ("filtered", self.host.filtered),
            ("encoded", self.host.encoded),
            ("moves_offered", self.host.moves_offered),
            ("actions", self.host.actions),
            ("wake_windows", self.host.wake_windows),
            ("wake_windows_used", self.host.wake_windows_used),
            ("pool_hits", self.pool.hits),
            ("pool_misses", self.pool.misses),
        ] {
            host.get_or_create(&labels(&[("what", what)])).inc_by(n);
        }
        let lat = gauge_family(&mut r, "latency_seconds", "Latency quantiles (hdrhistogram)");
        quantiles(&lat, &[("of", "encode")], &self.host.encode_ns, 1e-9);
        quantiles(&lat, &[("of", "end_tick")], &self.host.end_tick_ns, 1e-9);
        let sent = counter_family(&mut r, "plugin", "Per-plugin counters");
        let disc = counter_family(&mut r, "plugin_disconnects", "Plugin disconnections by reason");
        let batch = gauge_family(&mut r, "batch_events", "Events per batch frame, quantiles");
        for (id, p) in &self.plugins {
            for (what, n) in [
                ("events_sent", p.events_sent),
                ("moves_sent", p.moves_sent),
                ("moves_conflated", p.moves_conflated),
                ("overflowed_frames", p.overflowed_frames),
                ("frames_sent", p.frames_sent),
                ("batches", p.batches),
                ("wakeups", p.wakeups),
                ("wakeups_handed_over", p.wakeups_handed_over),
                ("replies", p.replies),
                ("late_replies", p.late_replies),
                ("slow_reports", p.slow_reports),
                ("restarts", p.restarts),
            ] {
                sent.get_or_create(&labels(&[("plugin", id), ("what", what)])).inc_by(n);
            }
            for (reason, n) in &p.disconnects {
                disc.get_or_create(&labels(&[("plugin", id), ("reason", reason)]))
                    .inc_by(*n);
            }
            quantiles(&lat, &[("of", "reply"), ("plugin", id)], &p.reply_latency_ns, 1e-9);
            quantiles(&batch, &[("plugin", id)], &p.batch_events, 1.0);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &r);
        out
    }
}
