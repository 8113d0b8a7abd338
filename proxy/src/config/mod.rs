//! Configuration in sections, each of which builds what it configures: the listeners, the
//! upstream (→ its client), Redis (→ its store), the secrets (→ keys), the cache, the quotas,
//! the inbound protections (→ the listeners' policies), the admin API, logging.
//!
//! Every setting is a `TOKEN_PROXY_*` variable, the matching `--kebab-case` flag, and a key of
//! the optional TOML file (`TOKEN_PROXY_CONFIG`): the variable's name without the prefix, in
//! lower case. Flags win over the environment, which wins over the file, which wins over the
//! defaults. Each name is defined once, as a [`Setting`] in its section's module; lower layers
//! never name a variable, and get typed values from the section that builds them.
//!
//! Everything is parsed and validated before anything binds or connects. A bad value is one
//! [`ConfigError`] naming the variable (or the file and the key), so an operator sees exactly
//! which setting to fix. Values are read through a lookup function, so tests never touch the
//! process environment.

pub mod admin;
pub mod cache;
mod file;
pub mod inbound;
pub mod listeners;
pub mod log;
pub mod quota;
pub mod redis;
pub mod secrets;
pub mod upstream;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use secrecy::ExposeSecret;

/// Types of the parts, named where the settings are.
pub use crate::listener::{TlsFile, TlsFiles};
pub use crate::quota::AuthFailureLimits;
pub use crate::telemetry::LogFormat;
pub use admin::AdminSettings;
pub use cache::CacheSettings;
use file::ConfigFile;
pub use inbound::InboundSettings;
pub use listeners::ListenerSettings;
pub use log::LogSettings;
pub use quota::QuotaSettings;
pub use redis::RedisSettings;
pub use secrets::SecretSettings;
pub use upstream::UpstreamSettings;

use crate::listener::AcceptFailures;
use crate::metrics::Metrics;

/// One setting: its variable name, default and help text. The flag and the file's key are
/// derived from the name.
#[derive(Debug)]
pub struct Setting {
    pub name: &'static str,
    pub default: Option<&'static str>,
    pub help: &'static str,
}

impl Setting {
    /// `TOKEN_PROXY_ADMIN_LISTEN` → `admin-listen`.
    pub fn flag(&self) -> String {
        self.file_key().replace('_', "-")
    }

    /// `TOKEN_PROXY_ADMIN_LISTEN` → `admin_listen`.
    pub fn file_key(&self) -> String {
        self.name.trim_start_matches("TOKEN_PROXY_").to_ascii_lowercase()
    }

    /// An error naming this variable (for values that did not come from the file).
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError { variable: self.name.to_owned(), message: message.into() }
    }
}

/// The configuration file; a variable or flag only (a file cannot name a file).
pub static CONFIG: Setting = Setting {
    name: "TOKEN_PROXY_CONFIG",
    default: None,
    help: "TOML file of settings, each named as its variable without TOKEN_PROXY_ in lower case; variables and flags override it",
};

/// The file's text itself, for platforms that hand a container only environment variables
/// (ECS: the CDK construct's named upstreams travel this way).
pub static CONFIG_TOML: Setting = Setting {
    name: "TOKEN_PROXY_CONFIG_TOML",
    default: None,
    help: "the text of a TOKEN_PROXY_CONFIG file, given in place of the file (not with it)",
};

/// Where the file's settings come from: a path, or the text itself. Neither is a key of the file.
static FILE_SETTINGS: [&Setting; 2] = [&CONFIG, &CONFIG_TOML];

/// Every setting the file, the environment and the flags may hold, by section. The README's
/// configuration table lists the same names (a test keeps them in step).
pub static SETTINGS: &[&Setting] = &[
    &listeners::LISTEN,
    &listeners::ADMIN_LISTEN,
    &upstream::UPSTREAM_URL,
    &redis::REDIS_URL,
    &secrets::SECRET,
    &secrets::SECRET_FILE,
    &admin::ADMIN_TOKEN,
    &admin::ADMIN_TOKEN_FILE,
    &log::LOG,
    &log::LOG_FORMAT,
    &log::ACCESS_LOG,
    &upstream::UPSTREAM_CONNECT_TIMEOUT,
    &upstream::UPSTREAM_TIMEOUT,
    &upstream::UPSTREAM_HEADERS_FILE,
    &upstream::UPSTREAM_HEADERS,
    &redis::REDIS_TIMEOUT,
    &redis::REDIS_BREAKER_THRESHOLD,
    &redis::REDIS_BREAKER_COOLDOWN,
    &redis::REDIS_CA_FILE,
    &redis::REDIS_CLIENT_CERT_FILE,
    &redis::REDIS_CLIENT_KEY_FILE,
    &redis::REDIS_PASSWORD_FILE,
    &redis::REDIS_IAM,
    &redis::REDIS_IAM_USER,
    &redis::REDIS_IAM_CACHE,
    &redis::REDIS_IAM_REGION,
    &cache::LOCK_TTL,
    &cache::EXPIRY_MARGIN,
    &cache::MIN_TOKEN_TTL,
    &cache::REFRESH_AT,
    &cache::MAX_TOKEN_LIFETIME,
    &cache::L1_CAPACITY,
    &cache::L1_MAX_AGE,
    &inbound::MAX_BODY_BYTES,
    &inbound::MAX_HEADER_BYTES,
    &secrets::PREVIOUS_SECRETS,
    &secrets::PREVIOUS_SECRETS_FILE,
    &quota::AUTH_FAILURE_LIMIT,
    &quota::AUTH_FAILURE_CLIENT_LIMIT,
    &quota::AUTH_FAILURE_WINDOW,
    &quota::UPSTREAM_RATE_LIMIT,
    &quota::UPSTREAM_QUEUE_TIMEOUT,
    &quota::CLIENT_CALL_BUDGET,
    &quota::CLIENT_CALL_BUDGET_WINDOW,
    &inbound::MAX_CONCURRENT_REQUESTS,
    &inbound::REQUEST_TIMEOUT,
    &inbound::HEADER_READ_TIMEOUT,
    &listeners::DRAIN_DELAY,
    &inbound::BODY_TIMEOUT,
    &inbound::MAX_CONNECTIONS,
    &inbound::MAX_CONNECTIONS_PER_SOURCE,
    &inbound::ADMIN_MAX_CONNECTIONS,
    &inbound::TLS_CERT_FILE,
    &inbound::TLS_KEY_FILE,
    &inbound::TLS_CLIENT_CA_FILE,
    &inbound::ALLOWED_NETWORKS,
    &inbound::TRUSTED_PROXIES,
    &inbound::ALLOW_QUERY_PARAMS,
];

