//! `tether-fixture-apiserver`: runs the fixture kube-apiserver of `tether_tests::fixture` in the
//! foreground, for trying tether and kubectl by hand or from scripts.
//!
//! Prints its URL on the first line of stdout, writes its CA (and a kubeconfig) where asked, and
//! runs until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tether_tests::fixture::{Fixture, FixtureOptions};

#[derive(Parser, Debug)]
#[command(
    name = "tether-fixture-apiserver",
    about = "A stand-in kube-apiserver for tether's tests"
)]
struct Args {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = "127.0.0.1:6443")]
    addr: String,
    /// Serve plain HTTP instead of HTTPS.
    #[arg(long)]
    plain: bool,
    /// Write the CA certificate (PEM) that signed the serving certificate to this file.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// Write a kubeconfig pointing at the fixture to this file.
    #[arg(long)]
    kubeconfig_out: Option<PathBuf>,
    /// The Kubernetes version /version reports.
    #[arg(long, default_value = tether_tests::fixture::DEFAULT_KUBE_VERSION)]
    kube_version: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fixture = Fixture::start(FixtureOptions {
        tls: !args.plain,
        addr: args.addr.clone(),
    })
    .await?;
    fixture.set_kube_version(&args.kube_version);
    if let Some(path) = &args.ca_out {
        std::fs::write(path, fixture.ca_pem())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.kubeconfig_out {
        fixture.kubeconfig(path)?;
    }
    println!("{}", fixture.url());
    eprintln!(
        "tether-fixture-apiserver: serving Kubernetes {} at {} (kube-system UID {}); stop with SIGTERM or Ctrl-C",
        args.kube_version,
        fixture.url(),
        fixture.cluster_uid()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    drop(fixture);
    Ok(())
}
