//! The `token-proxy` binary: configuration, logging, then [`token_proxy::app::Application`]; or
//! `--help`, `--version`, `--check`, `--health`.

use std::process::ExitCode;

use token_proxy::app::Application;
use token_proxy::config::{self, Command};
use token_proxy::shutdown;

/// How long `--health` waits for the whole exchange; a health check's own timeout is longer.
const HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

fn main() -> ExitCode {
    let command = match config::Config::from_env_and_args(std::env::args().skip(1)) {
        Ok(command) => command,
        // Docker reserves a HEALTHCHECK's exit 2: unhealthy is 1, whatever the reason.
        Err(error) if std::env::args().any(|arg| arg == "--health") => {
            eprintln!("token-proxy: unhealthy: {error}");
            return ExitCode::from(1);
        }
        Err(error) => return fail(&error.to_string()),
    };
    let (config, check_only) = match command {
        Command::Run(config) => (config, false),
        Command::Check(config) => (config, true),
        Command::Help => {
            print!("{}", config::help());
            return ExitCode::SUCCESS;
        }
        Command::Version => {
            print!("{}", config::version());
            return ExitCode::SUCCESS;
        }
        Command::Health(addresses) => {
            // For a container's HEALTHCHECK: no curl in the image. The first address that
            // answers healthy is enough; else the last one's failure is the answer.
            let mut outcome = Ok(());
            for admin in addresses {
                outcome = token_proxy::admin::probe_healthz(admin, HEALTH_TIMEOUT);
                if outcome.is_ok() {
                    break;
                }
            }
            return match outcome {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("token-proxy: unhealthy: {error}");
                    ExitCode::from(1)
                }
            };
        }
    };
    token_proxy::install_tls_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => return fail(&format!("cannot start the runtime: {error}")),
    };
    if check_only {
        // Nothing is logged: the one line on stdout or stderr is the answer.
        return match runtime.block_on(async { config.check() }) {
            Ok(()) => {
                println!("token-proxy: the configuration is valid");
                ExitCode::SUCCESS
            }
            Err(error) => fail(&error.to_string()),
        };
    }
    if let Err(error) = config.log.init() {
        return fail(&error);
    }
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

/// Bad configuration or start-up failure: one line on stderr, exit 2.
fn fail(message: &str) -> ExitCode {
    eprintln!("token-proxy: {message}");
    ExitCode::from(2)
}
