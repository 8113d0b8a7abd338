//! Logging. Log lines carry outcomes, keyed-hash prefixes and client ids, never a secret or a
//! token: the types that hold those redact themselves in `Debug`. The access log
//! ([`crate::access_log`]) is a layer of its own beside the operator's filter and format.

use tracing_subscriber::filter::{EnvFilter, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::access_log;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// Installs the global subscriber, writing to stdout: the logs `filter` lets through in
/// `format`, and with `access_log` the access log's lines, always JSON and never filtered out.
pub fn init(filter: &str, format: LogFormat, access_log: bool) -> Result<(), String> {
    let filter = EnvFilter::try_new(filter).map_err(|e| format!("invalid log filter ({e})"))?;
    let logs: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stdout)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_ansi(false).with_writer(std::io::stdout).boxed(),
    };
    // The access log's events are its own layer's only, whatever the filter says.
    let logs = logs.with_filter(filter_fn(|meta| meta.target() != access_log::TARGET)).with_filter(filter);
    let access = access_log.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_writer(std::io::stdout)
            .with_filter(filter_fn(|meta| meta.target() == access_log::TARGET))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(access)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))
}
