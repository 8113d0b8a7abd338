//! The optional TOML file (`TOKEN_PROXY_CONFIG`, `--config`): the same settings, each named as
//! its variable without `TOKEN_PROXY_` in lower case (`upstream_url = "https://..."`).
//!
//! Values are turned back into the text a variable would hold and parsed by the same code, so
//! the file cannot accept what the environment refuses. Errors name the file and the key and
//! never quote the file's text: it may hold secrets (`secret`, `admin_token`, `redis_url`).

use std::collections::HashMap;
use std::fmt;

use super::{ConfigError, SETTINGS, Setting};

/// Keys the next issue gives meaning to (several upstreams); refused until then.
const LATER_KEYS: &[&str] = &["upstreams", "default_upstream"];

/// A parsed file: raw values by variable name.
pub struct ConfigFile {
    path: String,
    values: HashMap<&'static str, String>,
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
        for (key, value) in table {
            if LATER_KEYS.contains(&key.as_str()) {
                return Err(at(&key, "several upstreams come in a later version; set upstream_url".to_owned()));
            }
            let Some(setting) = SETTINGS.iter().find(|s| s.file_key() == key) else {
                return Err(at(&key, "unknown setting (the keys are the variables' names, see --help)".to_owned()));
            };
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
                        _ => Err(at(&key, "expected a list of strings".to_owned())),
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(","),
                _ => return Err(at(&key, "expected a string, number, boolean or list of strings".to_owned())),
            };
            values.insert(setting.name, raw);
        }
        Ok(ConfigFile { path: path.to_owned(), values })
    }

    /// The raw value of a setting, if the file sets it.
    pub fn value(&self, setting: &Setting) -> Option<&str> {
        self.values.get(setting.name).map(String::as_str)
    }

    /// Where a value of the file came from, for error messages: `PATH: key`.
    pub fn origin(&self, setting: &Setting) -> String {
        format!("{}: {}", self.path, setting.file_key())
    }
}
