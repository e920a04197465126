//! Logging: JSON lines (or text) on stderr, which journald collects under systemd.
//!
//! Architecture invariant: logs never carry a secret (tokens, keys, passwords); audit events
//! are not log lines, they go through `state` and `audit`.

use crate::config::LogConfig;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` overrides the configured level.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if cfg.format == "text" {
        builder.try_init()
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    };
    if result.is_err() {
        // already installed (tests start several nodes in one process)
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus metrics (prometheus-client: no global registry, text format).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// Buckets of [`Latency`]: 50 µs doubling 16 times (to 3.2768 s), then +Inf.
const LATENCY_BUCKETS: usize = 18;

/// A latency histogram (Prometheus `histogram`: `le` 50 µs, 100 µs, ... 3.2768 s, +Inf),
/// counted by atomics: an observation finds its bucket by arithmetic on its microseconds and
/// adds to two counters, its bucket and the sum, with no lock (prometheus-client's `Histogram`
/// takes a mutex and scans its buckets; the gateway observes two per request, and each atomic
/// addition is a locked instruction). The count is the buckets' total, added up at a scrape, so
/// `_count` always equals the `+Inf` bucket; a scrape may see an observation in its bucket
/// before its time in the sum: off by the requests of that instant, as any lock-free counter
/// set.
#[derive(Debug, Default, Clone)]
pub struct Latency(Arc<LatencyCounts>);

#[derive(Debug, Default)]
struct LatencyCounts {
    buckets: [AtomicU64; LATENCY_BUCKETS],
    sum_ns: AtomicU64,
}

impl Latency {
    /// The bucket of `d`: the first whose bound it does not pass, on whole microseconds.
    fn bucket(d: Duration) -> usize {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        // bucket k holds what is at most 50 µs × 2^k: k is ceil(log2(ceil(us / 50)))
        let fifties = us.div_ceil(50);
        let k = match fifties {
            0 | 1 => 0,
            n => (u64::BITS - (n - 1).leading_zeros()) as usize,
        };
        k.min(LATENCY_BUCKETS - 1)
    }

    pub fn observe(&self, d: Duration) {
        let c = &self.0;
        c.buckets[Latency::bucket(d)].fetch_add(1, Relaxed);
        c.sum_ns
            .fetch_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX), Relaxed);
    }

    /// The upper bound of bucket `k`, in seconds.
    fn bound(k: usize) -> f64 {
        match k {
            k if k + 1 == LATENCY_BUCKETS => f64::INFINITY,
            k => 0.000_05 * f64::from(1u32 << k),
        }
    }
}

impl prometheus_client::metrics::TypedMetric for Latency {
    const TYPE: prometheus_client::metrics::MetricType =
        prometheus_client::metrics::MetricType::Histogram;
}

impl prometheus_client::encoding::EncodeMetric for Latency {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let buckets: Vec<(f64, u64)> = (0..LATENCY_BUCKETS)
            .map(|k| (Latency::bound(k), c.buckets[k].load(Relaxed)))
            .collect();
        let sum = c.sum_ns.load(Relaxed) as f64 / 1e9;
        let count = buckets.iter().map(|&(_, n)| n).sum();
        encoder
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        <Self as prometheus_client::metrics::TypedMetric>::TYPE
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub tenant: String,
    pub api: String,
    /// `2xx`, `3xx`, `4xx` or `5xx`.
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub tenant: String,
    pub api: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    pub tenant: String,
    pub api: String,
    pub target: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CauseLabels {
    pub cause: String,
}

/// The series of one API, resolved once per routing table rather than looked up by label on
/// every request.
#[derive(Debug, Clone)]
pub struct ApiSeries {
    /// Requests by status class: 2xx, 3xx, 4xx, 5xx.
    pub requests: [Counter; 4],
    pub added: Latency,
    pub upstream: Latency,
}

impl ApiSeries {
    pub fn new(m: &Metrics, tenant: &str, api: &str) -> ApiSeries {
        let class = |c: &str| {
            m.gateway_requests
                .get_or_create(&RequestLabels {
                    tenant: tenant.to_string(),
                    api: api.to_string(),
                    class: c.to_string(),
                })
                .clone()
        };
        let labels = ApiLabels {
            tenant: tenant.to_string(),
            api: api.to_string(),
        };
        ApiSeries {
            requests: [class("2xx"), class("3xx"), class("4xx"), class("5xx")],
            added: m.gateway_added.get_or_create(&labels).clone(),
            upstream: m.gateway_upstream.get_or_create(&labels).clone(),
        }
    }
}

/// The node's metrics, served at `/metrics` on the admin listener.
pub struct Metrics {
    registry: Registry,
    pub gateway_requests: Family<RequestLabels, Counter>,
    /// Time the gateway itself adds (total minus upstream), seconds.
    pub gateway_added: Family<ApiLabels, Latency>,
    /// Time waiting for the upstream's response headers, seconds.
    pub gateway_upstream: Family<ApiLabels, Latency>,
    pub gateway_refusals: Family<CauseLabels, Counter>,
    pub gateway_connections: Gauge,
    /// HTTP/1.1 connections the gateway's own server gave to hyper's (`gateway::front`).
    pub gateway_http1_handovers: Counter,
    pub gateway_routes: Gauge,
    /// TLS handshakes that failed or timed out, by reason.
    pub gateway_tls_failures: Family<CauseLabels, Counter>,
    pub gateway_certificates: Gauge,
    /// 1 when an upstream target takes traffic, 0 when ejected or failing health checks.
    pub gateway_target_up: Family<TargetLabels, Gauge>,
    /// End of validity of each served certificate, Unix seconds.
    pub gateway_certificate_expiry: Family<CertificateLabels, Gauge>,
    /// The certificates `gateway_certificate_expiry` has series for.
    certificates_exported: std::sync::Mutex<Vec<CertificateLabels>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    pub tenant: String,
    pub certificate: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("apim");
        let gateway_requests = Family::<RequestLabels, Counter>::default();
        let gateway_added = Family::<ApiLabels, Latency>::default();
        let gateway_upstream = Family::<ApiLabels, Latency>::default();
        let gateway_refusals = Family::<CauseLabels, Counter>::default();
        let gateway_connections = Gauge::default();
        let gateway_http1_handovers = Counter::default();
        let gateway_routes = Gauge::default();
        let gateway_tls_failures = Family::<CauseLabels, Counter>::default();
        let gateway_certificates = Gauge::default();
        let gateway_target_up = Family::<TargetLabels, Gauge>::default();
        let gateway_certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "gateway_certificate_expiry_timestamp_seconds",
            "End of validity (not after) of each certificate the gateway serves, Unix seconds",
            gateway_certificate_expiry.clone(),
        );
        registry.register(
            "gateway_upstream_target_up",
            "Whether an upstream target takes traffic (0: ejected or failing its health checks)",
            gateway_target_up.clone(),
        );
        registry.register(
            "gateway_tls_handshake_failures",
            "TLS handshakes on the gateway that failed, by cause",
            gateway_tls_failures.clone(),
        );
        registry.register(
            "gateway_certificates",
            "Certificates the gateway serves by SNI",
            gateway_certificates.clone(),
        );
        registry.register(
            "gateway_requests",
            "Gateway requests by tenant, API and status class",
            gateway_requests.clone(),
        );
        registry.register(
            "gateway_added_seconds",
            "Time the gateway adds to a request (total minus upstream)",
            gateway_added.clone(),
        );
        registry.register(
            "gateway_upstream_seconds",
            "Time until the upstream's response headers",
            gateway_upstream.clone(),
        );
        registry.register(
            "gateway_refusals",
            "Requests the gateway refused, by cause",
            gateway_refusals.clone(),
        );
        registry.register(
            "gateway_open_connections",
            "Client connections open on the gateway",
            gateway_connections.clone(),
        );
        registry.register(
            "gateway_http1_handovers",
            "HTTP/1.1 connections handed from the gateway's own server to hyper's, at a request it does not take (a body still coming, chunked, Expect, Upgrade, CONNECT, HTTP/1.0, a head it does not parse)",
            gateway_http1_handovers.clone(),
        );
        registry.register(
            "gateway_routes",
            "APIs in the gateway's routing table",
            gateway_routes.clone(),
        );
        Metrics {
            registry,
            gateway_requests,
            gateway_added,
            gateway_upstream,
            gateway_refusals,
            gateway_connections,
            gateway_http1_handovers,
            gateway_routes,
            gateway_tls_failures,
            gateway_certificates,
            gateway_target_up,
            gateway_certificate_expiry,
            certificates_exported: Default::default(),
        }
    }

    /// Gives every API of `new` its series: the handles the route of the same API in `old`
    /// holds (no label lookup), or new series for an API `old` did not have. Tables list their
    /// routes in the order they were built (tenant, then API), so the routes of both are first
    /// walked side by side (most rebuilds follow a change that adds or removes no API); an
    /// index of the old table is built only past the first difference.
    pub fn carry_series(
        &self,
        old: &crate::gateway::routes::RouteTable,
        new: &crate::gateway::routes::RouteTable,
    ) {
        let (o, n) = (old.all(), new.all());
        let same = |i: usize| o[i].tenant == n[i].tenant && o[i].api == n[i].api;
        let matched = (0..o.len().min(n.len())).take_while(|&i| same(i)).count();
        for (a, b) in o.iter().zip(n).take(matched) {
            if let Some(s) = a.series.get() {
                b.series.get_or_init(|| s.clone());
            }
        }
        let held: std::collections::HashMap<(&str, &str), &ApiSeries> = if matched < n.len() {
            o[matched..]
                .iter()
                .filter_map(|r| Some(((r.tenant.as_str(), r.api.as_str()), r.series.get()?)))
                .collect()
        } else {
            Default::default()
        };
        for r in n {
            r.series
                .get_or_init(|| match held.get(&(r.tenant.as_str(), r.api.as_str())) {
                    Some(s) => (*s).clone(),
                    None => ApiSeries::new(self, &r.tenant, &r.api),
                });
        }
    }

    /// Drops the series of the APIs and upstream targets `old` routed to and `new` does not (an
    /// API deleted, retired or renamed, a target removed), so they are no longer exported.
    pub fn forget_gone(
        &self,
        old: &crate::gateway::routes::RouteTable,
        new: &crate::gateway::routes::RouteTable,
    ) {
        use std::collections::HashSet;
        // the same APIs with the same targets, in the same order (most rebuilds): nothing gone
        let (o, n) = (old.all(), new.all());
        if o.len() == n.len()
            && o.iter().zip(n).all(|(a, b)| {
                a.tenant == b.tenant
                    && a.api == b.api
                    && a.targets.len() == b.targets.len()
                    && a.targets
                        .iter()
                        .zip(&b.targets)
                        .all(|(x, y)| x.origin == y.origin && x.path == y.path)
            })
        {
            return;
        }
        let apis: HashSet<(&str, &str)> = new
            .all()
            .iter()
            .map(|r| (r.tenant.as_str(), r.api.as_str()))
            .collect();
        let targets: HashSet<(&str, &str, &str, &str)> = new
            .all()
            .iter()
            .flat_map(|r| {
                r.targets.iter().map(|t| {
                    (
                        r.tenant.as_str(),
                        r.api.as_str(),
                        t.origin.as_str(),
                        t.path.as_str(),
                    )
                })
            })
            .collect();
        for r in old.all() {
            let (tenant, api) = (r.tenant.as_str(), r.api.as_str());
            if !apis.contains(&(tenant, api)) {
                for class in ["2xx", "3xx", "4xx", "5xx"] {
                    self.gateway_requests.remove(&RequestLabels {
                        tenant: tenant.to_string(),
                        api: api.to_string(),
                        class: class.to_string(),
                    });
                }
                let labels = ApiLabels {
                    tenant: tenant.to_string(),
                    api: api.to_string(),
                };
                self.gateway_added.remove(&labels);
                self.gateway_upstream.remove(&labels);
            }
            for t in &r.targets {
                if !targets.contains(&(tenant, api, t.origin.as_str(), t.path.as_str())) {
                    self.gateway_target_up.remove(&TargetLabels {
                        tenant: tenant.to_string(),
                        api: api.to_string(),
                        target: t.label(),
                    });
                }
            }
        }
    }

    /// Sets the expiry series to the certificates served now: (tenant, certificate, not-after
    /// in Unix seconds). The series of certificates no longer served are removed (the others
    /// are never missing from a scrape in between).
    pub fn certificate_expiries(&self, expiries: &[(String, String, i64)]) {
        let mut exported = self
            .certificates_exported
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now: Vec<CertificateLabels> = expiries
            .iter()
            .map(|(tenant, certificate, _)| CertificateLabels {
                tenant: tenant.clone(),
                certificate: certificate.clone(),
            })
            .collect();
        for (labels, (_, _, not_after)) in now.iter().zip(expiries) {
            self.gateway_certificate_expiry
                .get_or_create(labels)
                .set(*not_after);
        }
        for gone in exported.iter().filter(|l| !now.contains(l)) {
            self.gateway_certificate_expiry.remove(gone);
        }
        *exported = now;
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

    fn text(name: &str, metric: impl prometheus_client::registry::Metric) -> String {
        let mut registry = Registry::default();
        registry.register(name, "help", metric);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoded");
        out
    }

    #[test]
    fn latency_buckets_are_found_by_arithmetic_as_by_scanning_the_bounds() {
        let us = |n: u64| Duration::from_micros(n);
        assert_eq!(Latency::bucket(us(0)), 0);
        assert_eq!(Latency::bucket(us(50)), 0);
        assert_eq!(Latency::bucket(us(51)), 1);
        assert_eq!(Latency::bucket(us(100)), 1);
        assert_eq!(Latency::bucket(us(101)), 2);
        assert_eq!(Latency::bucket(us(3_276_800)), 16);
        assert_eq!(Latency::bucket(us(3_276_801)), 17);
        assert_eq!(Latency::bucket(Duration::MAX), 17);
        // every bound and its neighbours, against a scan of the bounds
        for k in 0..LATENCY_BUCKETS - 1 {
            let bound = 50u64 << k;
            for n in [bound - 1, bound, bound + 1] {
                let scanned = (0..LATENCY_BUCKETS)
                    .find(|&j| j + 1 == LATENCY_BUCKETS || n <= 50u64 << j)
                    .expect("a bucket");
                assert_eq!(Latency::bucket(us(n)), scanned, "{n} µs");
            }
        }
    }

    #[test]
    fn latency_is_exposed_as_prometheus_clients_histogram_is() {
        let ours = Latency::default();
        let theirs = Histogram::new(exponential_buckets(0.000_05, 2.0, 17));
        // (whole multiples of 50 µs: the sums agree exactly in both)
        for n in [
            0u64, 50, 100, 150, 800, 51_200, 3_276_800, 6_553_600, 20_000_000,
        ] {
            ours.observe(Duration::from_micros(n));
            theirs.observe(n as f64 / 1e6);
        }
        let ours = text("latency", ours);
        assert!(ours.contains("latency_bucket{le=\"+Inf\"} 9"), "{ours}");
        assert!(ours.contains("latency_count 9"), "{ours}");
        assert_eq!(ours, text("latency", theirs));
    }
}
