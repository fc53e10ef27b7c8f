//! Prometheus metrics: one registry, typed fields, labels of bounded cardinality (target,
//! outcome, reason, configured secret names; never a client address, user or query).

use std::cell::RefCell;

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric pgwarden exports. Cheap to clone fields out of; shared via `Arc<App>`.
pub struct Metrics {
    registry: Registry,
    /// Every registered family, so that one without samples yet (a vector no label set
    /// was used of) is still listed by its HELP and TYPE lines.
    families: Vec<Family>,
    /// Client connections open now.
    pub client_connections: IntGauge,
    /// Client connections open now that do not use TLS.
    pub client_connections_no_tls: IntGauge,
    /// Idle clients parked now (no task, no reactor registration).
    pub client_connections_parked: IntGauge,
    /// Times an idle client was parked.
    pub client_parks: IntCounter,
    /// Times free memory was given back to the system after a wave of parking.
    pub memory_trims: IntCounter,
    /// Client connections accepted since start.
    pub client_connections_received: IntCounter,
    /// Client connection setups by outcome (`succeeded`, `failed`, `refused`).
    pub client_setups: IntCounterVec,
    /// Client authentication failures by reason.
    pub auth_failures: IntCounterVec,
    /// Client authentications that succeeded, by method (`scram`, `iam`).
    pub auth_successes: IntCounterVec,
    /// Authentication attempts refused by the failure rate limit, by scope.
    pub auth_rate_limited: IntCounterVec,
    /// Secrets Manager reads by version stage and outcome (`succeeded`, `not_found`,
    /// `failed`, `invalid`).
    pub secret_fetches: IntCounterVec,
    /// Rotations noticed (the `AWSCURRENT` version changed), by target.
    pub secret_rotations: IntCounterVec,
    /// 1 for the version in use of each secret, labelled with a hash of its version id.
    pub secret_version: IntGaugeVec,
    /// 1 while a target serves with cached credentials because refreshing them fails
    /// (fail-static), by target.
    pub credentials_stale: IntGaugeVec,
    /// Backend logins that succeeded only after the first password was refused (28P01),
    /// by target and the login that worked (`refetched`, `pending`, `previous`).
    pub backend_login_recoveries: IntCounterVec,
    /// STS token verifications by outcome (`verified`, `refused`, `cached`, `unreachable`,
    /// `timeout`).
    pub sts_requests: IntCounterVec,
    /// Backend connections open now, by target and state (`idle`, `borrowed`).
    pub backend_connections: IntGaugeVec,
    /// Backend connections inside a transaction block now, by target.
    pub backend_in_transaction: IntGaugeVec,
    /// Backend connections held by a pinned client now, by target.
    pub backend_pinned: IntGaugeVec,
    /// `max_backend_connections` in force, by target.
    pub backend_max: IntGaugeVec,
    /// 1 while a backend login is possible (the last one succeeded), by target.
    pub target_available: IntGaugeVec,
    /// Time from a client request (Query, Sync, FunctionCall) relayed to the backend until
    /// its last ReadyForQuery, by target.
    pub query_response_seconds: HistogramVec,
    /// Per pool, set at each scrape: backend connections by state (`idle`, `busy`).
    pub pool_backends: IntGaugeVec,
    /// Per pool, set at each scrape: connected clients and those waiting for a backend.
    pub pool_clients: IntGaugeVec,
    pub pool_clients_waiting: IntGaugeVec,
    /// Backend logins by target and outcome (`succeeded`, `failed`).
    pub backend_setups: IntCounterVec,
    /// Backend connections closed, by target and reason.
    pub backend_closed: IntCounterVec,
    /// Backend connections moved to another worker thread's reactor, by target.
    pub backend_moves: IntCounterVec,
    /// Each serving thread's share of a CPU over the last sampling interval, as client
    /// placement last measured it, by thread (0 is the listener's).
    pub thread_busy: GaugeVec,
    /// Clients given to a serving thread, by thread and kind (`new`, `woken`, `moved`).
    pub thread_clients_placed: IntCounterVec,
    /// Time clients waited for a backend, by target.
    pub borrow_seconds: HistogramVec,
    /// Borrows that ended in a timeout (SQLSTATE 53300), by target.
    pub borrow_timeouts: IntCounterVec,
    /// Query requests (Query, Sync and FunctionCall messages) relayed, by target.
    pub queries: IntCounterVec,
    /// Clients pinned to one backend in transaction mode, by target and reason.
    pub pins: IntCounterVec,
    /// Pins skipped because `pin_filters` names their reason, by target and reason.
    pub pins_filtered: IntCounterVec,
    /// Clients refused by a quota (SQLSTATE 53300), by scope (`principal`, `user`,
    /// `pool`) and limit (`connections`, `rate`, `waiting`).
    pub quota_rejections: IntCounterVec,
    /// Cancel requests by outcome (`forwarded`, `idle`, `unknown`, `failed`).
    pub cancels: IntCounterVec,
    /// Time to log in a new backend connection.
    pub backend_login_seconds: Histogram,
}