/// Validated configuration of one replica, in sections.
#[derive(Debug)]
pub struct Config {
    pub listeners: ListenerSettings,
    /// The token endpoints: one without a name (`TOKEN_PROXY_UPSTREAM_URL`), or the file's
    /// `[upstreams.NAME]` tables in name order.
    pub endpoints: Vec<Endpoint>,
    /// The named upstream `/oauth2/token` reaches (the file's `default_upstream`).
    pub default_upstream: Option<String>,
    /// `None` runs one replica alone on its in-process cache.
    pub redis: Option<RedisSettings>,
    pub secrets: SecretSettings,
    pub cache: CacheSettings,
    pub quota: QuotaSettings,
    pub inbound: InboundSettings,
    pub admin: AdminSettings,
    pub log: LogSettings,
    /// Where each value the file gave came from, to name it in errors found while building.
    origins: Origins,
}

/// One token endpoint: its upstream client, and the settings of the cache and of the quota
/// as they apply to it (its table's values over the global ones).
#[derive(Debug)]
pub struct Endpoint {
    /// `None`: the one upstream of a deployment without names.
    pub name: Option<String>,
    /// The `Host` names whose `/oauth2/token` reaches this upstream (its table's `hosts`).
    pub hosts: Vec<String>,
    pub upstream: UpstreamSettings,
    pub cache: CacheSettings,
    pub quota: QuotaSettings,
    /// Where its table's values came from, to name them in errors found while building.
    pub origins: Origins,
}

/// The settings whose values came from the file, each with its `PATH: key`.
#[derive(Debug, Clone, Default)]
pub struct Origins(HashMap<&'static str, String>);

impl Origins {
    /// The same error, naming the file and the key when the file gave the value at fault.
    pub fn locate(&self, error: ConfigError) -> ConfigError {
        match self.0.get(error.variable.as_str()) {
            Some(origin) => ConfigError { variable: origin.clone(), ..error },
            None => error,
        }
    }
}

/// A setting with a bad value: `Display` is one line naming the variable, or the file and the
/// key when the value came from the file. It never quotes a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}: {message}")]
pub struct ConfigError {
    /// `TOKEN_PROXY_LISTEN`, `--listen`, or `/etc/token-proxy.toml: listen`.
    pub variable: String,
    pub message: String,
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Command {
    Run(Box<Config>),
    /// `--check`: validate everything, bind and connect nothing.
    Check(Box<Config>),
    Help,
    Version,
    /// `--health`: ask the admin listener at this address for `/healthz`.
    Health(Vec<std::net::SocketAddr>),
}

/// Raw values, highest first: `lookup` (flags, then the environment), the file, the default.
/// An empty value counts as unset.
pub(crate) struct Source<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    file: Option<&'a ConfigFile>,
    /// One `[upstreams.NAME]` table, above everything else: an upstream's own value beats the
    /// global one, wherever that came from.
    table: Option<&'a ConfigFile>,
}

impl Source<'_> {
    fn overridden(&self, setting: &Setting) -> Option<String> {
        (self.lookup)(setting.name).filter(|v| !v.is_empty())
    }

    fn get(&self, setting: &Setting) -> Option<String> {
        // An upstream's table may unset a global value (e.g. `headers_file = ""`: this IdP gets
        // none of the global extra headers).
        if let Some(value) = self.table.and_then(|table| table.value(setting)) {
            return (!value.is_empty()).then(|| value.to_owned());
        }
        self.overridden(setting)
            .or_else(|| self.file.and_then(|file| file.value(setting)).map(str::to_owned))
            .or_else(|| setting.default.map(str::to_owned))
    }

    fn required(&self, setting: &Setting) -> Result<String, ConfigError> {
        self.get(setting).ok_or_else(|| self.error(setting, "is required"))
    }

    /// Parses a setting that is not a secret: the message quotes the bad value.
    fn parse<T: std::str::FromStr>(&self, setting: &Setting, expected: &str) -> Result<T, ConfigError> {
        let value = self.required(setting)?;
        value.trim().parse().map_err(|_| self.error(setting, format!("expected {expected}, got {value:?}")))
    }

    fn duration(&self, setting: &Setting) -> Result<Duration, ConfigError> {
        let value = self.required(setting)?;
        humantime::parse_duration(value.trim())
            .map_err(|_| self.error(setting, format!("expected a duration such as 30s or 250ms, got {value:?}")))
    }

    /// An error naming where the setting's value came from: the file's key when the file gave
    /// it, else the variable.
    fn error(&self, setting: &Setting, message: impl Into<String>) -> ConfigError {
        if let Some(table) = self.table.filter(|table| table.value(setting).is_some()) {
            return ConfigError { variable: table.origin(setting), message: message.into() };
        }
        match self.file {
            Some(file) if self.overridden(setting).is_none() && file.value(setting).is_some() => {
                ConfigError { variable: file.origin(setting), message: message.into() }
            }
            _ => setting.error(message),
        }
    }
}

