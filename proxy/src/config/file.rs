//! The optional TOML file (`TOKEN_PROXY_CONFIG`, `--config`): the same settings, each named as
//! its variable without `TOKEN_PROXY_` in lower case (`upstream_url = "https://..."`), and the
//! named upstreams: one `[upstreams.NAME]` table each, holding the settings that belong to a
//! token endpoint ([`UPSTREAM_KEYS`]) and the `hosts` routed to it, and `default_upstream`.
//!
//! Values are turned back into the text a variable would hold and parsed by the same code, so
//! the file cannot accept what the environment refuses. Errors name the file and the key and
//! never quote the file's text: it may hold secrets (`secret`, `admin_token`, `redis_url`).

use std::collections::HashMap;
use std::fmt;

use super::{ConfigError, SETTINGS, Setting, cache, quota, upstream};
use crate::upstreams;

/// The keys of an `[upstreams.NAME]` table: the settings that belong to one token endpoint,
/// each overriding its global value for that upstream.
pub const UPSTREAM_KEYS: &[(&str, &Setting)] = &[
    ("url", &upstream::UPSTREAM_URL),
    ("connect_timeout", &upstream::UPSTREAM_CONNECT_TIMEOUT),
    ("timeout", &upstream::UPSTREAM_TIMEOUT),
    ("headers_file", &upstream::UPSTREAM_HEADERS_FILE),
    ("headers", &upstream::UPSTREAM_HEADERS),
    ("rate_limit", &quota::UPSTREAM_RATE_LIMIT),
    ("queue_timeout", &quota::UPSTREAM_QUEUE_TIMEOUT),
    ("expiry_margin", &cache::EXPIRY_MARGIN),
    ("min_token_ttl", &cache::MIN_TOKEN_TTL),
    ("max_token_lifetime", &cache::MAX_TOKEN_LIFETIME),
    ("refresh_at", &cache::REFRESH_AT),
    ("client_call_budget", &quota::CLIENT_CALL_BUDGET),
    ("client_call_budget_window", &quota::CLIENT_CALL_BUDGET_WINDOW),
];

/// The key of an upstream table that is not a setting: the `Host` names whose `/oauth2/token`
/// reaches this upstream.
const HOSTS_KEY: &str = "hosts";

/// A parsed file (or one `[upstreams.NAME]` table of it): raw values by variable name.
pub struct ConfigFile {
    /// The file's path; `PATH: upstreams.NAME` for a table.
    path: String,
    values: HashMap<&'static str, String>,
    /// For a table: the key each variable has there (see [`UPSTREAM_KEYS`]).
    table_keys: Option<HashMap<&'static str, &'static str>>,
    /// The `[upstreams.NAME]` tables, in name order.
    upstreams: Vec<(String, ConfigFile)>,
    default_upstream: Option<String>,
    /// For a table: its `hosts`, normalized (see [`upstreams::host_name`]).
    hosts: Vec<String>,
}

// Not derived: the values may be secrets.
impl fmt::Debug for ConfigFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfigFile").field("path", &self.path).field("keys", &self.values.len()).finish()
    }
}