/// Name, help and type of a registered metric family.
type Family = (String, String, String);

fn register<T: prometheus::core::Collector + Clone + 'static>(
    (registry, families): (&Registry, &RefCell<Vec<Family>>),
    metric: T,
) -> T {
    for family in metric.collect() {
        let kind = format!("{:?}", family.get_field_type()).to_lowercase();
        families
            .borrow_mut()
            .push((family.name().to_owned(), family.help().to_owned(), kind));
    }
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and valid (fixed at compile time)");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let families = RefCell::new(Vec::new());
        let r = (&registry, &families);
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                r,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            register(
                r,
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let metrics = Self {
            client_connections: register(
                r,
                IntGauge::new("pgwarden_client_connections", "Client connections open now")
                    .expect("valid metric"),
            ),
            client_connections_no_tls: register(
                r,
                IntGauge::new(
                    "pgwarden_client_connections_no_tls",
                    "Client connections open now without TLS",
                )
                .expect("valid metric"),
            ),
            client_connections_parked: register(
                r,
                IntGauge::new(
                    "pgwarden_client_connections_parked",
                    "Idle client connections parked now (server.park_idle_clients_after)",
                )
                .expect("valid metric"),
            ),
            client_parks: register(
                r,
                IntCounter::new(
                    "pgwarden_client_parks_total",
                    "Times an idle client connection was parked",
                )
                .expect("valid metric"),
            ),
            memory_trims: register(
                r,
                IntCounter::new(
                    "pgwarden_memory_trims_total",
                    "Times free memory was given back to the system after a wave of parked clients",
                )
                .expect("valid metric"),
            ),
            client_connections_received: register(
                r,
                IntCounter::new(
                    "pgwarden_client_connections_received_total",
                    "Client connections accepted",
                )
                .expect("valid metric"),
            ),
            client_setups: counter_vec(
                "pgwarden_client_connection_setups_total",
                "Client connection setups by outcome",
                &["outcome"],
            ),
            auth_failures: counter_vec(
                "pgwarden_client_auth_failures_total",
                "Client authentication failures by reason",
                &["reason"],
            ),
            auth_successes: counter_vec(
                "pgwarden_client_auth_successes_total",
                "Client authentications that succeeded, by method",
                &["method"],
            ),
            auth_rate_limited: counter_vec(
                "pgwarden_client_auth_rate_limited_total",
                "Authentication attempts refused by the failure rate limit, by scope",
                &["scope"],
            ),
            secret_fetches: counter_vec(
                "pgwarden_secret_fetches_total",
                "Secrets Manager reads by version stage and outcome",
                &["stage", "outcome"],
            ),
            secret_rotations: counter_vec(
                "pgwarden_secret_rotations_detected_total",
                "Secret rotations noticed (the AWSCURRENT version changed), by target",
                &["target"],
            ),
            secret_version: gauge_vec(
                "pgwarden_secret_version",
                "1 for the version in use of each secret (version is a hash of its version id)",
                &["target", "secret", "version"],
            ),
            credentials_stale: gauge_vec(
                "pgwarden_credentials_stale",
                "1 while a target serves with cached credentials because refreshing them fails",
                &["target"],
            ),
            backend_login_recoveries: counter_vec(
                "pgwarden_backend_login_recoveries_total",
                "Backend logins that succeeded after a refused password, by the login that worked",
                &["target", "via"],
            ),
            sts_requests: counter_vec(
                "pgwarden_sts_requests_total",
                "STS token verifications by outcome",
                &["outcome"],
            ),
            backend_connections: register(
                r,
                IntGaugeVec::new(
                    Opts::new(
                        "pgwarden_backend_connections",
                        "Backend connections open now",
                    ),
                    &["target", "state"],
                )
                .expect("valid metric"),
            ),
            backend_in_transaction: gauge_vec(
                "pgwarden_backend_connections_in_transaction",
                "Backend connections inside a transaction block now",
                &["target"],
            ),
            backend_pinned: gauge_vec(
                "pgwarden_backend_connections_pinned",
                "Backend connections held by a pinned client now",
                &["target"],
            ),
            backend_max: gauge_vec(
                "pgwarden_backend_connections_max",
                "max_backend_connections in force",
                &["target"],
            ),
            target_available: gauge_vec(
                "pgwarden_target_available",
                "1 while a backend login is possible (the last one succeeded)",
                &["target"],
            ),
            query_response_seconds: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "pgwarden_query_response_duration_seconds",
                        "Time from a client request relayed to its last ReadyForQuery",
                    )
                    .buckets(vec![
                        0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0, 5.0, 30.0,
                    ]),
                    &["target"],
                )
                .expect("valid metric"),
            ),
            pool_backends: gauge_vec(
                "pgwarden_pool_backend_connections",
                "Backend connections of a pool by state, at the scrape",
                &["target", "database", "user", "state"],
            ),
            pool_clients: gauge_vec(
                "pgwarden_pool_clients",
                "Clients connected to a pool, at the scrape",
                &["target", "database", "user"],
            ),
            pool_clients_waiting: gauge_vec(
                "pgwarden_pool_clients_waiting",
                "Clients of a pool waiting for a backend connection, at the scrape",
                &["target", "database", "user"],
            ),
            backend_setups: counter_vec(
                "pgwarden_backend_connection_setups_total",
                "Backend logins by outcome",
                &["target", "outcome"],
            ),
            backend_closed: counter_vec(
                "pgwarden_backend_connections_closed_total",
                "Backend connections closed, by reason",
                &["target", "reason"],
            ),
            backend_moves: counter_vec(
                "pgwarden_backend_moves_total",
                "Backend connections moved to the worker thread of the client that borrowed them",
                &["target"],
            ),
            thread_busy: register(
                r,
                GaugeVec::new(
                    Opts::new(
                        "pgwarden_thread_busy_ratio",
                        "Share of a CPU each serving thread used over the last sampling interval",
                    ),
                    &["thread"],
                )
                .expect("valid metric"),
            ),
            thread_clients_placed: counter_vec(
                "pgwarden_thread_clients_placed_total",
                "Clients given to a serving thread, by thread and kind (new, woken, moved)",
                &["thread", "kind"],
            ),
            borrow_seconds: register(
                r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "pgwarden_borrow_duration_seconds",
                        "Time a client waited for a backend connection",
                    )
                    .buckets(vec![
                        0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0,
                        30.0,
                    ]),
                    &["target"],
                )
                .expect("valid metric"),
            ),
            borrow_timeouts: counter_vec(
                "pgwarden_borrow_timeouts_total",
                "Borrows that timed out (SQLSTATE 53300)",
                &["target"],
            ),
            queries: counter_vec(
                "pgwarden_query_requests_total",
                "Query, Sync and FunctionCall messages relayed",
                &["target"],
            ),
            pins: counter_vec(
                "pgwarden_pins_total",
                "Clients pinned to a backend in transaction mode, by reason",
                &["target", "reason"],
            ),
            pins_filtered: counter_vec(
                "pgwarden_pins_filtered_total",
                "Pins skipped because pin_filters names their reason",
                &["target", "reason"],
            ),
            quota_rejections: counter_vec(
                "pgwarden_quota_rejections_total",
                "Clients refused by a quota (SQLSTATE 53300), by scope and limit",
                &["scope", "limit"],
            ),
            cancels: counter_vec(
                "pgwarden_cancel_requests_total",
                "Cancel requests by outcome",
                &["outcome"],
            ),
            backend_login_seconds: register(
                r,
                Histogram::with_opts(HistogramOpts::new(
                    "pgwarden_backend_login_duration_seconds",
                    "Time to connect and log in a backend connection",
                ))
                .expect("valid metric"),
            ),
            registry,
            families: families.into_inner(),
        };
        for outcome in ["succeeded", "failed", "refused"] {
            metrics.client_setups.with_label_values(&[outcome]);
        }
        metrics
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let gathered = self.registry.gather();
        let mut text = TextEncoder::new()
            .encode_to_string(&gathered)
            .unwrap_or_else(|e| format!("# error encoding metrics: {e}\n"));
        for (name, help, kind) in &self.families {
            if !gathered.iter().any(|f| f.name() == name) {
                text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            }
        }
        text
    }

    /// Names of every metric family.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.families.iter().map(|(name, _, _)| name.as_str())
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Keeps a gauge right: incremented on creation, decremented on drop, whatever the exit path.
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
