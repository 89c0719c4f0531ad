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
    /// Threads running the agent's tasks.
    ///
    /// One by default: the agent serves one session, whose TLS connection is one task
    /// whatever the thread count, and in a cluster the generated manifest's CPU limit of 1
    /// gives it one thread anyway. A second thread mostly wakes the first for work one could
    /// do: in tether-bench one thread uses less CPU per connection and per byte
    /// (benches/RESULTS.md). Raise it, with the CPU limit, for an agent that must serve
    /// more than a core's worth.
    #[arg(long, env = "TETHER_WORKER_THREADS", default_value_t = 1)]
    worker_threads: usize,
    #[command(flatten)]
    agent: AgentArgs,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tether_proto::process::init_logging(&cli.log_format);
    let settings = cli.agent.resolve()?;
    tether_proto::process::runtime(Some(cli.worker_threads))?.block_on(async move {
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        tokio::spawn(async move {
            tether_proto::process::shutdown_signal().await;
            tracing::info!("shutdown requested");
            signal.cancel();
        });
        tether_agent::dialer::run(settings, shutdown).await?;
        tracing::info!("tether-agent stopped");
        Ok(())
    })
}