impl ConfigFile {
    /// Reads and parses the file at `path`; `setting` is the one that named it.
    pub fn read(path: &str, setting: &Setting) -> Result<ConfigFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| setting.error(format!("cannot read {path}: {e}")))?;
        ConfigFile::parse(path, &text)
    }

    pub fn parse(path: &str, text: &str) -> Result<ConfigFile, ConfigError> {
        let at = |key: &str, message: String| ConfigError { variable: format!("{path}: {key}"), message };
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // Only the position and the first line of the parser's message: its full text
            // quotes the offending line, which may hold a secret.
            let start = e.span().map_or(0, |span| span.start.min(text.len()));
            let line = 1 + text.as_bytes()[..start].iter().filter(|&&b| b == b'\n').count();
            let message = e.message().lines().next().unwrap_or("invalid").to_owned();
            ConfigError { variable: path.to_owned(), message: format!("not valid TOML at line {line}: {message}") }
        })?;
        let mut values = HashMap::new();
        let (mut upstreams, mut default_upstream) = (Vec::new(), None);
        for (key, value) in table {
            match (key.as_str(), value) {
                ("upstreams", toml::Value::Table(tables)) => {
                    for (name, table) in tables {
                        let here = format!("upstreams.{name}");
                        if !upstreams::is_valid_name(&name) {
                            let message = format!(
                                "an upstream name has letters, digits, - and _ only, at most {} bytes",
                                upstreams::MAX_NAME_LEN
                            );
                            return Err(at(&here, message));
                        }
                        let toml::Value::Table(table) = table else {
                            return Err(at(&here, "expected a table ([upstreams.NAME])".to_owned()));
                        };
                        upstreams.push((name, ConfigFile::upstream_table(path, &here, table)?));
                    }
                    if upstreams.is_empty() {
                        return Err(at("upstreams", "names no upstream".to_owned()));
                    }
                }
                ("upstreams", _) => return Err(at("upstreams", "expected tables ([upstreams.NAME])".to_owned())),
                ("default_upstream", toml::Value::String(name)) => default_upstream = Some(name),
                ("default_upstream", _) => return Err(at("default_upstream", "expected a string".to_owned())),
                (_, value) => {
                    let Some(setting) = SETTINGS.iter().find(|s| s.file_key() == key) else {
                        let message = "unknown setting (the keys are the variables' names, see --help)";
                        return Err(at(&key, message.to_owned()));
                    };
                    values.insert(setting.name, raw_value(value, &|m| at(&key, m))?);
                }
            }
        }
        if let Some(name) = &default_upstream {
            if !upstreams.iter().any(|(n, _)| n == name) {
                let names: Vec<&str> = upstreams.iter().map(|(n, _)| n.as_str()).collect();
                let message = if names.is_empty() {
                    "names an upstream, but there is no [upstreams.NAME] table".to_owned()
                } else {
                    format!("names no upstream (the upstreams are {})", names.join(", "))
                };
                return Err(at("default_upstream", message));
            }
        }
        upstreams.sort_by(|a, b| a.0.cmp(&b.0));
        let mut routed: HashMap<&str, &str> = HashMap::new();
        for (name, table) in &upstreams {
            for host in &table.hosts {
                if let Some(other) = routed.insert(host, name) {
                    let message = format!("{host} is also a host of upstream {other}: a host reaches one upstream");
                    return Err(at(&format!("upstreams.{name}.{HOSTS_KEY}"), message));
                }
            }
        }
        Ok(ConfigFile {
            path: path.to_owned(),
            values,
            table_keys: None,
            upstreams,
            default_upstream,
            hosts: Vec::new(),
        })
    }

    /// One `[upstreams.NAME]` table (`here` is `upstreams.NAME`), as a layer over the rest.
    fn upstream_table(path: &str, here: &str, table: toml::Table) -> Result<ConfigFile, ConfigError> {
        let at = |key: &str, message: String| ConfigError { variable: format!("{path}: {here}.{key}"), message };
        let mut values = HashMap::new();
        let mut table_keys = HashMap::new();
        let mut hosts = Vec::new();
        for (key, value) in table {
            if key == HOSTS_KEY {
                hosts = host_names(value, &|m| at(&key, m))?;
                continue;
            }
            let Some((name, setting)) = UPSTREAM_KEYS.iter().find(|(name, _)| *name == key) else {
                let known: Vec<&str> = UPSTREAM_KEYS.iter().map(|(name, _)| *name).collect();
                let known = format!("{}, {HOSTS_KEY}", known.join(", "));
                return Err(at(&key, format!("unknown upstream setting (known: {known})")));
            };
            values.insert(setting.name, raw_value(value, &|m| at(&key, m))?);
            table_keys.insert(setting.name, *name);
        }
        if !values.contains_key(upstream::UPSTREAM_URL.name) {
            return Err(at("url", "is required".to_owned()));
        }
        let path = format!("{path}: {here}");
        Ok(ConfigFile {
            path,
            values,
            table_keys: Some(table_keys),
            upstreams: Vec::new(),
            default_upstream: None,
            hosts,
        })
    }

    /// The `[upstreams.NAME]` tables, in name order; empty without any.
    pub fn upstreams(&self) -> &[(String, ConfigFile)] {
        &self.upstreams
    }

    /// The upstream `/oauth2/token` reaches, if the file names one (it exists: checked).
    pub fn default_upstream(&self) -> Option<&str> {
        self.default_upstream.as_deref()
    }

    /// A table's `hosts`, normalized; each reaches one upstream (checked).
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }
}

/// A table's `hosts`: a list of host names, each normalized (lower case, no trailing dot).
fn host_names(value: toml::Value, error: &dyn Fn(String) -> ConfigError) -> Result<Vec<String>, ConfigError> {
    let toml::Value::Array(items) = value else { return Err(error("expected a list of host names".to_owned())) };
    let mut hosts: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let toml::Value::String(text) = item else { return Err(error("expected a list of host names".to_owned())) };
        let Some(host) = upstreams::host_name(&text) else {
            return Err(error(format!("{text:?} is not a host name (letters, digits, - and . only, no port)")));
        };
        if hosts.contains(&host) {
            return Err(error(format!("{host} is listed twice")));
        }
        hosts.push(host);
    }
    Ok(hosts)
}

/// A TOML value as the text its variable would hold; `error` builds the error for this key.
fn raw_value(value: toml::Value, error: &dyn Fn(String) -> ConfigError) -> Result<String, ConfigError> {
    {
        {
            let raw = match value {
                toml::Value::String(s) => s,
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                // Lists (networks, previous secrets) as the variable's comma-separated form.
                toml::Value::Array(items) => items
                    .into_iter()
                    .map(|item| match item {
                        toml::Value::String(s) => Ok(s),
                        _ => Err(error("expected a list of strings".to_owned())),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(","),
                _ => return Err(error("expected a string, number, boolean or list of strings".to_owned())),
            };
            Ok(raw)
        }
    }
}

impl ConfigFile {
    /// The raw value of a setting, if the file sets it.
    pub fn value(&self, setting: &Setting) -> Option<&str> {
        self.values.get(setting.name).map(String::as_str)
    }

    /// Where a value of the file came from, for error messages: `PATH: key`, or
    /// `PATH: upstreams.NAME.key` for a table's.
    pub fn origin(&self, setting: &Setting) -> String {
        match self.table_keys.as_ref().and_then(|keys| keys.get(setting.name)) {
            Some(key) => format!("{}.{key}", self.path),
            None => format!("{}: {}", self.path, setting.file_key()),
        }
    }
}
