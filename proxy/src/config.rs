//! Configuration: environment variables, each also a `--kebab-case` flag.
//!
//! Everything is parsed and validated before anything binds or connects. A bad value is one
//! [`ConfigError`] naming the variable, so an operator sees exactly which setting to fix. The
//! parser reads through a lookup function, so tests never touch the process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use ipnet::IpNet;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use shared::keys::MIN_ROOT_SECRET_LEN;

/// One setting: its variable name, default and help text. The flag is derived from the name.
#[derive(Debug)]
pub struct Setting {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

/// Every setting token-proxy reads. The README's configuration table lists the same names
/// (a test keeps them in step).
pub const SETTINGS: &[Setting] = &[
    Setting { name: "TOKEN_PROXY_LISTEN", default: Some("0.0.0.0:8080"), help: "client-facing address" },
    Setting {
        name: "TOKEN_PROXY_ADMIN_LISTEN",
        default: Some("127.0.0.1:9090"),
        help: "address of /metrics, /healthz and /readyz",
    },
    Setting {
        name: "TOKEN_PROXY_UPSTREAM_URL",
        default: None,
        help: "the token endpoint, e.g. https://DOMAIN.auth.REGION.amazoncognito.com/oauth2/token (required)",
    },
    Setting {
        name: "TOKEN_PROXY_REDIS_URL",
        default: None,
        help: "redis://, rediss://, redis-sentinel:// or redis-cluster:// URL; unset = in-process cache only",
    },
    Setting {
        name: "TOKEN_PROXY_SECRET",
        default: None,
        help: "root secret, base64, at least 32 bytes; required with Redis, random per process without",
    },
    Setting { name: "TOKEN_PROXY_SECRET_FILE", default: None, help: "file holding TOKEN_PROXY_SECRET" },
    Setting {
        name: "TOKEN_PROXY_ADMIN_TOKEN",
        default: None,
        help: "bearer token of the admin API (POST /admin/purge); unset = admin API off",
    },
    Setting { name: "TOKEN_PROXY_ADMIN_TOKEN_FILE", default: None, help: "file holding TOKEN_PROXY_ADMIN_TOKEN" },
    Setting { name: "TOKEN_PROXY_LOG", default: Some("info"), help: "log filter, e.g. info,token_proxy=debug" },
    Setting { name: "TOKEN_PROXY_LOG_FORMAT", default: Some("json"), help: "json or text" },
    Setting {
        name: "TOKEN_PROXY_UPSTREAM_CONNECT_TIMEOUT",
        default: Some("2s"),
        help: "time to open a connection to the token endpoint",
    },
    Setting {
        name: "TOKEN_PROXY_UPSTREAM_TIMEOUT",
        default: Some("10s"),
        help: "time for a whole upstream exchange; past it the caller gets 504",
    },
    Setting {
        name: "TOKEN_PROXY_UPSTREAM_HEADERS_FILE",
        default: None,
        help: "file of `Name: value` lines added to every upstream request (e.g. a WAF origin-verify secret); re-read when it changes",
    },
    Setting {
        name: "TOKEN_PROXY_REDIS_TIMEOUT",
        default: Some("250ms"),
        help: "deadline of one Redis command; past it the request carries on without Redis",
    },
    Setting {
        name: "TOKEN_PROXY_REDIS_BREAKER_THRESHOLD",
        default: Some("5"),
        help: "consecutive Redis failures that open the circuit breaker (degraded mode)",
    },
    Setting {
        name: "TOKEN_PROXY_REDIS_BREAKER_COOLDOWN",
        default: Some("2s"),
        help: "time the breaker stays open before one probe command is let through",
    },
    Setting {
        name: "TOKEN_PROXY_LOCK_TTL",
        default: Some("5s"),
        help: "lifetime of the per-key lock a leader holds while calling the upstream; waiters take over after it",
    },
    Setting {
        name: "TOKEN_PROXY_EXPIRY_MARGIN",
        default: Some("60s"),
        help: "a token with less than this left is no longer fresh: the next request fetches a new one",
    },
    Setting {
        name: "TOKEN_PROXY_MIN_TOKEN_TTL",
        default: Some("30s"),
        help: "a token with less than this left is never served, not even when the upstream fails",
    },
    Setting {
        name: "TOKEN_PROXY_REFRESH_AT",
        default: Some("0.75"),
        help: "share of a token's lifetime after which a hit starts one background refresh (1 = never)",
    },
    Setting {
        name: "TOKEN_PROXY_MAX_TOKEN_LIFETIME",
        default: Some("1d"),
        help: "longest lifetime a token is cached with; a larger expires_in is capped (Cognito's longest is 1 day)",
    },
    Setting {
        name: "TOKEN_PROXY_L1_CAPACITY",
        default: Some("10000"),
        help: "entries in the in-process cache; 0 disables it (only allowed with Redis)",
    },
    Setting {
        name: "TOKEN_PROXY_L1_MAX_AGE",
        default: Some("10s"),
        help: "with Redis: longest an entry stays in the in-process cache before Redis is asked again",
    },
    Setting { name: "TOKEN_PROXY_MAX_BODY_BYTES", default: Some("8192"), help: "largest request body (413 above)" },
    Setting {
        name: "TOKEN_PROXY_MAX_HEADER_BYTES",
        default: Some("8192"),
        help: "largest total size of request headers (431 above)",
    },
    Setting {
        name: "TOKEN_PROXY_PREVIOUS_SECRETS",
        default: None,
        help: "earlier root secrets, base64, comma-separated: their entries are still read (key rotation)",
    },
    Setting {
        name: "TOKEN_PROXY_PREVIOUS_SECRETS_FILE",
        default: None,
        help: "file holding TOKEN_PROXY_PREVIOUS_SECRETS, one per line",
    },
    Setting {
        name: "TOKEN_PROXY_AUTH_FAILURE_LIMIT",
        default: Some("5"),
        help: "failed authentications (invalid_client) per client_id and source address in a window before 429; 0 = off",
    },
    Setting {
        name: "TOKEN_PROXY_AUTH_FAILURE_CLIENT_LIMIT",
        default: Some("50"),
        help: "failed authentications per client_id from all sources in a window before 429; 0 = off",
    },
    Setting {
        name: "TOKEN_PROXY_AUTH_FAILURE_WINDOW",
        default: Some("60s"),
        help: "the window in which failed authentications are counted",
    },
    Setting {
        name: "TOKEN_PROXY_UPSTREAM_RATE_LIMIT",
        default: Some("0"),
        help: "upstream calls per second for the whole cluster (per replica when Redis is down); 0 = no cap",
    },
    Setting {
        name: "TOKEN_PROXY_UPSTREAM_QUEUE_TIMEOUT",
        default: Some("1s"),
        help: "how long a call over the upstream rate cap waits for a slot before 429",
    },
    Setting {
        name: "TOKEN_PROXY_MAX_CONCURRENT_REQUESTS",
        default: Some("1024"),
        help: "requests handled at once per replica; more are shed at once with 503",
    },
    Setting {
        name: "TOKEN_PROXY_REQUEST_TIMEOUT",
        default: Some("30s"),
        help: "longest time one request may take, body included (408 past it)",
    },
    Setting {
        name: "TOKEN_PROXY_HEADER_READ_TIMEOUT",
        default: Some("5s"),
        help: "time a client has to send a request's headers; idle keep-alive connections close after it too",
    },
    Setting {
        name: "TOKEN_PROXY_DRAIN_DELAY",
        default: Some("5s"),
        help: "after SIGTERM, how long both listeners keep serving while /readyz answers 503 (load balancers take the replica out); 0 = stop at once",
    },
    Setting {
        name: "TOKEN_PROXY_BODY_TIMEOUT",
        default: Some("5s"),
        help: "time a client has to send a request's body once its headers are in (408 past it)",
    },
    Setting {
        name: "TOKEN_PROXY_MAX_CONNECTIONS",
        default: Some("4096"),
        help: "open connections on the client listener; more are closed at once",
    },
    Setting {
        name: "TOKEN_PROXY_MAX_CONNECTIONS_PER_SOURCE",
        default: Some("1024"),
        help: "open client connections from one source address (IPv6: one /64), more are closed at once; behind a trusted proxy, unfinished requests per source, more get 429",
    },
    Setting {
        name: "TOKEN_PROXY_ADMIN_MAX_CONNECTIONS",
        default: Some("64"),
        help: "open connections on the admin listener; more are closed at once",
    },
    Setting {
        name: "TOKEN_PROXY_TLS_CERT_FILE",
        default: None,
        help: "PEM certificate chain: serve TLS on the client listener (re-read when it changes)",
    },
    Setting { name: "TOKEN_PROXY_TLS_KEY_FILE", default: None, help: "PEM private key of TOKEN_PROXY_TLS_CERT_FILE" },
    Setting {
        name: "TOKEN_PROXY_TLS_CLIENT_CA_FILE",
        default: None,
        help: "PEM CA bundle: require client certificates signed by it (mTLS); needs TLS",
    },
    Setting {
        name: "TOKEN_PROXY_ALLOWED_NETWORKS",
        default: None,
        help: "comma-separated networks (CIDR) allowed to call the client listener; unset = any",
    },
    Setting {
        name: "TOKEN_PROXY_TRUSTED_PROXIES",
        default: None,
        help: "comma-separated networks of load balancers whose X-Forwarded-For names the source address",
    },
    Setting {
        name: "TOKEN_PROXY_ALLOW_QUERY_PARAMS",
        default: Some("false"),
        help: "accept parameters in the query string like the API Gateway sample (discouraged: URLs get logged)",
    },
];

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Validated configuration of one replica.
#[derive(Debug)]
pub struct Config {
    /// Client-facing address (`TOKEN_PROXY_LISTEN`).
    pub listen: SocketAddr,
    /// Admin address: metrics, health, readiness (`TOKEN_PROXY_ADMIN_LISTEN`).
    pub admin_listen: SocketAddr,
    /// The token endpoint every request is sent to (`TOKEN_PROXY_UPSTREAM_URL`).
    pub upstream_url: reqwest::Url,
    /// Shared cache; `None` runs one replica alone on its in-process cache (`TOKEN_PROXY_REDIS_URL`).
    pub redis_url: Option<String>,
    /// Root secret the cache keys and seal keys derive from; `None` = random per process.
    pub secret: Option<SecretBox<Vec<u8>>>,
    /// Bearer token of the admin API; `None` turns the admin API off.
    pub admin_token: Option<SecretString>,
    /// Tracing filter directive (`TOKEN_PROXY_LOG`).
    pub log_filter: String,
    pub log_format: LogFormat,
    /// Time to connect to the token endpoint. Default 2 s.
    pub upstream_connect_timeout: Duration,
    /// Time for one whole upstream exchange. Default 10 s.
    pub upstream_timeout: Duration,
    /// Extra upstream headers, re-read when the file changes.
    pub upstream_headers_file: Option<PathBuf>,
    /// Deadline of one Redis command. Default 250 ms.
    pub redis_timeout: Duration,
    /// Consecutive Redis failures that open the breaker. Default 5.
    pub redis_breaker_threshold: u32,
    /// Time the breaker stays open before a probe. Default 2 s.
    pub redis_breaker_cooldown: Duration,
    /// Lifetime of a leader's lock. Default 5 s.
    pub lock_ttl: Duration,
    /// A token with less than this left is no longer fresh. Default 60 s.
    pub expiry_margin: Duration,
    /// No token with less than this left is served, even as a stale fallback. Default 30 s.
    pub min_token_ttl: Duration,
    /// Share of a token's lifetime after which hits start a background refresh. Default 0.75.
    pub refresh_at: f64,
    /// Longest lifetime a token is cached with: the entry lives at most this long and its
    /// `expires_in` never says more than what is left of it. Default 1 day (Cognito's longest).
    pub max_token_lifetime: Duration,
    /// Entries in the in-process cache (L1); 0 disables it. Default 10 000.
    pub l1_capacity: usize,
    /// With Redis, the longest an entry lives in L1. Default 10 s.
    pub l1_max_age: Duration,
    /// Largest request body in bytes. Default 8 KiB.
    pub max_body_bytes: usize,
    /// Largest total size of request headers in bytes. Default 8 KiB.
    pub max_header_bytes: usize,
    /// Accept parameters in the query string. Default false.
    pub allow_query_params: bool,
    /// Earlier root secrets whose entries are still read (never written).
    pub previous_secrets: Vec<SecretBox<Vec<u8>>>,
    /// Failed-authentication throttling.
    pub auth_failures: AuthFailureLimits,
    /// Upstream calls per second for the whole cluster; 0 = no cap.
    pub upstream_rate_limit: u32,
    /// How long a call over the rate cap waits for a slot. Default 1 s.
    pub upstream_queue_timeout: Duration,
    /// Requests handled at once; more are shed with 503. Default 1024.
    pub max_concurrent_requests: usize,
    /// Longest time one request may take. Default 30 s.
    pub request_timeout: Duration,
    /// Time a client has to send a request's headers. Default 5 s.
    pub header_read_timeout: Duration,
    /// After SIGTERM, how long both listeners keep serving while `/readyz` answers 503, so
    /// load balancers stop routing here before connections are refused; zero skips it. Then
    /// the listeners stop accepting and requests in flight get up to `request_timeout` to
    /// finish. Default 5 s.
    pub drain_delay: Duration,
    /// Time a client has to send a request's body once its headers are in; a body still
    /// arriving after it gets 408. Default 5 s.
    pub body_timeout: Duration,
    /// Open connections on the client listener; more are closed at once. Default 4096.
    pub max_connections: usize,
    /// Open client connections from one source address (an IPv6 /64 counts as one); more are
    /// closed at once. Connections from trusted proxies are not counted; instead each source
    /// they name may have this many unfinished requests, more get 429. Default 1024, as many as
    /// `max_concurrent_requests`: a load balancer not listed as a trusted proxy meets load
    /// shedding before it meets this cap.
    pub max_connections_per_source: usize,
    /// Open connections on the admin listener; more are closed at once. Default 64.
    pub admin_max_connections: usize,
    /// TLS on the client listener; `None` = plain HTTP.
    pub tls: Option<TlsFiles>,
    /// Source networks allowed on the client listener; empty = any.
    pub allowed_networks: Vec<IpNet>,
    /// Load balancers whose `X-Forwarded-For` names the source address.
    pub trusted_proxies: Vec<IpNet>,
}

/// Thresholds of failed-authentication throttling, counted over `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthFailureLimits {
    /// Per client_id and source address; 0 = off.
    pub per_source: u32,
    /// Per client_id, from all sources; 0 = off.
    pub per_client: u32,
    pub window: Duration,
}