impl Config {
    /// Reads the command-line flags, the process environment and the file they name.
    pub fn from_env_and_args(args: impl IntoIterator<Item = String>) -> Result<Command, ConfigError> {
        let cli = parse_args(args)?;
        refuse_secret_flags(&cli.flags)?;
        match cli.action {
            Action::Help => Ok(Command::Help),
            Action::Version => Ok(Command::Version),
            Action::Health => {
                let lookup = |name: &str| cli.flags.get(name).cloned().or_else(|| std::env::var(name).ok());
                Ok(Command::Health(health_addresses(&lookup)?))
            }
            Action::Run | Action::Check => {
                let config = Box::new(Config::from_lookup(|name| {
                    cli.flags.get(name).cloned().or_else(|| std::env::var(name).ok())
                })?);
                Ok(if cli.action == Action::Check { Command::Check(config) } else { Command::Run(config) })
            }
        }
    }

    /// Parses every setting: `lookup` returns a variable's raw value (flags and environment);
    /// the file named by `TOKEN_PROXY_CONFIG` (or given as `TOKEN_PROXY_CONFIG_TOML`), if any,
    /// fills in what it does not set.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let file = config_file(&lookup)?;
        Config::from_source(&Source { lookup: &lookup, file: file.as_ref(), table: None })
    }

    fn from_source(source: &Source) -> Result<Config, ConfigError> {
        let tables = source.file.map(ConfigFile::upstreams).unwrap_or_default();
        if !tables.is_empty() && source.overridden(&upstream::UPSTREAM_URL).is_some() {
            return Err(upstream::UPSTREAM_URL.error(
                "cannot be combined with the file's [upstreams.NAME] tables (give each upstream its url there)",
            ));
        }
        if !tables.is_empty() && source.file.is_some_and(|file| file.value(&upstream::UPSTREAM_URL).is_some()) {
            let file = source.file.expect("checked");
            return Err(ConfigError {
                variable: file.origin(&upstream::UPSTREAM_URL),
                message: "cannot be combined with [upstreams.NAME] tables (give each upstream its url there)".into(),
            });
        }
        let redis = RedisSettings::parse(source)?;
        let secrets = SecretSettings::parse(source)?;
        if redis.is_some() && secrets.current.is_none() {
            return Err(source.error(
                &secrets::SECRET,
                format!("is required when {} is set (every replica must share it)", redis::REDIS_URL.name),
            ));
        }
        let admin = AdminSettings::parse(source)?;
        let log = LogSettings::parse(source)?;
        let listeners = ListenerSettings::parse(source)?;
        let cache = CacheSettings::parse(source)?;
        if cache.l1_capacity == 0 && redis.is_none() {
            return Err(
                source.error(&cache::L1_CAPACITY, format!("must be more than zero without {}", redis::REDIS_URL.name))
            );
        }
        let quota = QuotaSettings::parse(source)?;
        let inbound = InboundSettings::parse(source)?;
        let endpoints = if tables.is_empty() {
            let upstream = UpstreamSettings::parse(source)?;
            vec![Endpoint {
                name: None,
                hosts: Vec::new(),
                upstream,
                cache: cache.clone(),
                quota: quota.clone(),
                origins: Origins::default(),
            }]
        } else {
            let mut endpoints = Vec::with_capacity(tables.len());
            for (name, table) in tables {
                let source = Source { table: Some(table), ..*source };
                endpoints.push(Endpoint {
                    name: Some(name.clone()),
                    hosts: table.hosts().to_vec(),
                    upstream: UpstreamSettings::parse(&source)?,
                    cache: CacheSettings::parse(&source)?,
                    quota: QuotaSettings::parse(&source)?,
                    origins: Origins(
                        SETTINGS
                            .iter()
                            .filter(|s| table.value(s).is_some())
                            .map(|s| (s.name, table.origin(s)))
                            .collect(),
                    ),
                });
            }
            endpoints
        };
        for endpoint in &endpoints {
            if inbound.request_timeout <= endpoint.upstream.timeout {
                let limit = match &endpoint.name {
                    None => upstream::UPSTREAM_TIMEOUT.name.to_owned(),
                    Some(name) => format!("{} and the timeout of upstream {name}", upstream::UPSTREAM_TIMEOUT.name),
                };
                return Err(source.error(
                    &inbound::REQUEST_TIMEOUT,
                    format!("must be longer than {limit} (a request may wait for one upstream call)"),
                ));
            }
        }
        let default_upstream = source.file.and_then(ConfigFile::default_upstream).map(str::to_owned);
        let origins = Origins(
            SETTINGS
                .iter()
                .filter(|s| source.overridden(s).is_none())
                .filter_map(|s| source.file.filter(|file| file.value(s).is_some()).map(|file| (s.name, file.origin(s))))
                .collect(),
        );
        Ok(Config {
            listeners,
            endpoints,
            default_upstream,
            redis,
            secrets,
            cache,
            quota,
            inbound,
            admin,
            log,
            origins,
        })
    }

    /// A configuration for tests and embedding: loopback on port 0, no Redis, defaults otherwise.
    pub fn for_upstream(upstream_url: &str) -> Result<Config, ConfigError> {
        let upstream_url = upstream_url.to_owned();
        Config::from_lookup(move |name| {
            if name == upstream::UPSTREAM_URL.name {
                Some(upstream_url.clone())
            } else if name == listeners::LISTEN.name || name == listeners::ADMIN_LISTEN.name {
                Some("127.0.0.1:0".to_owned())
            } else {
                None
            }
        })
    }

    /// Builds, without binding or connecting, every part that reads a file or could still
    /// refuse the configuration: the keys, the upstream client (its headers file), the client
    /// listener's TLS. Parsing has checked the rest. Needs a Tokio runtime (file watchers).
    pub fn check(&self) -> Result<(), ConfigError> {
        let build = || {
            self.secrets.keys()?;
            for endpoint in &self.endpoints {
                endpoint.upstream.client(Arc::new(Metrics::new())).map_err(|e| endpoint.origins.locate(e))?;
            }
            self.inbound.client_inbound(Arc::new(self.inbound.sources()), Arc::new(AcceptFailures::default()))?;
            Ok(())
        };
        build().map_err(|e| self.origins.locate(e))
    }

    /// Where the file's values came from, to name them in errors found while building.
    pub fn origins(&self) -> Origins {
        self.origins.clone()
    }

    /// The root secret's bytes, if one was configured.
    pub fn secret_bytes(&self) -> Option<&[u8]> {
        self.secrets.current.as_ref().map(|s| s.expose_secret().as_slice())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Run,
    Check,
    Help,
    Version,
    Health,
}

