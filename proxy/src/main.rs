//! The `token-proxy` binary: configuration, logging, then [`token_proxy::app::Application`].

use std::process::ExitCode;

use token_proxy::app::Application;
use token_proxy::config::{self, Command, Config};
use token_proxy::{shutdown, telemetry};

fn main() -> ExitCode {
    let config = match Config::from_env_and_args(std::env::args().skip(1)) {
        Ok(Command::Run(config)) => config,
        Ok(Command::Help) => {
            print!("{}", config::help());
            return ExitCode::SUCCESS;
        }
        Err(error) => return fail(&error.to_string()),
    };
    if let Err(error) = telemetry::init(&config.log_filter, config.log_format) {
        return fail(&error);
    }
    token_proxy::install_tls_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start the runtime: {error}")),
    };
    runtime.block_on(async {
        let app = match Application::build(*config).await {
            Ok(app) => app,
            Err(error) => return fail(&error.to_string()),
        };
        match app.run_until(shutdown::signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => fail(&error.to_string()),
        }
    })
}

/// Bad configuration or start-up failure: one line on stderr, non-zero exit.
fn fail(message: &str) -> ExitCode {
    eprintln!("token-proxy: {message}");
    ExitCode::from(2)
}
