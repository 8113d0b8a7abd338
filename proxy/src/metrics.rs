//! Prometheus metrics, all named `token_proxy_*` (the README lists them).
//!
//! Each replica owns its recorder rather than installing a global one, so several replicas can
//! run in one process (the integration tests do) without mixing their numbers. Every handle is
//! registered once up front: recording is an atomic add, with no name lookup per request.
//! Labels are fixed enums; nothing derived from a request ever becomes a label. Every family has
//! a `# HELP` line (`FAMILIES`), and the process's own (`process_*`, read from `/proc` at each
//! scrape by [`crate::process_metrics`], which imports nothing either) follow the replica's.

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Label, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

const BREAKER_STATES: [BreakerState; 3] = [BreakerState::Closed, BreakerState::Open, BreakerState::HalfOpen];

/// What happened to a client request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Coalesced,
    Stale,
    Bypass,
    Rejected,
    Error,
    /// The client hung up before its answer was ready (nginx's 499 in the access log).
    Aborted,
}

impl Outcome {
    const ALL: [Outcome; 8] = [
        Outcome::Hit,
        Outcome::Miss,
        Outcome::Coalesced,
        Outcome::Stale,
        Outcome::Bypass,
        Outcome::Rejected,
        Outcome::Error,
        Outcome::Aborted,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Coalesced => "coalesced",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
            Outcome::Rejected => "rejected",
            Outcome::Error => "error",
            Outcome::Aborted => "aborted",
        }
    }
}

/// How an upstream call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamClass {
    Success,
    ClientError,
    ServerError,
    Timeout,
    Error,
}

impl UpstreamClass {
    const ALL: [UpstreamClass; 5] = [
        UpstreamClass::Success,
        UpstreamClass::ClientError,
        UpstreamClass::ServerError,
        UpstreamClass::Timeout,
        UpstreamClass::Error,
    ];

    pub fn of(status: StatusCode) -> UpstreamClass {
        match status.as_u16() {
            200..=299 => UpstreamClass::Success,
            400..=499 => UpstreamClass::ClientError,
            500..=599 => UpstreamClass::ServerError,
            _ => UpstreamClass::Error,
        }
    }

    fn label(self) -> &'static str {
        match self {
            UpstreamClass::Success => "2xx",
            UpstreamClass::ClientError => "4xx",
            UpstreamClass::ServerError => "5xx",
            UpstreamClass::Timeout => "timeout",
            UpstreamClass::Error => "error",
        }
    }
}

/// Why the proxy refused a call itself, to spare the upstream's quota or itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttle {
    /// Too many failed authentications for a client (429).
    AuthFailures,
    /// The cluster-wide upstream rate cap (429).
    RateCap,
    /// The replica was at its concurrency limit (503).
    Overload,
    /// The request took longer than the request timeout (408).
    Timeout,
    /// The body did not arrive within the body timeout (408).
    BodyTimeout,
    /// A source behind a trusted proxy had its cap of unfinished requests (429).
    PerSource,
    /// A client spent its upstream call budget (429).
    ClientBudget,
}

impl Throttle {
    const ALL: [Throttle; 7] = [
        Throttle::AuthFailures,
        Throttle::RateCap,
        Throttle::Overload,
        Throttle::Timeout,
        Throttle::BodyTimeout,
        Throttle::PerSource,
        Throttle::ClientBudget,
    ];

    fn label(self) -> &'static str {
        match self {
            Throttle::AuthFailures => "auth_failures",
            Throttle::RateCap => "rate_cap",
            Throttle::Overload => "overload",
            Throttle::Timeout => "timeout",
            Throttle::BodyTimeout => "body_timeout",
            Throttle::PerSource => "per_source",
            Throttle::ClientBudget => "client_budget",
        }
    }
}

/// The breaker's state, as reported on `/readyz` and in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// Which listener: the `listener` label of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// `TOKEN_PROXY_LISTEN`: token requests.
    Client,
    /// `TOKEN_PROXY_ADMIN_LISTEN`: health, readiness, metrics, the admin API.
    Admin,
}

impl ListenerKind {
    pub const ALL: [ListenerKind; 2] = [ListenerKind::Client, ListenerKind::Admin];

    pub fn label(self) -> &'static str {
        match self {
            ListenerKind::Client => "client",
            ListenerKind::Admin => "admin",
        }
    }
}

