//! Inbound protections: what a request may be, how many are handled at once, deadlines,
//! connection caps, TLS, and which sources may call. They build the listeners' policies.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::{ConfigError, Setting, Source};
use crate::admission::Admission;
use crate::listener::{self, AcceptFailures, Inbound, TlsFile, TlsFiles};
use crate::normalize::RequestLimits;
use crate::source::SourcePolicy;

pub static MAX_BODY_BYTES: Setting =
    Setting { name: "TOKEN_PROXY_MAX_BODY_BYTES", default: Some("8192"), help: "largest request body (413 above)" };
pub static MAX_HEADER_BYTES: Setting = Setting {
    name: "TOKEN_PROXY_MAX_HEADER_BYTES",
    default: Some("8192"),
    help: "largest total size of request headers (431 above)",
};
pub static MAX_CONCURRENT_REQUESTS: Setting = Setting {
    name: "TOKEN_PROXY_MAX_CONCURRENT_REQUESTS",
    default: Some("1024"),
    help: "requests handled at once per replica; more are shed at once with 503",
};
pub static REQUEST_TIMEOUT: Setting = Setting {
    name: "TOKEN_PROXY_REQUEST_TIMEOUT",
    default: Some("30s"),
    help: "longest time one request may take, body included (408 past it)",
};
pub static HEADER_READ_TIMEOUT: Setting = Setting {
    name: "TOKEN_PROXY_HEADER_READ_TIMEOUT",
    default: Some("5s"),
    help: "time a client has to send a request's headers; idle keep-alive connections close after it too",
};
pub static BODY_TIMEOUT: Setting = Setting {
    name: "TOKEN_PROXY_BODY_TIMEOUT",
    default: Some("5s"),
    help: "time a client has to send a request's body once its headers are in (408 past it)",
};
pub static MAX_CONNECTIONS: Setting = Setting {
    name: "TOKEN_PROXY_MAX_CONNECTIONS",
    default: Some("4096"),
    help: "open connections on the client listener; more are closed at once",
};
pub static MAX_CONNECTIONS_PER_SOURCE: Setting = Setting {
    name: "TOKEN_PROXY_MAX_CONNECTIONS_PER_SOURCE",
    default: Some("1024"),
    help: "open client connections from one source address (IPv6: one /64), more are closed at once; behind a trusted proxy, unfinished requests per source, more get 429",
};
pub static ADMIN_MAX_CONNECTIONS: Setting = Setting {
    name: "TOKEN_PROXY_ADMIN_MAX_CONNECTIONS",
    default: Some("64"),
    help: "open connections on the admin listener; more are closed at once",
};
pub static TLS_CERT_FILE: Setting = Setting {
    name: "TOKEN_PROXY_TLS_CERT_FILE",
    default: None,
    help: "PEM certificate chain: serve TLS on the client listener (re-read when it changes)",
};
pub static TLS_KEY_FILE: Setting =
    Setting { name: "TOKEN_PROXY_TLS_KEY_FILE", default: None, help: "PEM private key of TOKEN_PROXY_TLS_CERT_FILE" };
pub static TLS_CLIENT_CA_FILE: Setting = Setting {
    name: "TOKEN_PROXY_TLS_CLIENT_CA_FILE",
    default: None,
    help: "PEM CA bundle: require client certificates signed by it (mTLS); needs TLS",
};
pub static ALLOWED_NETWORKS: Setting = Setting {
    name: "TOKEN_PROXY_ALLOWED_NETWORKS",
    default: None,
    help: "comma-separated networks (CIDR) allowed to call the client listener; unset = any",
};
pub static TRUSTED_PROXIES: Setting = Setting {
    name: "TOKEN_PROXY_TRUSTED_PROXIES",
    default: None,
    help: "comma-separated networks of load balancers whose X-Forwarded-For names the source address",
};
pub static ALLOW_QUERY_PARAMS: Setting = Setting {
    name: "TOKEN_PROXY_ALLOW_QUERY_PARAMS",
    default: Some("false"),
    help: "accept parameters in the query string like the API Gateway sample (discouraged: URLs get logged)",
};

impl TlsFile {
    pub fn setting(self) -> &'static Setting {
        match self {
            TlsFile::Cert => &TLS_CERT_FILE,
            TlsFile::Key => &TLS_KEY_FILE,
            TlsFile::ClientCa => &TLS_CLIENT_CA_FILE,
        }
    }
}