/// Certificate files of the client listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA bundle client certificates must chain to (mTLS); `None` = no client certificates.
    pub client_ca: Option<PathBuf>,
}

/// A setting with a bad value: `Display` is one line naming the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    pub variable: String,
    pub message: String,
}

fn error(variable: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { variable: variable.to_owned(), message: message.into() }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    Help,
}

impl Config {
    /// Reads the process environment and command-line flags (flags win).
    pub fn from_env_and_args(args: impl IntoIterator<Item = String>) -> Result<Command, ConfigError> {
        let flags = match parse_flags(args)? {
            Some(flags) => flags,
            None => return Ok(Command::Help),
        };
        let config = Config::from_lookup(|name| flags.get(name).cloned().or_else(|| std::env::var(name).ok()))?;
        Ok(Command::Run(Box::new(config)))
    }

    /// Parses every setting through `lookup`, which returns a variable's raw value.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let get = |name: &str| -> Option<String> {
            lookup(name)
                .filter(|v| !v.is_empty())
                .or_else(|| SETTINGS.iter().find(|s| s.name == name).and_then(|s| s.default.map(str::to_owned)))
        };
        let required = |name: &str| get(name).ok_or_else(|| error(name, "is required"));

        let upstream_url = parse_upstream_url(&required("TOKEN_PROXY_UPSTREAM_URL")?)?;
        let redis_url = get("TOKEN_PROXY_REDIS_URL").map(|url| parse_redis_url(&url)).transpose()?;
        let secret = parse_secret(get("TOKEN_PROXY_SECRET"), get("TOKEN_PROXY_SECRET_FILE"))?;
        if redis_url.is_some() && secret.is_none() {
            return Err(error(
                "TOKEN_PROXY_SECRET",
                "is required when TOKEN_PROXY_REDIS_URL is set (every replica must share it)",
            ));
        }
        let admin_token = parse_admin_token(get("TOKEN_PROXY_ADMIN_TOKEN"), get("TOKEN_PROXY_ADMIN_TOKEN_FILE"))?;
        let log_format = match required("TOKEN_PROXY_LOG_FORMAT")?.as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => return Err(error("TOKEN_PROXY_LOG_FORMAT", format!("expected json or text, got {other:?}"))),
        };
        let config = Config {
            listen: parse(
                &required("TOKEN_PROXY_LISTEN")?,
                "TOKEN_PROXY_LISTEN",
                "a socket address like 0.0.0.0:8080",
            )?,
            admin_listen: parse(
                &required("TOKEN_PROXY_ADMIN_LISTEN")?,
                "TOKEN_PROXY_ADMIN_LISTEN",
                "a socket address like 127.0.0.1:9090",
            )?,
            upstream_url,
            redis_url,
            secret,
            admin_token,
            log_filter: required("TOKEN_PROXY_LOG")?,
            log_format,
            upstream_connect_timeout: duration(&get, "TOKEN_PROXY_UPSTREAM_CONNECT_TIMEOUT")?,
            upstream_timeout: duration(&get, "TOKEN_PROXY_UPSTREAM_TIMEOUT")?,
            upstream_headers_file: get("TOKEN_PROXY_UPSTREAM_HEADERS_FILE").map(PathBuf::from),
            redis_timeout: duration(&get, "TOKEN_PROXY_REDIS_TIMEOUT")?,
            redis_breaker_threshold: parse(
                &required("TOKEN_PROXY_REDIS_BREAKER_THRESHOLD")?,
                "TOKEN_PROXY_REDIS_BREAKER_THRESHOLD",
                "a whole number",
            )?,
            redis_breaker_cooldown: duration(&get, "TOKEN_PROXY_REDIS_BREAKER_COOLDOWN")?,
            lock_ttl: duration(&get, "TOKEN_PROXY_LOCK_TTL")?,
            expiry_margin: duration(&get, "TOKEN_PROXY_EXPIRY_MARGIN")?,
            min_token_ttl: duration(&get, "TOKEN_PROXY_MIN_TOKEN_TTL")?,
            refresh_at: parse(&required("TOKEN_PROXY_REFRESH_AT")?, "TOKEN_PROXY_REFRESH_AT", "a number in (0, 1]")?,
            max_token_lifetime: duration(&get, "TOKEN_PROXY_MAX_TOKEN_LIFETIME")?,
            l1_capacity: parse(&required("TOKEN_PROXY_L1_CAPACITY")?, "TOKEN_PROXY_L1_CAPACITY", "a whole number")?,
            l1_max_age: duration(&get, "TOKEN_PROXY_L1_MAX_AGE")?,
            max_body_bytes: parse(
                &required("TOKEN_PROXY_MAX_BODY_BYTES")?,
                "TOKEN_PROXY_MAX_BODY_BYTES",
                "a whole number",
            )?,
            max_header_bytes: parse(
                &required("TOKEN_PROXY_MAX_HEADER_BYTES")?,
                "TOKEN_PROXY_MAX_HEADER_BYTES",
                "a whole number",
            )?,
            allow_query_params: parse(
                &required("TOKEN_PROXY_ALLOW_QUERY_PARAMS")?,
                "TOKEN_PROXY_ALLOW_QUERY_PARAMS",
                "true or false",
            )?,
            previous_secrets: parse_previous_secrets(
                get("TOKEN_PROXY_PREVIOUS_SECRETS"),
                get("TOKEN_PROXY_PREVIOUS_SECRETS_FILE"),
            )?,
            auth_failures: AuthFailureLimits {
                per_source: parse(
                    &required("TOKEN_PROXY_AUTH_FAILURE_LIMIT")?,
                    "TOKEN_PROXY_AUTH_FAILURE_LIMIT",
                    "a whole number",
                )?,
                per_client: parse(
                    &required("TOKEN_PROXY_AUTH_FAILURE_CLIENT_LIMIT")?,
                    "TOKEN_PROXY_AUTH_FAILURE_CLIENT_LIMIT",
                    "a whole number",
                )?,
                window: duration(&get, "TOKEN_PROXY_AUTH_FAILURE_WINDOW")?,
            },
            upstream_rate_limit: parse(
                &required("TOKEN_PROXY_UPSTREAM_RATE_LIMIT")?,
                "TOKEN_PROXY_UPSTREAM_RATE_LIMIT",
                "a whole number",
            )?,
            upstream_queue_timeout: duration(&get, "TOKEN_PROXY_UPSTREAM_QUEUE_TIMEOUT")?,
            max_concurrent_requests: parse(
                &required("TOKEN_PROXY_MAX_CONCURRENT_REQUESTS")?,
                "TOKEN_PROXY_MAX_CONCURRENT_REQUESTS",
                "a whole number",
            )?,
            request_timeout: duration(&get, "TOKEN_PROXY_REQUEST_TIMEOUT")?,
            header_read_timeout: duration(&get, "TOKEN_PROXY_HEADER_READ_TIMEOUT")?,
            drain_delay: duration(&get, "TOKEN_PROXY_DRAIN_DELAY")?,
            body_timeout: duration(&get, "TOKEN_PROXY_BODY_TIMEOUT")?,
            max_connections: parse(
                &required("TOKEN_PROXY_MAX_CONNECTIONS")?,
                "TOKEN_PROXY_MAX_CONNECTIONS",
                "a whole number",
            )?,
            max_connections_per_source: parse(
                &required("TOKEN_PROXY_MAX_CONNECTIONS_PER_SOURCE")?,
                "TOKEN_PROXY_MAX_CONNECTIONS_PER_SOURCE",
                "a whole number",
            )?,
            admin_max_connections: parse(
                &required("TOKEN_PROXY_ADMIN_MAX_CONNECTIONS")?,
                "TOKEN_PROXY_ADMIN_MAX_CONNECTIONS",
                "a whole number",
            )?,
            tls: parse_tls(
                get("TOKEN_PROXY_TLS_CERT_FILE"),
                get("TOKEN_PROXY_TLS_KEY_FILE"),
                get("TOKEN_PROXY_TLS_CLIENT_CA_FILE"),
            )?,
            allowed_networks: parse_networks(get("TOKEN_PROXY_ALLOWED_NETWORKS"), "TOKEN_PROXY_ALLOWED_NETWORKS")?,
            trusted_proxies: parse_networks(get("TOKEN_PROXY_TRUSTED_PROXIES"), "TOKEN_PROXY_TRUSTED_PROXIES")?,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.upstream_timeout.is_zero() {
            return Err(error("TOKEN_PROXY_UPSTREAM_TIMEOUT", "must be more than zero"));
        }
        if self.redis_timeout.is_zero() {
            return Err(error("TOKEN_PROXY_REDIS_TIMEOUT", "must be more than zero"));
        }
        if !(self.refresh_at > 0.0 && self.refresh_at <= 1.0) {
            return Err(error("TOKEN_PROXY_REFRESH_AT", "must be more than 0 and at most 1"));
        }
        // A cap at or below the fresh cutoff would make every token stale on arrival.
        if self.max_token_lifetime <= self.expiry_margin.max(self.min_token_ttl) {
            return Err(error(
                "TOKEN_PROXY_MAX_TOKEN_LIFETIME",
                "must be longer than TOKEN_PROXY_EXPIRY_MARGIN and TOKEN_PROXY_MIN_TOKEN_TTL",
            ));
        }
        // Lifetimes are stored as 32-bit seconds.
        if self.max_token_lifetime.as_secs() > u64::from(u32::MAX) {
            return Err(error("TOKEN_PROXY_MAX_TOKEN_LIFETIME", "must be at most 4294967295s (about 136 years)"));
        }
        if self.lock_ttl < Duration::from_millis(100) {
            return Err(error("TOKEN_PROXY_LOCK_TTL", "must be at least 100ms"));
        }
        if self.redis_breaker_threshold == 0 {
            return Err(error("TOKEN_PROXY_REDIS_BREAKER_THRESHOLD", "must be at least 1"));
        }
        if self.l1_capacity == 0 && self.redis_url.is_none() {
            return Err(error("TOKEN_PROXY_L1_CAPACITY", "must be more than zero without TOKEN_PROXY_REDIS_URL"));
        }
        if self.max_body_bytes < 64 {
            return Err(error("TOKEN_PROXY_MAX_BODY_BYTES", "must be at least 64"));
        }
        if self.max_header_bytes < 256 {
            return Err(error("TOKEN_PROXY_MAX_HEADER_BYTES", "must be at least 256"));
        }
        if self.auth_failures.window.is_zero() {
            return Err(error("TOKEN_PROXY_AUTH_FAILURE_WINDOW", "must be more than zero"));
        }
        if self.max_concurrent_requests == 0 {
            return Err(error("TOKEN_PROXY_MAX_CONCURRENT_REQUESTS", "must be at least 1"));
        }
        if self.request_timeout <= self.upstream_timeout {
            return Err(error(
                "TOKEN_PROXY_REQUEST_TIMEOUT",
                "must be longer than TOKEN_PROXY_UPSTREAM_TIMEOUT (a request may wait for one upstream call)",
            ));
        }
        if self.header_read_timeout.is_zero() {
            return Err(error("TOKEN_PROXY_HEADER_READ_TIMEOUT", "must be more than zero"));
        }
        if self.body_timeout.is_zero() {
            return Err(error("TOKEN_PROXY_BODY_TIMEOUT", "must be more than zero"));
        }
        for (variable, value) in [
            ("TOKEN_PROXY_MAX_CONNECTIONS", self.max_connections),
            ("TOKEN_PROXY_MAX_CONNECTIONS_PER_SOURCE", self.max_connections_per_source),
            ("TOKEN_PROXY_ADMIN_MAX_CONNECTIONS", self.admin_max_connections),
        ] {
            if value == 0 {
                return Err(error(variable, "must be at least 1"));
            }
        }
        if !self.previous_secrets.is_empty() && self.secret.is_none() {
            return Err(error("TOKEN_PROXY_PREVIOUS_SECRETS", "needs TOKEN_PROXY_SECRET (the current secret)"));
        }
        Ok(())
    }

    /// A configuration for tests and embedding: loopback on port 0, no Redis, defaults otherwise.
    pub fn for_upstream(upstream_url: &str) -> Result<Config, ConfigError> {
        let upstream_url = upstream_url.to_owned();
        Config::from_lookup(move |name| match name {
            "TOKEN_PROXY_UPSTREAM_URL" => Some(upstream_url.clone()),
            "TOKEN_PROXY_LISTEN" | "TOKEN_PROXY_ADMIN_LISTEN" => Some("127.0.0.1:0".to_owned()),
            _ => None,
        })
    }

    /// The root secret's bytes, if one was configured.
    pub fn secret_bytes(&self) -> Option<&[u8]> {
        self.secret.as_ref().map(|s| s.expose_secret().as_slice())
    }
}