/// Why a listener refused a connection; the `reason` label of
/// `token_proxy_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer is not in an allowed network and is no trusted proxy.
    Source,
    /// The listener already had its cap of open connections.
    ListenerFull,
    /// The peer's source address already had its cap of open connections.
    PerSource,
    /// The TLS handshake failed (no or a bad client certificate, plain HTTP on the TLS port, ...).
    TlsHandshake,
    /// The TLS handshake did not finish within the header-read timeout.
    TlsTimeout,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Source => "source",
            Refusal::ListenerFull => "listener_full",
            Refusal::PerSource => "per_source",
            Refusal::TlsHandshake => "tls_handshake",
            Refusal::TlsTimeout => "tls_timeout",
        }
    }
}

/// The version `--version` prints, and the commit the binary was built from (`build.rs`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("TOKEN_PROXY_COMMIT");

#[derive(Debug, Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every family the replica registers, with its `# HELP` text: a scrape explains itself, and a
/// test fails on a family missing here.
const FAMILIES: &[(&str, Kind, &str)] = &[
    ("token_proxy_build_info", Kind::Gauge, "Always 1; the labels say which version and commit run"),
    (
        "token_proxy_requests_total",
        Kind::Counter,
        "Token requests, by outcome (the X-Cache value; rejected, error; aborted: the client hung up first)",
    ),
    ("token_proxy_request_duration_seconds", Kind::Histogram, "Time to answer a token request, by outcome"),
    ("token_proxy_upstream_requests_total", Kind::Counter, "Calls made to the token endpoint, by status class"),
    ("token_proxy_upstream_request_duration_seconds", Kind::Histogram, "Time of one call to the token endpoint"),
    (
        "token_proxy_upstream_calls_avoided_total",
        Kind::Counter,
        "Token responses served without an upstream call (hit, coalesced, stale)",
    ),
    ("token_proxy_throttled_total", Kind::Counter, "Requests or upstream calls the proxy refused itself, by reason"),
    ("token_proxy_redis_errors_total", Kind::Counter, "Redis commands that failed or timed out"),
    ("token_proxy_redis_bad_entries_total", Kind::Counter, "Redis entries found unusable (treated as misses)"),
    ("token_proxy_redis_breaker_open", Kind::Gauge, "1 while the Redis circuit breaker is open or half open"),
    (
        "token_proxy_redis_shard_reads_failing",
        Kind::Gauge,
        "Redis Cluster masters whose hit reads fail now (each is judged on its own; 0 off a cluster)",
    ),
    ("token_proxy_redis_breaker_transitions_total", Kind::Counter, "Redis circuit breaker changes, by new state"),
    (
        "token_proxy_coalesced_waiters_total",
        Kind::Counter,
        "Requests that waited for an identical one in flight on this replica",
    ),
    ("token_proxy_lock_acquisitions_total", Kind::Counter, "Cluster-wide single-flight locks this replica took"),
    ("token_proxy_lock_takeovers_total", Kind::Counter, "Locks taken over after their holder let them expire"),
    (
        "token_proxy_notification_misses_total",
        Kind::Counter,
        "Followers that learned an outcome by polling, not by notification",
    ),
    ("token_proxy_refreshes_total", Kind::Counter, "Background refreshes (refresh-ahead) that called the upstream"),
    (
        "token_proxy_upstream_held_back_total",
        Kind::Counter,
        "Upstream calls not made because the upstream asked to wait (429 with Retry-After)",
    ),
    ("token_proxy_auth_failures_total", Kind::Counter, "invalid_client answers to credentials nobody had proven"),
    ("token_proxy_accept_errors_total", Kind::Counter, "Failed accepts on a listener (e.g. out of file descriptors)"),
    (
        "token_proxy_connections_refused_total",
        Kind::Counter,
        "Connections a listener dropped before serving them, by reason",
    ),
];

/// Seconds; from a sub-millisecond cache hit to an upstream timeout.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The handles of one replica's metrics. The families that describe requests and upstream calls
/// are per upstream when a deployment names its upstreams (`for_upstream`: the same families
/// with an `upstream` label); the rest are the replica's.
pub struct Metrics {
    shared: Arc<Shared>,
    scoped: Scoped,
}

/// The families one upstream's requests and calls are counted in.
struct Scoped {
    requests: [Counter; 8],
    request_duration: [Histogram; 8],
    upstream_requests: [Counter; 5],
    upstream_duration: Histogram,
    upstream_calls_avoided: Counter,
    throttled: [Counter; 7],
}