/// Inbound protections of both listeners.
#[derive(Debug, Clone)]
pub struct InboundSettings {
    /// Largest request body in bytes. Default 8 KiB.
    pub max_body_bytes: usize,
    /// Largest total size of request headers in bytes. Default 8 KiB.
    pub max_header_bytes: usize,
    /// Accept parameters in the query string. Default false.
    pub allow_query_params: bool,
    /// Requests handled at once; more are shed with 503. Default 1024.
    pub max_concurrent_requests: usize,
    /// Longest time one request may take. Default 30 s.
    pub request_timeout: Duration,
    /// Time a client has to send a request's headers. Default 5 s.
    pub header_read_timeout: Duration,
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

impl InboundSettings {
    pub(super) fn parse(source: &Source) -> Result<InboundSettings, ConfigError> {
        let settings = InboundSettings {
            max_body_bytes: source.parse(&MAX_BODY_BYTES, "a whole number")?,
            max_header_bytes: source.parse(&MAX_HEADER_BYTES, "a whole number")?,
            allow_query_params: source.parse(&ALLOW_QUERY_PARAMS, "true or false")?,
            max_concurrent_requests: source.parse(&MAX_CONCURRENT_REQUESTS, "a whole number")?,
            request_timeout: source.duration(&REQUEST_TIMEOUT)?,
            header_read_timeout: source.duration(&HEADER_READ_TIMEOUT)?,
            body_timeout: source.duration(&BODY_TIMEOUT)?,
            max_connections: source.parse(&MAX_CONNECTIONS, "a whole number")?,
            max_connections_per_source: source.parse(&MAX_CONNECTIONS_PER_SOURCE, "a whole number")?,
            admin_max_connections: source.parse(&ADMIN_MAX_CONNECTIONS, "a whole number")?,
            tls: parse_tls(source)?,
            allowed_networks: parse_networks(source, &ALLOWED_NETWORKS)?,
            trusted_proxies: parse_networks(source, &TRUSTED_PROXIES)?,
        };
        let at_least = |setting: &Setting, value: usize, least: usize| {
            if value < least { Err(source.error(setting, format!("must be at least {least}"))) } else { Ok(()) }
        };
        at_least(&MAX_BODY_BYTES, settings.max_body_bytes, 64)?;
        at_least(&MAX_HEADER_BYTES, settings.max_header_bytes, 256)?;
        at_least(&MAX_CONCURRENT_REQUESTS, settings.max_concurrent_requests, 1)?;
        at_least(&MAX_CONNECTIONS, settings.max_connections, 1)?;
        at_least(&MAX_CONNECTIONS_PER_SOURCE, settings.max_connections_per_source, 1)?;
        at_least(&ADMIN_MAX_CONNECTIONS, settings.admin_max_connections, 1)?;
        if settings.header_read_timeout.is_zero() {
            return Err(source.error(&HEADER_READ_TIMEOUT, "must be more than zero"));
        }
        if settings.body_timeout.is_zero() {
            return Err(source.error(&BODY_TIMEOUT, "must be more than zero"));
        }
        Ok(settings)
    }

    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            max_header_bytes: self.max_header_bytes,
            max_body_bytes: self.max_body_bytes,
            allow_query_params: self.allow_query_params,
        }
    }

    pub fn sources(&self) -> SourcePolicy {
        SourcePolicy { allowed: self.allowed_networks.clone(), trusted_proxies: self.trusted_proxies.clone() }
    }

    pub fn admission(&self) -> Admission {
        Admission::new(
            self.max_concurrent_requests,
            self.request_timeout,
            self.body_timeout,
            self.max_connections_per_source,
        )
    }

    /// The client listener's policy: reads the TLS files, if any (a file that cannot be used
    /// fails here, at start-up, naming its variable).
    pub fn client_inbound(
        &self,
        sources: Arc<SourcePolicy>,
        failures: Arc<AcceptFailures>,
    ) -> Result<Inbound, ConfigError> {
        Inbound::client(
            self.tls.as_ref(),
            self.header_read_timeout,
            self.max_connections,
            self.max_connections_per_source,
            sources,
            failures,
        )
        .map_err(|e| e.file.setting().error(e.message))
    }

    /// The admin listener's policy: the same header-read timeout, a connection cap of its own.
    pub fn admin_inbound(&self, failures: Arc<AcceptFailures>) -> Inbound {
        Inbound::admin(self.header_read_timeout, self.admin_max_connections, failures)
    }

    /// File descriptors these caps may use at once: both listeners' connections, one upstream
    /// connection per admitted request, and the replica's others. With the defaults,
    /// 4096 + 64 + 1024 + 64 = 5248.
    pub fn descriptors_needed(&self) -> usize {
        self.max_connections + self.admin_max_connections + self.max_concurrent_requests + listener::OTHER_DESCRIPTORS
    }

    /// Warns at start-up when the open-file limit is below [`Self::descriptors_needed`].
    pub fn warn_if_descriptors_short(&self) {
        listener::warn_if_descriptors_short(self.descriptors_needed(), MAX_CONNECTIONS.name);
    }
}

fn parse_tls(source: &Source) -> Result<Option<TlsFiles>, ConfigError> {
    let client_ca = source.get(&TLS_CLIENT_CA_FILE);
    match (source.get(&TLS_CERT_FILE), source.get(&TLS_KEY_FILE)) {
        (Some(cert), Some(key)) => {
            Ok(Some(TlsFiles { cert: cert.into(), key: key.into(), client_ca: client_ca.map(PathBuf::from) }))
        }
        (Some(_), None) => Err(source.error(&TLS_KEY_FILE, format!("is required with {}", TLS_CERT_FILE.name))),
        (None, Some(_)) => Err(source.error(&TLS_CERT_FILE, format!("is required with {}", TLS_KEY_FILE.name))),
        (None, None) if client_ca.is_some() => {
            Err(source
                .error(&TLS_CLIENT_CA_FILE, format!("needs TLS ({} and {})", TLS_CERT_FILE.name, TLS_KEY_FILE.name)))
        }
        (None, None) => Ok(None),
    }
}

/// Comma-separated networks in CIDR notation; a bare address is a network of one.
fn parse_networks(source: &Source, setting: &Setting) -> Result<Vec<IpNet>, ConfigError> {
    let Some(value) = source.get(setting) else { return Ok(Vec::new()) };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| source.error(setting, format!("expected networks like 10.0.0.0/8, got {item:?}")))
        })
        .collect()
}