/// The settings whose value is a secret, or may hold one: a flag would show it to anyone who
/// can list processes (`ps`, `/proc/PID/cmdline`), so they come from the environment, the
/// file, or a `_FILE` of their own.
const SECRET_FLAGS: [&Setting; 5] =
    [&secrets::SECRET, &secrets::PREVIOUS_SECRETS, &admin::ADMIN_TOKEN, &upstream::UPSTREAM_HEADERS, &redis::REDIS_URL];

/// Refuses a secret given as a flag, naming the flag and where to put it instead; a Redis URL
/// only when it carries a password.
fn refuse_secret_flags(flags: &HashMap<&'static str, String>) -> Result<(), ConfigError> {
    for setting in SECRET_FLAGS {
        let Some(value) = flags.get(setting.name) else { continue };
        // A URL that does not parse may still hold one: refused too. So is a password in the
        // query (`sentinelPassword=` for the sentinels, or any other spelling).
        let has_password = |url: &str| {
            reqwest::Url::parse(url).map_or(true, |url| {
                url.password().is_some()
                    || url.query_pairs().any(|(name, _)| name.to_ascii_lowercase().contains("password"))
            })
        };
        if std::ptr::eq(setting, &redis::REDIS_URL) && !has_password(value) {
            continue;
        }
        let instead = match SETTINGS.iter().find(|s| s.name == format!("{}_FILE", setting.name)) {
            Some(file) => format!("{} (a file) or the variable {}", file.name, setting.name),
            None if std::ptr::eq(setting, &redis::REDIS_URL) => {
                format!("{} for the password, or the variable {}", redis::REDIS_PASSWORD_FILE.name, setting.name)
            }
            None => format!("the variable {}", setting.name),
        };
        return Err(ConfigError {
            variable: format!("--{}", setting.flag()),
            message: format!(
                "a secret on the command line is visible to every user of the machine (ps); use {instead}"
            ),
        });
    }
    Ok(())
}

/// The configuration file, named by `TOKEN_PROXY_CONFIG` or given whole as
/// `TOKEN_PROXY_CONFIG_TOML` (not both), if any: one choice for running and for `--health`.
fn config_file(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<ConfigFile>, ConfigError> {
    let given = |setting: &Setting| lookup(setting.name).filter(|value| !value.is_empty());
    Ok(match (given(&CONFIG), given(&CONFIG_TOML)) {
        (Some(_), Some(_)) => {
            return Err(CONFIG_TOML.error("cannot be combined with TOKEN_PROXY_CONFIG (give the file or its text)"));
        }
        (Some(path), None) => Some(ConfigFile::read(&path, &CONFIG)?),
        (None, Some(text)) => Some(ConfigFile::parse(CONFIG_TOML.name, &text)?),
        (None, None) => None,
    })
}

/// Where `--health` finds the admin listener, in the order to ask: `TOKEN_PROXY_ADMIN_LISTEN`
/// (flag, variable or the file). An unspecified address is asked on loopback: `0.0.0.0` on
/// 127.0.0.1, `::` on ::1 then 127.0.0.1 (a dual-stack socket answers both, a host without
/// IPv6 only the second).
fn health_addresses(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Vec<std::net::SocketAddr>, ConfigError> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let file = config_file(lookup)?;
    let source = Source { lookup, file: file.as_ref(), table: None };
    let address: SocketAddr = source.parse(&listeners::ADMIN_LISTEN, "a socket address like 127.0.0.1:9090")?;
    let at = |ip: IpAddr| SocketAddr::new(ip, address.port());
    Ok(match address.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => vec![at(Ipv4Addr::LOCALHOST.into())],
        IpAddr::V6(ip) if ip.is_unspecified() => vec![at(Ipv6Addr::LOCALHOST.into()), at(Ipv4Addr::LOCALHOST.into())],
        _ => vec![address],
    })
}

