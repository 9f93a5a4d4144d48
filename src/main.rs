//! `loyalty`: the server and its operator commands. See `loyalty --help`.

use std::process::ExitCode;

use clap::Parser;
use loyalty::app::Application;
use loyalty::config::{Cli, Command};
use loyalty::{cli, shutdown, telemetry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    loyalty::platform::tls::install_crypto_provider();
    let args = Cli::parse();
    let mut spans = telemetry::init_tracing(args.log_format);
    let result = match args.command {
        Command::Serve(serve) => match serve.config() {
            Ok(config) => match Application::build(config).await {
                Ok(app) => app.run_until(shutdown::signal()).await,
                Err(error) => Err(error),
            },
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::from(2);
            }
        },
        Command::Migrate(database) => cli::migrate(&database).await,
        Command::Merchant { command } => cli::merchant(command).await,
        Command::Key { command } => cli::key(command).await,
        Command::Health {
            endpoint,
            service,
            ca_cert,
            tls_domain,
        } => {
            cli::health(
                &endpoint,
                &service,
                ca_cert.as_deref(),
                tls_domain.as_deref(),
            )
            .await
        }
    };
    if let Some(spans) = spans.as_mut() {
        spans.shutdown();
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// Operators see the cause of an internal error (it is their own database, not a client).
fn describe(error: &loyalty::Error) -> String {
    match error {
        loyalty::Error::Internal(source) => source.to_string(),
        other => other.to_string(),
    }
}