fn parse<T: std::str::FromStr>(value: &str, variable: &str, expected: &str) -> Result<T, ConfigError> {
    value.trim().parse().map_err(|_| error(variable, format!("expected {expected}, got {value:?}")))
}

fn duration(get: &impl Fn(&str) -> Option<String>, variable: &str) -> Result<Duration, ConfigError> {
    let value = get(variable).ok_or_else(|| error(variable, "is required"))?;
    humantime::parse_duration(value.trim())
        .map_err(|_| error(variable, format!("expected a duration such as 30s or 250ms, got {value:?}")))
}

fn parse_upstream_url(value: &str) -> Result<reqwest::Url, ConfigError> {
    let variable = "TOKEN_PROXY_UPSTREAM_URL";
    let url = reqwest::Url::parse(value).map_err(|e| error(variable, format!("not a URL ({e})")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(error(variable, "must be an http:// or https:// URL"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(error(variable, "must not carry credentials"));
    }
    Ok(url)
}

fn parse_redis_url(value: &str) -> Result<String, ConfigError> {
    let scheme = value.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("redis" | "rediss" | "redis-sentinel" | "redis-cluster") => Ok(value.to_owned()),
        // Never echo the URL: it may carry a password.
        _ => Err(error(
            "TOKEN_PROXY_REDIS_URL",
            "must start with redis://, rediss://, redis-sentinel:// or redis-cluster://",
        )),
    }
}

/// A secret given inline (`NAME`) or in a file (`NAME_FILE`), trimmed, with the variable it came
/// from (for error messages, which never echo the value).
fn inline_or_file(
    name: &'static str,
    file_name: &'static str,
    inline: Option<String>,
    file: Option<String>,
) -> Result<Option<(&'static str, String)>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(error(file_name, format!("set either {name} or {file_name}, not both"))),
        (Some(inline), None) => Ok(Some((name, inline.trim().to_owned()))),
        (None, Some(path)) => {
            let contents =
                std::fs::read_to_string(&path).map_err(|e| error(file_name, format!("cannot read {path}: {e}")))?;
            Ok(Some((file_name, contents.trim().to_owned())))
        }
        (None, None) => Ok(None),
    }
}

fn parse_secret(inline: Option<String>, file: Option<String>) -> Result<Option<SecretBox<Vec<u8>>>, ConfigError> {
    let Some((variable, encoded)) = inline_or_file("TOKEN_PROXY_SECRET", "TOKEN_PROXY_SECRET_FILE", inline, file)?
    else {
        return Ok(None);
    };
    decode_root_secret(&encoded).map(Some).map_err(|message| error(variable, message))
}

/// Earlier root secrets: comma-separated inline, or one per line in a file.
fn parse_previous_secrets(
    inline: Option<String>,
    file: Option<String>,
) -> Result<Vec<SecretBox<Vec<u8>>>, ConfigError> {
    let Some((variable, list)) =
        inline_or_file("TOKEN_PROXY_PREVIOUS_SECRETS", "TOKEN_PROXY_PREVIOUS_SECRETS_FILE", inline, file)?
    else {
        return Ok(Vec::new());
    };
    list.split([',', '\n'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
        .map(|(i, encoded)| {
            decode_root_secret(encoded).map_err(|message| error(variable, format!("secret {}: {message}", i + 1)))
        })
        .collect()
}

/// Base64 of at least [`MIN_ROOT_SECRET_LEN`] bytes. The message never quotes the value.
fn decode_root_secret(encoded: &str) -> Result<SecretBox<Vec<u8>>, String> {
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|_| "is not valid base64".to_owned())?;
    if bytes.len() < MIN_ROOT_SECRET_LEN {
        return Err(format!(
            "must decode to at least {MIN_ROOT_SECRET_LEN} bytes, got {} (try: openssl rand -base64 32)",
            bytes.len()
        ));
    }
    Ok(SecretBox::new(Box::new(bytes)))
}

fn parse_tls(
    cert: Option<String>,
    key: Option<String>,
    client_ca: Option<String>,
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => {
            Ok(Some(TlsFiles { cert: cert.into(), key: key.into(), client_ca: client_ca.map(PathBuf::from) }))
        }
        (Some(_), None) => Err(error("TOKEN_PROXY_TLS_KEY_FILE", "is required with TOKEN_PROXY_TLS_CERT_FILE")),
        (None, Some(_)) => Err(error("TOKEN_PROXY_TLS_CERT_FILE", "is required with TOKEN_PROXY_TLS_KEY_FILE")),
        (None, None) if client_ca.is_some() => {
            Err(error("TOKEN_PROXY_TLS_CLIENT_CA_FILE", "needs TLS (TOKEN_PROXY_TLS_CERT_FILE and _KEY_FILE)"))
        }
        (None, None) => Ok(None),
    }
}

/// Comma-separated networks in CIDR notation; a bare address is a network of one.
fn parse_networks(value: Option<String>, variable: &str) -> Result<Vec<IpNet>, ConfigError> {
    let Some(value) = value else { return Ok(Vec::new()) };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| error(variable, format!("expected networks like 10.0.0.0/8, got {item:?}")))
        })
        .collect()
}

