//! Logging: the filter and the format.

use tracing_subscriber::EnvFilter;

use super::{ConfigError, Setting, Source};
use crate::telemetry::{self, LogFormat};

pub static LOG: Setting =
    Setting { name: "TOKEN_PROXY_LOG", default: Some("info"), help: "log filter, e.g. info,token_proxy=debug" };
pub static LOG_FORMAT: Setting =
    Setting { name: "TOKEN_PROXY_LOG_FORMAT", default: Some("json"), help: "json or text" };
pub static ACCESS_LOG: Setting = Setting {
    name: "TOKEN_PROXY_ACCESS_LOG",
    default: Some("false"),
    help: "true: one JSON line per token request (client_id, upstream, outcome, status, upstream_status, latency_ms, source), whatever the log filter and format",
};

/// What is logged, and how.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Tracing filter directive. Default `info`.
    pub filter: String,
    /// Default JSON, one object a line.
    pub format: LogFormat,
    /// One JSON line per token request (see [`crate::access_log`]). Default off.
    pub access_log: bool,
}

impl LogSettings {
    pub(super) fn parse(source: &Source) -> Result<LogSettings, ConfigError> {
        let filter = source.required(&LOG)?;
        // Checked here, not only when the logger is installed, so that `--check` sees it.
        if let Err(e) = EnvFilter::try_new(&filter) {
            return Err(source.error(&LOG, format!("invalid filter ({e})")));
        }
        let format = match source.required(&LOG_FORMAT)?.as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => return Err(source.error(&LOG_FORMAT, format!("expected json or text, got {other:?}"))),
        };
        let access_log = source.parse(&ACCESS_LOG, "true or false")?;
        Ok(LogSettings { filter, format, access_log })
    }

    /// Installs the global logger.
    pub fn init(&self) -> Result<(), String> {
        telemetry::init(&self.filter, self.format, self.access_log)
    }
}