/// The replica's registry and the families that are not per upstream.
struct Shared {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    redis_errors: Counter,
    /// Entries that were there but unusable (wrong type, oversized): misses, not Redis faults.
    redis_bad_entries: Counter,
    redis_breaker_open: Gauge,
    redis_shard_reads_failing: Gauge,
    breaker_transitions: [Counter; 3],
    coalesced_waiters: Counter,
    lock_acquisitions: Counter,
    lock_takeovers: Counter,
    notification_misses: Counter,
    refreshes: Counter,
    upstream_held_back: Counter,
    auth_failures: Counter,
    accept_errors: [Counter; 2],
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics(..)")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), LATENCY_BUCKETS)
            .expect("bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        for (name, kind, help) in FAMILIES {
            let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            match kind {
                Kind::Counter => recorder.describe_counter(name, None, help),
                Kind::Gauge => recorder.describe_gauge(name, None, help),
                Kind::Histogram => recorder.describe_histogram(name, None, help),
            }
        }
        let build = [Label::new("version", VERSION), Label::new("commit", COMMIT)];
        recorder.register_gauge(&Key::from_parts("token_proxy_build_info", build.to_vec()), &META).set(1.0);
        let scoped = Scoped::register(&recorder, None);
        let counter =
            |name: &'static str, labels: Vec<Label>| recorder.register_counter(&Key::from_parts(name, labels), &META);
        let shared = Shared {
            redis_errors: counter("token_proxy_redis_errors_total", vec![]),
            redis_bad_entries: counter("token_proxy_redis_bad_entries_total", vec![]),
            redis_breaker_open: recorder.register_gauge(&Key::from_name("token_proxy_redis_breaker_open"), &META),
            redis_shard_reads_failing: recorder
                .register_gauge(&Key::from_name("token_proxy_redis_shard_reads_failing"), &META),
            breaker_transitions: BREAKER_STATES
                .map(|s| counter("token_proxy_redis_breaker_transitions_total", vec![Label::new("to", s.label())])),
            coalesced_waiters: counter("token_proxy_coalesced_waiters_total", vec![]),
            lock_acquisitions: counter("token_proxy_lock_acquisitions_total", vec![]),
            lock_takeovers: counter("token_proxy_lock_takeovers_total", vec![]),
            notification_misses: counter("token_proxy_notification_misses_total", vec![]),
            refreshes: counter("token_proxy_refreshes_total", vec![]),
            upstream_held_back: counter("token_proxy_upstream_held_back_total", vec![]),
            auth_failures: counter("token_proxy_auth_failures_total", vec![]),
            accept_errors: ListenerKind::ALL
                .map(|l| counter("token_proxy_accept_errors_total", vec![Label::new("listener", l.label())])),
            handle,
            recorder,
        };
        Metrics { shared: Arc::new(shared), scoped }
    }

    /// The same registry, counting requests, upstream calls and refusals with the label
    /// `upstream="NAME"` (a configured name: the label's values are bounded).
    pub fn for_upstream(&self, name: &str) -> Metrics {
        let scoped = Scoped::register(&self.shared.recorder, Some(name));
        Metrics { shared: Arc::clone(&self.shared), scoped }
    }

    /// One finished client request.
    pub fn request(&self, outcome: Outcome, elapsed: Duration) {
        let i = Outcome::ALL.iter().position(|o| *o == outcome).unwrap_or(0);
        self.scoped.requests[i].increment(1);
        self.scoped.request_duration[i].record(elapsed.as_secs_f64());
        if matches!(outcome, Outcome::Hit | Outcome::Coalesced | Outcome::Stale) {
            self.scoped.upstream_calls_avoided.increment(1);
        }
    }

    /// One finished upstream call.
    pub fn upstream_request(&self, class: UpstreamClass, elapsed: Duration) {
        let i = UpstreamClass::ALL.iter().position(|c| *c == class).unwrap_or(0);
        self.scoped.upstream_requests[i].increment(1);
        self.scoped.upstream_duration.record(elapsed.as_secs_f64());
    }

    pub fn redis_error(&self) {
        self.shared.redis_errors.increment(1);
    }

    pub fn redis_bad_entry(&self) {
        self.shared.redis_bad_entries.increment(1);
    }

    /// The Redis circuit breaker changed state; the gauge is 1 unless it is closed.
    pub fn breaker_transition(&self, to: BreakerState) {
        let i = BREAKER_STATES.iter().position(|s| *s == to).unwrap_or(0);
        self.shared.breaker_transitions[i].increment(1);
        self.shared.redis_breaker_open.set(if to == BreakerState::Closed { 0.0 } else { 1.0 });
    }

    /// How many Redis Cluster masters' hit reads fail now.
    pub fn shard_reads_failing(&self, masters: usize) {
        self.shared.redis_shard_reads_failing.set(masters as f64);
    }

    /// A request on this replica waited for an identical one in flight here.
    pub fn coalesced_waiter(&self) {
        self.shared.coalesced_waiters.increment(1);
    }

    /// This replica took the cluster-wide lock for a key and will call the upstream.
    pub fn lock_acquired(&self) {
        self.shared.lock_acquisitions.increment(1);
    }

    /// The lock was taken after its holder let it expire without a word.
    pub fn lock_takeover(&self) {
        self.shared.lock_takeovers.increment(1);
    }

    /// A follower learned the outcome from its periodic check, not from the notification.
    pub fn notification_miss(&self) {
        self.shared.notification_misses.increment(1);
    }

    /// A background refresh (refresh-ahead) called the upstream.
    pub fn refresh(&self) {
        self.shared.refreshes.increment(1);
    }

    /// An upstream call was not made because the upstream asked to wait (429 + Retry-After).
    pub fn upstream_held_back(&self) {
        self.shared.upstream_held_back.increment(1);
    }

    /// The proxy refused a request or an upstream call itself.
    pub fn throttled(&self, reason: Throttle) {
        // `ALL` lists the variants in declaration order: the discriminant is the index.
        self.scoped.throttled[reason as usize].increment(1);
    }

    /// The upstream answered `invalid_client` to credentials nobody had proven.
    pub fn auth_failure(&self) {
        self.shared.auth_failures.increment(1);
    }

    /// Drains histogram buffers; call periodically so they do not grow between scrapes.
    pub fn upkeep(&self) {
        self.shared.handle.run_upkeep();
    }

    /// The Prometheus text exposition: the replica's families, then the process's.
    pub fn render(&self) -> String {
        self.shared.handle.run_upkeep();
        let mut text = self.shared.handle.render();
        crate::process_metrics::render(&mut text);
        text
    }

    /// The recorder, for registering further metrics.
    pub fn recorder(&self) -> &PrometheusRecorder {
        &self.shared.recorder
    }

    /// A listener dropped a connection before serving it:
    /// `token_proxy_connections_refused_total{listener, reason}`. Rare, so the series is looked
    /// up here.
    pub fn connection_refused(&self, listener: ListenerKind, reason: Refusal) {
        let labels = vec![Label::new("listener", listener.label()), Label::new("reason", reason.label())];
        let key = Key::from_parts("token_proxy_connections_refused_total", labels);
        self.shared.recorder.register_counter(&key, &META).increment(1);
    }

    /// A listener's `accept` failed (e.g. no file descriptor left):
    /// `token_proxy_accept_errors_total{listener}`.
    pub fn accept_error(&self, listener: ListenerKind) {
        self.shared.accept_errors[listener as usize].increment(1);
    }
}