/// Shortest admin token accepted: it guards purges of the whole cache.
const MIN_ADMIN_TOKEN_LEN: usize = 16;

fn parse_admin_token(inline: Option<String>, file: Option<String>) -> Result<Option<SecretString>, ConfigError> {
    let Some((variable, token)) =
        inline_or_file("TOKEN_PROXY_ADMIN_TOKEN", "TOKEN_PROXY_ADMIN_TOKEN_FILE", inline, file)?
    else {
        return Ok(None);
    };
    if token.len() < MIN_ADMIN_TOKEN_LEN {
        return Err(error(variable, format!("must be at least {MIN_ADMIN_TOKEN_LEN} characters")));
    }
    Ok(Some(SecretString::from(token)))
}

/// Maps `--kebab-case value` and `--kebab-case=value` to variable names. `None` means `--help`.
fn parse_flags(args: impl IntoIterator<Item = String>) -> Result<Option<HashMap<&'static str, String>>, ConfigError> {
    let mut flags = HashMap::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--help" || arg == "-h" {
            return Ok(None);
        }
        let Some(flag) = arg.strip_prefix("--") else {
            return Err(error(&arg, "unexpected argument (settings are --flags or TOKEN_PROXY_* variables)"));
        };
        let (flag, inline_value) = match flag.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (flag, None),
        };
        let setting = SETTINGS
            .iter()
            .find(|s| flag_name(s.name) == flag)
            .ok_or_else(|| error(&format!("--{flag}"), "unknown flag (see --help)"))?;
        let value = match inline_value {
            Some(v) => v,
            None => args.next().ok_or_else(|| error(&format!("--{flag}"), "needs a value"))?,
        };
        flags.insert(setting.name, value);
    }
    Ok(Some(flags))
}

