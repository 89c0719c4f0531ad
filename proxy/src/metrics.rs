//! Prometheus metrics of the proxy, served on the admin port at `/metrics`.
//!
//! Names are prefixed `tether_`. Labels are small, bounded sets: cluster names (bounded by the
//! clusters an operator added), results and reasons (fixed words).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A gauge holding seconds as a float.
type Seconds = Gauge<f64, AtomicU64>;
/// Histograms of gateway latency, one per cluster.
type LatencyFamily = Family<Labels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~32 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

type Labels = Vec<(String, String)>;

fn label(k: &str, v: &str) -> Labels {
    vec![(k.to_string(), v.to_string())]
}

/// Labels of a gauge per cluster and agent transport.
fn cluster_transport(cluster: &str, transport: &str) -> Labels {
    vec![
        ("cluster".to_string(), cluster.to_string()),
        ("transport".to_string(), transport.to_string()),
    ]
}

/// One cluster's children of the gateway families.
struct GatewayChildren {
    latency: Histogram,
    /// By HTTP status code: a handful per cluster.
    requests: Vec<(u16, Counter)>,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    agents_connected: Family<Labels, Gauge>,
    slow_links: Family<Labels, Gauge>,
    session_transitions: Family<Labels, Counter>,
    stream_opens: Family<Labels, Counter>,
    streams_open: Gauge,
    bytes: Family<Labels, Counter>,
    /// Cached children of `bytes`: looked up once, not on every read and write.
    bytes_to_agent: Counter,
    bytes_from_agent: Counter,
    agent_auth_failures: Family<Labels, Counter>,
    caller_auth_failures: Family<Labels, Counter>,
    heartbeat_rtt: Histogram,
    gateway_requests: Family<Labels, Counter>,
    gateway_latency: LatencyFamily,
    /// Cached children of the gateway families, by cluster: a request builds no labels.
    gateway_children: RwLock<HashMap<String, GatewayChildren>>,
    /// Cached child of `stream_opens` for `result="ok"`.
    stream_opens_ok: Counter,
    /// Seconds until expiry, recomputed from `token_expiry_at` at every scrape.
    token_expiry: Family<Labels, Seconds>,
    token_expiry_at: Mutex<HashMap<String, u64>>,
    certificate_expiry: Family<Labels, Seconds>,
    certificate_expiry_at: Mutex<HashMap<String, i64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tether");
        let m = Metrics {
            agents_connected: Family::default(),
            slow_links: Family::default(),
            session_transitions: Family::default(),
            stream_opens: Family::default(),
            streams_open: Gauge::default(),
            bytes: Family::default(),
            bytes_to_agent: Counter::default(),
            bytes_from_agent: Counter::default(),
            agent_auth_failures: Family::default(),
            caller_auth_failures: Family::default(),
            // 50 µs .. ~1.6 s
            heartbeat_rtt: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            gateway_requests: Family::default(),
            gateway_latency: Family::new_with_constructor(latency_histogram),
            gateway_children: RwLock::new(HashMap::new()),
            stream_opens_ok: Counter::default(),
            token_expiry: Family::default(),
            token_expiry_at: Mutex::new(HashMap::new()),
            certificate_expiry: Family::default(),
            certificate_expiry_at: Mutex::new(HashMap::new()),
            registry: Registry::default(),
        };
        registry.register(
            "agents_connected",
            "Agent sessions connected, per cluster and transport (tls+yamux, quic)",
            m.agents_connected.clone(),
        );
        registry.register(
            "agent_sessions_slow_link",
            "Agent sessions whose link either end finds slow (batches of frames take over 20 ms to leave; tls+tether only), per cluster",
            m.slow_links.clone(),
        );
        registry.register(
            "session_transitions",
            "Agent sessions going up or down, per cluster",
            m.session_transitions.clone(),
        );
        registry.register(
            "stream_opens",
            "Tunnel streams opened, by result",
            m.stream_opens.clone(),
        );
        registry.register(
            "streams_open",
            "Tunnel streams open now",
            m.streams_open.clone(),
        );
        registry.register(
            "tunnel_bytes",
            "Bytes through tunnel streams, by direction (to_agent, from_agent)",
            m.bytes.clone(),
        );
        registry.register(
            "agent_auth_failures",
            "Agents refused at Hello, by reason",
            m.agent_auth_failures.clone(),
        );
        registry.register(
            "caller_auth_failures",
            "Callers refused on the front, by reason",
            m.caller_auth_failures.clone(),
        );
        registry.register(
            "heartbeat_rtt_seconds",
            "Round trip of control-stream heartbeats",
            m.heartbeat_rtt.clone(),
        );
        registry.register(
            "gateway_requests",
            "Kube gateway requests, by cluster (\"_unknown\" for names never connected) and HTTP status code",
            m.gateway_requests.clone(),
        );
        registry.register(
            "gateway_request_duration_seconds",
            "Kube gateway requests: time until the response head (a watch counts until its first byte), by cluster",
            m.gateway_latency.clone(),
        );
        registry.register(
            "agent_token_expiry_seconds",
            "Seconds until the token the cluster's agent last authenticated with expires (negative: expired); absent for tokens without expiry",
            m.token_expiry.clone(),
        );
        registry.register(
            "certificate_expiry_seconds",
            "Seconds until the proxy's certificates expire, by certificate (ca, server)",
            m.certificate_expiry.clone(),
        );
        let bytes_to_agent = m
            .bytes
            .get_or_create(&label("direction", "to_agent"))
            .clone();
        let bytes_from_agent = m
            .bytes
            .get_or_create(&label("direction", "from_agent"))
            .clone();
        let stream_opens_ok = m.stream_opens.get_or_create(&label("result", "ok")).clone();
        Metrics {
            registry,
            bytes_to_agent,
            bytes_from_agent,
            stream_opens_ok,
            ..m
        }
    }

    pub fn session_up(&self, cluster: &str, transport: &str) {
        self.agents_connected
            .get_or_create(&cluster_transport(cluster, transport))
            .inc();
        // The cluster's slow-link series exists, at 0, from its first session on.
        let _ = self.slow_links.get_or_create(&label("cluster", cluster));
        self.session_transitions
            .get_or_create(&vec![
                ("cluster".into(), cluster.into()),
                ("state".into(), "up".into()),
            ])
            .inc();
    }

    pub fn session_down(&self, cluster: &str, transport: &str) {
        self.agents_connected
            .get_or_create(&cluster_transport(cluster, transport))
            .dec();
        self.session_transitions
            .get_or_create(&vec![
                ("cluster".into(), cluster.into()),
                ("state".into(), "down".into()),
            ])
            .inc();
    }

    /// A session of `cluster` found its link slow (`slow`), or fast again.
    pub fn slow_link(&self, cluster: &str, slow: bool) {
        let gauge = self.slow_links.get_or_create(&label("cluster", cluster));
        if slow {
            gauge.inc();
        } else {
            gauge.dec();
        }
    }

    /// Counts a stream open attempt by result (`ok`, `no_agent`, `rejected`, ...).
    pub fn stream_open(&self, result: &str) {
        if result == "ok" {
            self.stream_opens_ok.inc();
            return;
        }
        self.stream_opens
            .get_or_create(&label("result", result))
            .inc();
    }

    /// The gauge of open streams (inc on open, dec on close).
    pub fn streams_open(&self) -> &Gauge {
        &self.streams_open
    }

    pub fn bytes(&self, to_agent: u64, from_agent: u64) {
        if to_agent > 0 {
            self.bytes_to_agent.inc_by(to_agent);
        }
        if from_agent > 0 {
            self.bytes_from_agent.inc_by(from_agent);
        }
    }

    pub fn agent_auth_failure(&self, reason: &str) {
        self.agent_auth_failures
            .get_or_create(&label("reason", reason))
            .inc();
    }

    pub fn caller_auth_failure(&self, reason: &str) {
        self.caller_auth_failures
            .get_or_create(&label("reason", reason))
            .inc();
    }

    pub fn heartbeat_rtt(&self, micros: u64) {
        self.heartbeat_rtt.observe(micros as f64 / 1e6);
    }

    /// Counts one kube gateway request. `cluster` must be a bounded label: the caller passes
    /// `_unknown` for names no agent ever connected with.
    pub fn gateway_request(&self, cluster: &str, code: u16, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        {
            let children = self.gateway_children.read().expect("metrics lock");
            if let Some(c) = children.get(cluster) {
                if let Some((_, counter)) = c.requests.iter().find(|(k, _)| *k == code) {
                    counter.inc();
                    c.latency.observe(seconds);
                    return;
                }
            }
        }
        let mut children = self.gateway_children.write().expect("metrics lock");
        let c = children
            .entry(cluster.to_string())
            .or_insert_with(|| GatewayChildren {
                latency: self
                    .gateway_latency
                    .get_or_create(&label("cluster", cluster))
                    .clone(),
                requests: Vec::new(),
            });
        let counter = match c.requests.iter().find(|(k, _)| *k == code) {
            Some((_, counter)) => counter.clone(),
            None => {
                let counter = self
                    .gateway_requests
                    .get_or_create(&vec![
                        ("cluster".into(), cluster.into()),
                        ("code".into(), code.to_string()),
                    ])
                    .clone();
                c.requests.push((code, counter.clone()));
                counter
            }
        };
        counter.inc();
        c.latency.observe(seconds);
    }

    /// Records when the token of `cluster`'s agent expires (seconds since the Unix epoch);
    /// `None` (no expiry) removes the series.
    pub fn agent_token_expiry(&self, cluster: &str, exp: Option<u64>) {
        let mut at = self.token_expiry_at.lock().expect("expiry lock");
        match exp {
            Some(exp) => {
                at.insert(cluster.to_string(), exp);
            }
            None => {
                at.remove(cluster);
                self.token_expiry.remove(&label("cluster", cluster));
            }
        }
    }

    /// Records the expiry of one of the proxy's certificates (PEM; the first certificate).
    pub fn certificate_expiry(&self, which: &str, cert_pem: &str) {
        let not_after = tether_proto::tls::parse_certs(cert_pem, which)
            .ok()
            .and_then(|certs| certs.first().cloned())
            .and_then(|der| tether_proto::tls::certificate_info(&der).ok())
            .map(|info| info.not_after);
        if let Some(t) = not_after {
            self.certificate_expiry_at
                .lock()
                .expect("expiry lock")
                .insert(which.to_string(), t);
        }
    }

    /// Brings the expiry horizons up to now.
    fn refresh_horizons(&self) {
        let now = unix_now();
        for (cluster, exp) in self.token_expiry_at.lock().expect("expiry lock").iter() {
            self.token_expiry
                .get_or_create(&label("cluster", cluster))
                .set(*exp as f64 - now);
        }
        for (which, t) in self
            .certificate_expiry_at
            .lock()
            .expect("expiry lock")
            .iter()
        {
            self.certificate_expiry
                .get_or_create(&label("certificate", which))
                .set(*t as f64 - now);
        }
    }

    /// The text exposition (OpenMetrics, which Prometheus reads).
    pub fn render(&self) -> String {
        self.refresh_horizons();
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
