//! `ferrotunnel-bench-server`: ferrotunnel's tunnel server and raw TCP ingress, as
//! `ferrotunnel server --bind ADDR --tcp-bind ADDR --tls-cert F --tls-key F` runs them, with the
//! library's per-session rate limits and the TCP ingress's connection cap and lifetime lifted.
//! Without the HTTP ingress and plugins (the bench uses only the TCP ingress).
//!
//! Usage: `FERROTUNNEL_TOKEN=... ferrotunnel-bench-server BIND TCP_BIND CERT_PEM KEY_PEM`

use std::net::SocketAddr;
use std::time::Duration;

use ferrotunnel_common::RateLimitConfig;
use ferrotunnel_core::TunnelServer;
use ferrotunnel_http::{TcpIngress, TcpIngressConfig};

// As the ferrotunnel CLI.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn usage() -> ! {
    eprintln!(
        "usage: FERROTUNNEL_TOKEN=... ferrotunnel-bench-server BIND TCP_BIND CERT_PEM KEY_PEM"
    );
    std::process::exit(2);
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 4 {
        usage();
    }
    let bind: SocketAddr = args[0].parse().unwrap_or_else(|_| usage());
    let tcp_bind: SocketAddr = args[1].parse().unwrap_or_else(|_| usage());
    let token = std::env::var("FERROTUNNEL_TOKEN").unwrap_or_else(|_| usage());

    let server = TunnelServer::new(bind, token)
        .with_tls(&args[2], &args[3])
        // The library's limiter counts in u32 cells: this is as high as it goes
        // (defaults: 100 opens/s, 10 MiB/s, burst 2x).
        .with_rate_limits(RateLimitConfig {
            streams_per_sec: u32::MAX,
            bytes_per_sec: u64::from(u32::MAX),
            burst_factor: 1,
        });
    let ingress = TcpIngress::with_config(
        tcp_bind,
        server.sessions(),
        TcpIngressConfig {
            // Defaults: 1000 connections, 5 minutes per connection.
            max_connections: 1 << 20,
            idle_timeout: Duration::from_secs(24 * 3600),
            ..TcpIngressConfig::default()
        },
    );
    let result = tokio::select! {
        r = server.run() => r,
        r = ingress.start() => r,
    };
    if let Err(e) = result {
        eprintln!("ferrotunnel-bench-server: {e}");
        std::process::exit(1);
    }
}