/// The command line: settings by variable name, and what to do.
#[derive(Debug)]
struct Cli {
    flags: HashMap<&'static str, String>,
    action: Action,
}

/// Maps `--kebab-case value` and `--kebab-case=value` to variable names; `--help`, `--version`
/// and `--check` take no value.
fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Cli, ConfigError> {
    let mut cli = Cli { flags: HashMap::new(), action: Action::Run };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--help" | "-h" => return Ok(Cli { action: Action::Help, ..cli }),
            "--version" | "-V" => return Ok(Cli { action: Action::Version, ..cli }),
            "--health" => {
                cli.action = Action::Health;
                continue;
            }
            "--check" => {
                cli.action = Action::Check;
                continue;
            }
            _ => {}
        }
        let unexpected = || ConfigError {
            variable: arg.clone(),
            message: "unexpected argument (settings are --flags or TOKEN_PROXY_* variables)".to_owned(),
        };
        let Some(flag) = arg.strip_prefix("--") else { return Err(unexpected()) };
        let (flag, inline_value) = match flag.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (flag, None),
        };
        let flag_error = |message: &str| ConfigError { variable: format!("--{flag}"), message: message.to_owned() };
        let setting = FILE_SETTINGS
            .iter()
            .chain(SETTINGS)
            .copied()
            .find(|s| s.flag() == flag)
            .ok_or_else(|| flag_error("unknown flag (see --help)"))?;
        if std::ptr::eq(setting, &CONFIG_TOML) {
            // The whole file, secrets included, would be readable by anyone in `ps`.
            return Err(flag_error("not a flag: give TOKEN_PROXY_CONFIG_TOML in the environment, or --config FILE"));
        }
        let value = match inline_value {
            Some(v) => v,
            None => args.next().ok_or_else(|| flag_error("needs a value"))?,
        };
        // Refused rather than "the last wins": the earlier value would go unchecked and unseen.
        if cli.flags.insert(setting.name, value).is_some() {
            return Err(flag_error("given twice; give it once"));
        }
    }
    Ok(cli)
}

/// The `--version` text: the version `token_proxy_build_info` labels, and the commit.
pub fn version() -> String {
    format!("token-proxy {} (commit {})\n", crate::metrics::VERSION, crate::metrics::COMMIT)
}

