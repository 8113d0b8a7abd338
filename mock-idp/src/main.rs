//! The `mock-idp` binary: configuration from `MOCK_IDP_*` variables, text logs, and a server
//! that stops gracefully on SIGTERM or Ctrl-C. NOT FOR PRODUCTION.

use std::process::ExitCode;

use mock_idp::{Config, MockIdp};
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> ExitCode {
    // A value that is not UTF-8 is passed on lossily, so it fails parsing with the variable's
    // name instead of silently counting as unset.
    let config = match Config::from_lookup(|name| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("mock-idp: {err}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(&config.log_filter)).init();
    tracing::warn!(
        "mock-idp is a test tool: its signing key is public and its admin API unauthenticated. NOT FOR PRODUCTION."
    );
    tracing::info!(
        clients = config.clients.len(),
        issuer = %config.issuer,
        kid = config.signing_key.kid(),
        token_lifetime_secs = config.token_lifetime.as_secs(),
        latency_ms = u64::try_from(config.latency.as_millis()).unwrap_or(u64::MAX),
        "configuration loaded"
    );

    let listen = config.listen;
    let idp = match MockIdp::new(config) {
        Ok(idp) => idp,
        Err(err) => {
            eprintln!("mock-idp: {err}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("mock-idp: cannot listen on {listen}: {err}");
            return ExitCode::FAILURE;
        }
    };
    match mock_idp::serve(listener, idp, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// Resolves on Ctrl-C or, on Unix, SIGTERM (what `docker stop` sends).
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No handler could be installed: rely on SIGTERM alone.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
