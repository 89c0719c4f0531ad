//! The `tether-agent` command line.

use anyhow::Result;
use clap::Parser;
use tokio_util::sync::CancellationToken;

use tether_agent::settings::AgentArgs;

/// tether-agent: runs in a member cluster, dials out to tether-proxy, and serves the streams
/// the proxy opens to this cluster's API server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "TETHER_LOG_FORMAT", default_value = "text")]
    log_format: String,
    #[command(flatten)]
    agent: AgentArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let settings = cli.agent.resolve()?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let shutdown = CancellationToken::new();
            let signal = shutdown.clone();
            tokio::spawn(async move {
                wait_for_signal().await;
                tracing::info!("shutdown requested");
                signal.cancel();
            });
            tether_agent::dialer::run(settings, shutdown).await?;
            tracing::info!("tether-agent stopped");
            Ok(())
        })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