/// The `--help` text.
pub fn help() -> String {
    let mut out = String::from(
        "token-proxy: a caching proxy for OAuth2 client-credentials token endpoints\n\n\
         Usage: token-proxy [--check | --health] [--config FILE] [--SETTING VALUE]...\n\n\
         Every setting is an environment variable, the matching flag, or a key of the TOML file\n\
         (the variable's name without TOKEN_PROXY_ in lower case, e.g. upstream_url = \"...\").\n\
         Flags win over variables, which win over the file.\n\n\
         \x20 --check                        validate the configuration (files too), bind nothing; exit 0 or 2\n\
         \x20 --version                      print the version and the commit\n\
         \x20 --health                       ask this replica's admin listener for /healthz; exit 0 or 1 (bad configuration too)\n\n\
         Secrets (secret, previous-secrets, admin-token, upstream-headers, a redis-url with a\n\
         password) are refused as flags, which any user can read with ps: use the variables or\n\
         the *_FILE settings.\n\n",
    );
    for s in FILE_SETTINGS.iter().chain(SETTINGS).copied() {
        let flag =
            if std::ptr::eq(s, &CONFIG_TOML) { "(environment only)".to_owned() } else { format!("--{}", s.flag()) };
        out.push_str(&format!("  {flag:<30} {}\n", s.name));
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
        assert_eq!(config.listeners.client, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(config.listeners.admin, "127.0.0.1:9090".parse().unwrap());
        assert!(config.redis.is_none());
        assert!(config.secrets.current.is_none());
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.listeners.drain_delay, Duration::from_secs(5));
        assert_eq!(config.cache.max_token_lifetime, Duration::from_secs(86_400));
        assert!(!config.inbound.allow_query_params);
        let with_redis = Config::from_lookup(lookup(&[
            UPSTREAM,
            ("TOKEN_PROXY_REDIS_URL", "redis://127.0.0.1:6379"),
            ("TOKEN_PROXY_SECRET", SECRET),
        ]))
        .unwrap();
        assert_eq!(with_redis.redis.unwrap().timeout, Duration::from_millis(250));
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
        assert_eq!(config.secrets.previous.len(), 2);
        assert_eq!(config.secrets.previous[0].expose_secret().as_slice(), b"abcdefghijklmnopqrstuvwxyz123456");
        let networks: Vec<String> = config.inbound.allowed_networks.iter().map(ToString::to_string).collect();
        assert_eq!(networks, ["10.0.0.0/8", "192.168.0.7/32", "::1/128"]);
        assert!(config.inbound.trusted_proxies.is_empty());
        let tls = config.inbound.tls.unwrap();
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
        assert_eq!(config.admin.token.unwrap().expose_secret(), "admin-token-from-a-file");
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
        let flags = parse_args(["--listen=127.0.0.1:1".to_owned(), "--redis-timeout".to_owned(), "1s".to_owned()])
            .unwrap()
            .flags;
        assert_eq!(flags["TOKEN_PROXY_LISTEN"], "127.0.0.1:1");
        assert_eq!(flags["TOKEN_PROXY_REDIS_TIMEOUT"], "1s");
        assert_eq!(parse_args(["--help".to_owned()]).unwrap().action, Action::Help);
        assert_eq!(parse_args(["--nope=1".to_owned()]).unwrap_err().variable, "--nope");
        assert_eq!(parse_args(["--listen".to_owned()]).unwrap_err().variable, "--listen");
    }

    /// A file in a directory of its own, removed when dropped.
    struct TomlFile(std::path::PathBuf);

    impl TomlFile {
        fn new(name: &str, text: &str) -> TomlFile {
            let dir = std::env::temp_dir().join(format!("tp-config-file-{}-{name}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("token-proxy.toml");
            std::fs::write(&path, text).unwrap();
            TomlFile(path)
        }

        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }

    impl Drop for TomlFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }

    #[test]
    fn the_file_holds_every_setting_and_the_environment_overrides_it() {
        let file = TomlFile::new(
            "override",
            &format!(
                r#"
                upstream_url = "http://127.0.0.1:9000/oauth2/token"
                listen = "127.0.0.1:8081"
                admin_listen = "127.0.0.1:9091"
                redis_url = "redis://:file-password@127.0.0.1:6380"
                secret = "{SECRET}"
                refresh_at = 0.5
                l1_capacity = 7
                allow_query_params = true
                drain_delay = 0
                allowed_networks = ["10.0.0.0/8", "192.168.0.1"]
                "#
            ),
        );
        let config = Config::from_lookup(lookup(&[
            ("TOKEN_PROXY_CONFIG", file.path()),
            ("TOKEN_PROXY_LISTEN", "127.0.0.1:1"),
            // Empty counts as unset: the file's value stands.
            ("TOKEN_PROXY_ADMIN_LISTEN", ""),
        ]))
        .unwrap();
        assert_eq!(config.listeners.client, "127.0.0.1:1".parse().unwrap(), "the environment wins");
        assert_eq!(config.listeners.admin, "127.0.0.1:9091".parse().unwrap());
        assert_eq!(config.endpoints[0].upstream.url.as_str(), "http://127.0.0.1:9000/oauth2/token");
        assert_eq!(
            config.redis.as_ref().unwrap().endpoint.url().expose_secret(),
            "redis://:file-password@127.0.0.1:6380"
        );
        assert_eq!(config.secret_bytes().unwrap(), b"0123456789abcdef0123456789abcdef");
        assert_eq!((config.cache.refresh_at, config.cache.l1_capacity), (0.5, 7));
        assert!(config.inbound.allow_query_params);
        assert_eq!(config.listeners.drain_delay, Duration::ZERO);
        assert_eq!(config.inbound.allowed_networks.len(), 2);
        assert_eq!(config.endpoints[0].upstream.timeout, Duration::from_secs(10), "defaults fill in the rest");
    }

    #[test]
    fn every_setting_has_a_file_key_and_a_flag_from_its_name() {
        for s in SETTINGS {
            assert_eq!(s.file_key().replace('_', "-"), s.flag());
            assert_eq!(format!("TOKEN_PROXY_{}", s.file_key().to_ascii_uppercase()), s.name);
        }
        assert_eq!(
            parse_args(["--config".to_owned(), "/etc/tp.toml".to_owned()]).unwrap().flags["TOKEN_PROXY_CONFIG"],
            "/etc/tp.toml"
        );
        assert_eq!(parse_args(["--check".to_owned()]).unwrap().action, Action::Check);
        assert_eq!(parse_args(["--version".to_owned()]).unwrap().action, Action::Version);
    }

    #[test]
    fn a_bad_key_or_value_in_the_file_is_one_line_naming_the_file_and_the_key() {
        let cases = [
            ("listen = \"nowhere\"", "listen"),
            ("bogus = 1", "bogus"),
            ("l1_capacity = -1", "l1_capacity"),
            ("redis_timeout = true", "redis_timeout"),
            ("allowed_networks = [1, 2]", "allowed_networks"),
            ("max_token_lifetime = \"30s\"", "max_token_lifetime"),
            ("upstreams = \"cognito\"", "upstreams"),
            ("default_upstream = \"cognito\"", "default_upstream"),
            ("listen = { address = \"x\" }", "listen"),
        ];
        for (text, key) in cases {
            let file = TomlFile::new(key, text);
            let err = Config::from_lookup(lookup(&[UPSTREAM, ("TOKEN_PROXY_CONFIG", file.path())])).unwrap_err();
            assert_eq!(err.variable, format!("{}: {key}", file.path()), "{text}: {err}");
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        let missing = Config::from_lookup(lookup(&[UPSTREAM, ("TOKEN_PROXY_CONFIG", "/nonexistent/tp.toml")]));
        assert_eq!(missing.unwrap_err().variable, "TOKEN_PROXY_CONFIG");
        let not_toml = ConfigFile::parse("f.toml", "listen = \n").unwrap_err();
        assert_eq!(not_toml.variable, "f.toml");
        assert!(not_toml.message.contains("line 1"), "{not_toml}");
        let third_line = ConfigFile::parse("f.toml", "listen = \"x\"\n\n= 1\n").unwrap_err();
        assert!(third_line.message.contains("line 3"), "{third_line}");
    }

    #[test]
    fn secrets_in_the_file_are_never_echoed() {
        let cases = [
            ("secret = \"c2VjcmV0LXNob3J0\"", "c2VjcmV0LXNob3J0"),
            ("secret = \"not base64 hunter2\"", "hunter2"),
            ("admin_token = \"short-hunter2\"", "hunter2"),
            ("redis_url = \"tcp://:hunter2@x\"", "hunter2"),
            ("redis_url = \"redis://:hunter2@[::1\"", "hunter2"),
            ("previous_secrets = [\"aHVudGVyMg==\"]", "aHVudGVyMg"),
            // Not TOML at all: the parser's own message would quote the line.
            ("secret = \"hunter2", "hunter2"),
            ("secret = hunter2", "hunter2"),
        ];
        for (text, canary) in cases {
            let err = ConfigFile::parse("f.toml", text)
                .and_then(|file| {
                    let source = Source {
                        lookup: &|name: &str| (name == UPSTREAM.0).then(|| UPSTREAM.1.to_owned()),
                        file: Some(&file),
                        table: None,
                    };
                    Config::from_source(&source)
                })
                .unwrap_err();
            assert!(err.variable.starts_with("f.toml"), "{text}: {err}");
            assert!(!err.to_string().contains(canary), "{text}: {err}");
            assert!(!format!("{err:?}").contains(canary), "{text}: {err:?}");
        }
        let file = ConfigFile::parse("f.toml", "admin_token = \"a-long-enough-hunter2\"").unwrap();
        assert!(!format!("{file:?}").contains("hunter2"));
    }

    /// The configuration a file gives, with `vars` over it.
    fn from_file(text: &str, vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let file = ConfigFile::parse("f.toml", text)?;
        let lookup = lookup(vars);
        Config::from_source(&Source { lookup: &lookup, file: Some(&file), table: None })
    }

    const TWO_UPSTREAMS: &str = r#"
upstream_timeout = "8s"
default_upstream = "orders-prod"

[upstreams.orders-prod]
url = "https://orders.auth.eu-west-1.amazoncognito.com/oauth2/token"
expiry_margin = "2m"

[upstreams.partners]
url = "https://login.example.com/oauth2/v2.0/token"
timeout = "3s"
rate_limit = 20
"#;

    #[test]
    fn the_files_text_in_a_variable_is_the_file() {
        let file = TomlFile::new("text", TWO_UPSTREAMS);
        let path = file.path();
        let via_file = Config::from_lookup(lookup(&[("TOKEN_PROXY_CONFIG", path)])).unwrap();
        let via_text = Config::from_lookup(lookup(&[("TOKEN_PROXY_CONFIG_TOML", TWO_UPSTREAMS)])).unwrap();
        let routes =
            |c: &Config| c.endpoints.iter().map(|e| (e.name.clone(), e.upstream.url.clone())).collect::<Vec<_>>();
        assert_eq!(routes(&via_text), routes(&via_file));
        assert_eq!((via_text.default_upstream.as_deref(), routes(&via_text).len()), (Some("orders-prod"), 2));

        let flag = parse_args(["--config-toml".to_owned(), TWO_UPSTREAMS.to_owned()]).unwrap_err();
        assert_eq!(flag.variable, "--config-toml");
        assert!(!flag.to_string().contains("orders"), "the value is never echoed: {flag}");
        assert!(help().contains("(environment only)             TOKEN_PROXY_CONFIG_TOML"), "{}", help());

        let both = [("TOKEN_PROXY_CONFIG", path), ("TOKEN_PROXY_CONFIG_TOML", TWO_UPSTREAMS)];
        let error = Config::from_lookup(lookup(&both)).unwrap_err();
        assert_eq!(error.variable, "TOKEN_PROXY_CONFIG_TOML", "{error}");
        let error = Config::from_lookup(lookup(&[("TOKEN_PROXY_CONFIG_TOML", "[upstreams.a]\ntimeout = \"1s\"\n")]))
            .unwrap_err();
        assert_eq!(error.variable, "TOKEN_PROXY_CONFIG_TOML: upstreams.a.url", "{error}");
    }

    #[test]
    fn upstream_tables_override_the_global_settings_for_their_upstream_only() {
        let config = from_file(TWO_UPSTREAMS, &[("TOKEN_PROXY_EXPIRY_MARGIN", "30s")]).unwrap();
        assert_eq!(config.default_upstream.as_deref(), Some("orders-prod"));
        let [orders, partners] = &config.endpoints[..] else { panic!("two endpoints") };
        assert_eq!(orders.name.as_deref(), Some("orders-prod"));
        assert_eq!(orders.upstream.url.host_str(), Some("orders.auth.eu-west-1.amazoncognito.com"));
        // The table beats the environment, which beats the global file value.
        assert_eq!(orders.cache.expiry_margin, Duration::from_secs(120));
        assert_eq!(partners.cache.expiry_margin, Duration::from_secs(30));
        assert_eq!(
            (orders.upstream.timeout, partners.upstream.timeout),
            (Duration::from_secs(8), Duration::from_secs(3))
        );
        assert_eq!(partners.quota.upstream_rate_limit, 20);
        assert_eq!(orders.quota.upstream_rate_limit, config.quota.upstream_rate_limit);
    }

    #[test]
    fn the_headers_come_inline_or_from_a_file_never_both_and_errors_never_quote_them() {
        let inline = ("TOKEN_PROXY_UPSTREAM_HEADERS", "X-Origin-Verify: hunter2-canary\nX-Team: a");
        let config = Config::from_lookup(lookup(&[UPSTREAM, inline])).unwrap();
        let headers = config.endpoints[0].upstream.headers.clone().expect("inline headers");
        assert_eq!(headers["x-origin-verify"], "hunter2-canary");
        assert!(headers["x-origin-verify"].is_sensitive());
        assert!(!format!("{config:?}").contains("hunter2-canary"), "Debug never shows a header value");
        let both = Config::from_lookup(lookup(&[UPSTREAM, inline, ("TOKEN_PROXY_UPSTREAM_HEADERS_FILE", "/x")]));
        assert_eq!(both.unwrap_err().variable, "TOKEN_PROXY_UPSTREAM_HEADERS");
        for bad in ["no colon hunter2-canary", "Authorization: hunter2-canary", "X-A: hunter2-canary\u{7f}"] {
            let error = Config::from_lookup(lookup(&[UPSTREAM, ("TOKEN_PROXY_UPSTREAM_HEADERS", bad)])).unwrap_err();
            assert_eq!(error.variable, "TOKEN_PROXY_UPSTREAM_HEADERS", "{bad}");
            assert!(!error.to_string().contains("hunter2"), "{error}");
        }
    }

    #[test]
    fn an_empty_value_in_a_table_unsets_the_global_one_for_that_upstream() {
        let text = "upstream_headers_file = \"/etc/token-proxy/headers\"\n[upstreams.a]\nurl = \"http://127.0.0.1:1/oauth2/token\"\n[upstreams.b]\nurl = \"http://127.0.0.1:2/oauth2/token\"\nheaders_file = \"\"\n";
        let config = from_file(text, &[]).unwrap();
        let files: Vec<_> = config.endpoints.iter().map(|e| e.upstream.headers_file.clone()).collect();
        assert_eq!(files, [Some(std::path::PathBuf::from("/etc/token-proxy/headers")), None]);
    }

    #[test]
    fn a_tables_hosts_are_normalized_and_belong_to_its_upstream() {
        let text = format!("{TWO_UPSTREAMS}hosts = [\"Login.Example.com\", \"partners.internal.\"]\n");
        let config = from_file(&text, &[]).unwrap();
        let hosts: Vec<_> = config.endpoints.iter().map(|e| (e.name.as_deref(), e.hosts.clone())).collect();
        assert_eq!(
            hosts,
            [
                (Some("orders-prod"), vec![]),
                (Some("partners"), vec!["login.example.com".to_owned(), "partners.internal".to_owned()])
            ]
        );
    }

    #[test]
    fn an_inconsistent_upstream_table_stops_start_up_naming_its_key() {
        let table = "[upstreams.a]\nurl = \"http://127.0.0.1:1/oauth2/token\"\n";
        let cases: Vec<(String, &str)> = vec![
            (format!("default_upstream = \"b\"\n{table}"), "f.toml: default_upstream"),
            ("default_upstream = \"b\"\n".to_owned(), "f.toml: default_upstream"),
            ("[upstreams.a]\ntimeout = \"1s\"\n".to_owned(), "f.toml: upstreams.a.url"),
            (format!("{table}timeout = \"soon\"\n"), "f.toml: upstreams.a.timeout"),
            (format!("{table}url_typo = 1\n"), "f.toml: upstreams.a.url_typo"),
            (format!("{table}hosts = [\"a.example:443\"]\n"), "f.toml: upstreams.a.hosts"),
            (format!("{table}hosts = \"a.example\"\n"), "f.toml: upstreams.a.hosts"),
            (format!("{table}hosts = [\"a.example\", \"A.example.\"]\n"), "f.toml: upstreams.a.hosts"),
            (
                format!(
                    "{table}hosts = [\"a.example\"]\n[upstreams.b]\nurl = \"http://x/t\"\nhosts = [\"A.EXAMPLE\"]\n"
                ),
                "f.toml: upstreams.b.hosts",
            ),
            (format!("{table}client_call_budget = -1\n"), "f.toml: upstreams.a.client_call_budget"),
            (format!("{table}client_call_budget_window = \"0s\"\n"), "f.toml: upstreams.a.client_call_budget_window"),
            ("[upstreams.\"a b\"]\nurl = \"http://x/oauth2/token\"\n".to_owned(), "f.toml: upstreams.a b"),
            (format!("upstream_url = \"http://x/oauth2/token\"\n{table}"), "f.toml: upstream_url"),
            ("upstreams = 1\n".to_owned(), "f.toml: upstreams"),
        ];
        for (text, named) in cases {
            let error = from_file(&text, &[]).unwrap_err();
            assert_eq!(error.variable, named, "{text}: {error}");
        }
        // The environment's single upstream cannot be mixed with the file's tables either.
        let error = from_file(table, &[UPSTREAM]).unwrap_err();
        assert_eq!(error.variable, "TOKEN_PROXY_UPSTREAM_URL", "{error}");
        // A request must outlast every upstream's own timeout.
        let error = from_file(&format!("{table}timeout = \"40s\"\n"), &[]).unwrap_err();
        assert_eq!(error.variable, "TOKEN_PROXY_REQUEST_TIMEOUT", "{error}");
        assert!(error.message.contains("upstream a"), "{error}");
    }

    #[test]
    fn the_readme_documents_every_setting() {
        let readme = include_str!("../../../README.md");
        for s in SETTINGS.iter().chain(&FILE_SETTINGS) {
            assert!(readme.contains(&format!("| `{}` |", s.name)), "README lacks {}", s.name);
        }
    }

    #[test]
    fn help_lists_every_setting() {
        let text = help();
        for s in SETTINGS {
            assert!(text.contains(s.name) && text.contains(&format!("--{}", s.flag())));
        }
    }
}
