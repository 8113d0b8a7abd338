//! Logging. Log lines carry outcomes, keyed-hash prefixes and client ids, never a secret or a
//! token: the types that hold those redact themselves in `Debug`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber, writing to stdout.
/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

pub fn init(filter: &str, format: LogFormat) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("invalid log filter ({e})"))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stdout);
    let result = match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.with_ansi(false).try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))
}