/// `TOKEN_PROXY_ADMIN_LISTEN` → `admin-listen`.
pub fn flag_name(variable: &str) -> String {
    variable.trim_start_matches("TOKEN_PROXY_").to_ascii_lowercase().replace('_', "-")
}

/// The `--help` text.
pub fn help() -> String {
    let mut out = String::from(
        "token-proxy: a caching proxy for OAuth2 client-credentials token endpoints\n\n\
         Every setting is an environment variable or the matching flag (flags win).\n\n",
    );
    for s in SETTINGS {
        out.push_str(&format!("  --{:<28} {}\n", flag_name(s.name), s.name));
        out.push_str(&format!("      {}", s.help));
        if let Some(default) = s.default {
            out.push_str(&format!(" [default: {default}]"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| vars.get(name).cloned()
    }

    const UPSTREAM: (&str, &str) = ("TOKEN_PROXY_UPSTREAM_URL", "http://127.0.0.1:9000/oauth2/token");
    const SECRET: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="; // 32 bytes

    #[test]
    fn defaults_follow_the_design() {
        let config = Config::from_lookup(lookup(&[UPSTREAM])).unwrap();
        assert_eq!(config.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert!(config.redis_url.is_none());
        assert!(config.secret.is_none());
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.redis_timeout, Duration::from_millis(250));
        assert_eq!(config.drain_delay, Duration::from_secs(5));
        assert_eq!(config.max_token_lifetime, Duration::from_secs(86_400));
        assert!(!config.allow_query_params);
    }

    #[test]
    fn upstream_is_required() {
        let err = Config::from_lookup(lookup(&[])).unwrap_err();
        assert_eq!(err.to_string(), "TOKEN_PROXY_UPSTREAM_URL: is required");
    }

    #[test]
    fn redis_requires_a_secret() {
        let err =
            Config::from_lookup(lookup(&[UPSTREAM, ("TOKEN_PROXY_REDIS_URL", "redis://127.0.0.1:6379")])).unwrap_err();
        assert_eq!(err.variable, "TOKEN_PROXY_SECRET");
        let ok = Config::from_lookup(lookup(&[
            UPSTREAM,
            ("TOKEN_PROXY_REDIS_URL", "redis://127.0.0.1:6379"),
            ("TOKEN_PROXY_SECRET", SECRET),
        ]))
        .unwrap();
        assert_eq!(ok.secret_bytes().unwrap(), b"0123456789abcdef0123456789abcdef");
    }

    #[test]
    fn bad_values_name_their_variable_in_one_line() {
        let cases = [
            ("TOKEN_PROXY_LISTEN", "nowhere"),
            ("TOKEN_PROXY_REDIS_TIMEOUT", "soon"),
            ("TOKEN_PROXY_LOG_FORMAT", "xml"),
            ("TOKEN_PROXY_SECRET", "c2hvcnQ="),
            ("TOKEN_PROXY_SECRET", "not base64!"),
            ("TOKEN_PROXY_REDIS_URL", "http://x"),
            ("TOKEN_PROXY_L1_CAPACITY", "-1"),
            ("TOKEN_PROXY_ALLOW_QUERY_PARAMS", "yes please"),
            ("TOKEN_PROXY_UPSTREAM_URL", "ftp://x/"),
            ("TOKEN_PROXY_REFRESH_AT", "1.5"),
            ("TOKEN_PROXY_REFRESH_AT", "0"),
            ("TOKEN_PROXY_LOCK_TTL", "10ms"),
            ("TOKEN_PROXY_MAX_TOKEN_LIFETIME", "30s"),
            ("TOKEN_PROXY_MAX_TOKEN_LIFETIME", "200years"),
            ("TOKEN_PROXY_MAX_TOKEN_LIFETIME", "forever"),
            ("TOKEN_PROXY_REDIS_BREAKER_THRESHOLD", "0"),
            ("TOKEN_PROXY_ADMIN_TOKEN", "short"),
            ("TOKEN_PROXY_PREVIOUS_SECRETS", "c2hvcnQ="),
            ("TOKEN_PROXY_AUTH_FAILURE_WINDOW", "0s"),
            ("TOKEN_PROXY_UPSTREAM_RATE_LIMIT", "lots"),
            ("TOKEN_PROXY_MAX_CONCURRENT_REQUESTS", "0"),
            ("TOKEN_PROXY_REQUEST_TIMEOUT", "5s"),
            ("TOKEN_PROXY_HEADER_READ_TIMEOUT", "0s"),
            ("TOKEN_PROXY_DRAIN_DELAY", "soon"),
            ("TOKEN_PROXY_BODY_TIMEOUT", "0s"),
            ("TOKEN_PROXY_MAX_CONNECTIONS", "0"),
            ("TOKEN_PROXY_MAX_CONNECTIONS_PER_SOURCE", "many"),
            ("TOKEN_PROXY_ADMIN_MAX_CONNECTIONS", "0"),
            ("TOKEN_PROXY_TLS_CLIENT_CA_FILE", "/etc/ca.pem"),
            ("TOKEN_PROXY_ALLOWED_NETWORKS", "10.0.0.0/8, not-a-network"),
            ("TOKEN_PROXY_TRUSTED_PROXIES", "10.0.0.0/33"),
        ];
        for (variable, value) in cases {
            let err = Config::from_lookup(lookup(&[UPSTREAM, (variable, value)])).unwrap_err();
            assert_eq!(err.variable, variable, "{value}");
            assert!(!err.to_string().contains('\n'));
        }
    }

    #[test]
    fn networks_previous_secrets_and_tls_parse() {
        let other = "YWJjZGVmZ2hpamtsbW5vcHFyc3R1dnd4eXoxMjM0NTY="; // 32 bytes
        let config = Config::from_lookup(lookup(&[
            UPSTREAM,
            ("TOKEN_PROXY_SECRET", SECRET),
            ("TOKEN_PROXY_PREVIOUS_SECRETS", &format!("{other}, {SECRET}")),
            ("TOKEN_PROXY_ALLOWED_NETWORKS", "10.1.2.3/8, 192.168.0.7, ::1"),
            ("TOKEN_PROXY_TLS_CERT_FILE", "/etc/cert.pem"),
            ("TOKEN_PROXY_TLS_KEY_FILE", "/etc/key.pem"),
        ]))
        .unwrap();
        assert_eq!(config.previous_secrets.len(), 2);
        assert_eq!(config.previous_secrets[0].expose_secret().as_slice(), b"abcdefghijklmnopqrstuvwxyz123456");
        let networks: Vec<String> = config.allowed_networks.iter().map(ToString::to_string).collect();
        assert_eq!(networks, ["10.0.0.0/8", "192.168.0.7/32", "::1/128"]);
        assert!(config.trusted_proxies.is_empty());
        let tls = config.tls.unwrap();
        assert_eq!((tls.cert.to_str(), tls.client_ca), (Some("/etc/cert.pem"), None));
        let without_current = Config::from_lookup(lookup(&[UPSTREAM, ("TOKEN_PROXY_PREVIOUS_SECRETS", other)]));
        assert_eq!(without_current.unwrap_err().variable, "TOKEN_PROXY_PREVIOUS_SECRETS");
        let cert_without_key = Config::from_lookup(lookup(&[UPSTREAM, ("TOKEN_PROXY_TLS_CERT_FILE", "/etc/c.pem")]));
        assert_eq!(cert_without_key.unwrap_err().variable, "TOKEN_PROXY_TLS_KEY_FILE");
    }

    #[test]
    fn secret_values_are_never_echoed() {
        let err = Config::from_lookup(lookup(&[UPSTREAM, ("TOKEN_PROXY_SECRET", "c2VjcmV0LXNob3J0")])).unwrap_err();
        assert!(!err.to_string().contains("c2VjcmV0LXNob3J0"));
        let err = Config::from_lookup(lookup(&[UPSTREAM, ("TOKEN_PROXY_REDIS_URL", "tcp://:hunter2@x")])).unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }

    #[test]
    fn secrets_come_inline_or_from_a_file_but_not_both() {
        let dir = std::env::temp_dir().join(format!("tp-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret_file = dir.join("secret");
        std::fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, "admin-token-from-a-file\n").unwrap();
        let (secret_path, token_path) = (secret_file.to_str().unwrap(), token_file.to_str().unwrap());
        let config = Config::from_lookup(lookup(&[
            UPSTREAM,
            ("TOKEN_PROXY_SECRET_FILE", secret_path),
            ("TOKEN_PROXY_ADMIN_TOKEN_FILE", token_path),
        ]))
        .unwrap();
        assert_eq!(config.secret_bytes().unwrap(), b"0123456789abcdef0123456789abcdef");
        assert_eq!(config.admin_token.unwrap().expose_secret(), "admin-token-from-a-file");
        for (inline, file, path) in [
            ("TOKEN_PROXY_SECRET", "TOKEN_PROXY_SECRET_FILE", secret_path),
            ("TOKEN_PROXY_ADMIN_TOKEN", "TOKEN_PROXY_ADMIN_TOKEN_FILE", token_path),
        ] {
            let both = Config::from_lookup(lookup(&[UPSTREAM, (inline, "x".repeat(44).as_str()), (file, path)]));
            assert_eq!(both.unwrap_err().variable, file);
        }
        let missing = Config::from_lookup(lookup(&[UPSTREAM, ("TOKEN_PROXY_SECRET_FILE", "/nonexistent/secret")]));
        assert_eq!(missing.unwrap_err().variable, "TOKEN_PROXY_SECRET_FILE");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flags_override_and_map_to_variables() {
        let flags = parse_flags(["--listen=127.0.0.1:1".to_owned(), "--redis-timeout".to_owned(), "1s".to_owned()])
            .unwrap()
            .unwrap();
        assert_eq!(flags["TOKEN_PROXY_LISTEN"], "127.0.0.1:1");
        assert_eq!(flags["TOKEN_PROXY_REDIS_TIMEOUT"], "1s");
        assert!(parse_flags(["--help".to_owned()]).unwrap().is_none());
        assert_eq!(parse_flags(["--nope=1".to_owned()]).unwrap_err().variable, "--nope");
        assert_eq!(parse_flags(["--listen".to_owned()]).unwrap_err().variable, "--listen");
    }

    #[test]
    fn the_readme_documents_every_setting() {
        let readme = include_str!("../../README.md");
        for s in SETTINGS {
            assert!(readme.contains(&format!("| `{}` |", s.name)), "README lacks {}", s.name);
        }
    }

    #[test]
    fn help_lists_every_setting() {
        let text = help();
        for s in SETTINGS {
            assert!(text.contains(s.name) && text.contains(&format!("--{}", flag_name(s.name))));
        }
    }
}