impl Scoped {
    /// The per-request families, with `upstream="NAME"` for a named upstream.
    fn register(recorder: &PrometheusRecorder, upstream: Option<&str>) -> Scoped {
        let with = |mut labels: Vec<Label>| {
            if let Some(name) = upstream {
                labels.push(Label::new("upstream", name.to_owned()));
            }
            labels
        };
        let counter = |name: &'static str, labels: Vec<Label>| {
            recorder.register_counter(&Key::from_parts(name, with(labels)), &META)
        };
        let histogram = |name: &'static str, labels: Vec<Label>| {
            recorder.register_histogram(&Key::from_parts(name, with(labels)), &META)
        };
        let outcome = |o: Outcome| vec![Label::new("outcome", o.label())];
        Scoped {
            requests: Outcome::ALL.map(|o| counter("token_proxy_requests_total", outcome(o))),
            request_duration: Outcome::ALL.map(|o| histogram("token_proxy_request_duration_seconds", outcome(o))),
            upstream_requests: UpstreamClass::ALL
                .map(|c| counter("token_proxy_upstream_requests_total", vec![Label::new("status_class", c.label())])),
            upstream_duration: histogram("token_proxy_upstream_request_duration_seconds", vec![]),
            upstream_calls_avoided: counter("token_proxy_upstream_calls_avoided_total", vec![]),
            throttled: Throttle::ALL
                .map(|t| counter("token_proxy_throttled_total", vec![Label::new("reason", t.label())])),
        }
    }
}

static META: Metadata<'static> = Metadata::new("token_proxy", metrics::Level::INFO, Some(module_path!()));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_design_names_with_bounded_labels() {
        let metrics = Metrics::new();
        metrics.request(Outcome::Hit, Duration::from_micros(300));
        metrics.request(Outcome::Miss, Duration::from_millis(30));
        metrics.upstream_request(UpstreamClass::of(StatusCode::OK), Duration::from_millis(25));
        metrics.redis_error();
        let text = metrics.render();
        for line in [
            "token_proxy_requests_total{outcome=\"hit\"} 1",
            "token_proxy_requests_total{outcome=\"miss\"} 1",
            "token_proxy_requests_total{outcome=\"rejected\"} 0",
            "token_proxy_upstream_requests_total{status_class=\"2xx\"} 1",
            "token_proxy_upstream_calls_avoided_total 1",
            "token_proxy_redis_errors_total 1",
            "token_proxy_redis_breaker_open 0",
            "token_proxy_coalesced_waiters_total 0",
            "token_proxy_lock_takeovers_total 0",
            "token_proxy_lock_acquisitions_total 0",
            "token_proxy_notification_misses_total 0",
            "token_proxy_refreshes_total 0",
            "token_proxy_upstream_held_back_total 0",
            "token_proxy_redis_breaker_transitions_total{to=\"open\"} 0",
            "token_proxy_accept_errors_total{listener=\"client\"} 0",
            "token_proxy_accept_errors_total{listener=\"admin\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert!(
            text.contains("token_proxy_request_duration_seconds_bucket{outcome=\"hit\",le=\"0.0005\"} 1"),
            "{text}"
        );
        assert!(text.contains("token_proxy_upstream_request_duration_seconds_count 1"), "{text}");
    }

    #[test]
    fn each_throttle_reason_counts_under_its_own_label() {
        let metrics = Metrics::new();
        for (n, reason) in Throttle::ALL.into_iter().enumerate() {
            for _ in 0..=n {
                metrics.throttled(reason);
            }
        }
        let text = metrics.render();
        for (n, reason) in Throttle::ALL.into_iter().enumerate() {
            let line = format!("token_proxy_throttled_total{{reason=\"{}\"}} {}", reason.label(), n + 1);
            assert!(text.contains(&line), "{line} in:\n{text}");
        }
    }

    #[test]
    fn a_named_upstream_counts_under_its_own_label_in_the_same_registry() {
        let metrics = Metrics::new();
        let orders = metrics.for_upstream("orders");
        orders.request(Outcome::Hit, Duration::from_micros(300));
        orders.upstream_request(UpstreamClass::of(StatusCode::OK), Duration::from_millis(25));
        orders.throttled(Throttle::ClientBudget);
        orders.redis_error();
        let text = metrics.render();
        for line in [
            "token_proxy_requests_total{outcome=\"hit\",upstream=\"orders\"} 1",
            "token_proxy_requests_total{outcome=\"hit\"} 0",
            "token_proxy_upstream_requests_total{status_class=\"2xx\",upstream=\"orders\"} 1",
            "token_proxy_upstream_calls_avoided_total{upstream=\"orders\"} 1",
            "token_proxy_throttled_total{reason=\"client_budget\",upstream=\"orders\"} 1",
            // Not per upstream: one series for the replica.
            "token_proxy_redis_errors_total 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }

    /// The families of the samples in `text` that lack a `# HELP` or a `# TYPE` line.
    fn undescribed(text: &str) -> Vec<String> {
        let samples = text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty());
        let mut missing: Vec<String> = samples
            .map(|line| line.split(['{', ' ']).next().unwrap_or(line))
            .map(|name| {
                let family = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s));
                // A histogram's series are described under the family's name.
                match family {
                    Some(family) if text.contains(&format!("# TYPE {family} histogram")) => family,
                    _ => name,
                }
            })
            .filter(|family| {
                !text.contains(&format!("# HELP {family} ")) || !text.contains(&format!("# TYPE {family} "))
            })
            .map(str::to_owned)
            .collect();
        missing.dedup();
        missing
    }

    #[test]
    fn every_family_has_help_and_type() {
        let metrics = Metrics::new();
        metrics.connection_refused(ListenerKind::Client, Refusal::Source);
        metrics.request(Outcome::Miss, Duration::from_millis(3));
        let text = metrics.render();
        assert_eq!(undescribed(&text), Vec::<String>::new(), "{text}");
        for (name, _, help) in FAMILIES {
            assert!(text.contains(&format!("# HELP {name} {help}\n")), "{name} is not rendered:\n{text}");
        }
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge"), "{text}");
        // The check itself finds a family without HELP.
        assert_eq!(undescribed("# TYPE x counter\nx 1\n"), ["x"]);
    }

    #[test]
    fn build_info_names_the_version_and_the_commit() {
        let text = Metrics::new().render();
        let line = format!("token_proxy_build_info{{version=\"{VERSION}\",commit=\"{COMMIT}\"}} 1");
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
        assert!(!COMMIT.is_empty());
    }

    #[test]
    fn instances_do_not_share_values() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.redis_error();
        assert!(b.render().contains("token_proxy_redis_errors_total 0"));
    }
}
