//! Memory per idle connection: the resident memory the proxy and the agent gain while N
//! connections sit open and idle through the tunnel.
//!
//! Measured twice: for the first N connections of fresh processes, and for N connections
//! opened after those were closed (the steady state of a proxy whose connections come and go;
//! memory handed back to the allocator is reused, and may then be touched where fresh pages
//! were not).

use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::dial::{dial_echo, BoxIo, Route};
use crate::harness::Tunnel;

/// Connections opened (and closed) before the baseline, so lazily created state is in it.
const WARMUP: usize = 32;
/// Dials in flight while opening the idle connections.
const PARALLEL: usize = 32;
/// Pause before reading memory, so buffers and tasks settle.
const SETTLE: Duration = Duration::from_millis(1000);

/// The idle-memory result.
#[derive(Debug, Clone, Serialize)]
pub struct Idle {
    pub connections: usize,
    pub open_streams_reported: Option<u64>,
    pub proxy_rss_before_kib: u64,
    pub agent_rss_before_kib: u64,
    pub proxy_rss_after_kib: u64,
    pub agent_rss_after_kib: u64,
    /// After closing them all again (memory the processes kept).
    pub proxy_rss_closed_kib: u64,
    pub agent_rss_closed_kib: u64,
    /// After opening N again: close to `after` when the freed memory is reused, higher when
    /// closed connections leave something behind.
    pub proxy_rss_reopened_kib: u64,
    pub agent_rss_reopened_kib: u64,
    /// (after − before) / N: the first N connections of fresh processes.
    pub proxy_kib_per_conn: f64,
    pub agent_kib_per_conn: f64,
    pub kib_per_conn: f64,
    /// (reopened − before) / N: N connections once earlier ones have come and gone, which is
    /// the steady state of a long-running proxy (freed buffers are reused, and touched).
    pub proxy_kib_per_conn_churned: f64,
    pub agent_kib_per_conn_churned: f64,
    pub kib_per_conn_churned: f64,
}

/// Opens `n` echo connections via `route`, each proven open end to end by its greeting.
async fn open(route: &Route, n: usize) -> Result<Vec<BoxIo>> {
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let batch = PARALLEL.min(n - conns.len());
        let dials: Vec<_> = (0..batch)
            .map(|_| {
                let route = route.clone();
                tokio::spawn(async move { dial_echo(&route).await })
            })
            .collect();
        for d in dials {
            conns.push(d.await?.context("opening an idle connection")?);
        }
    }
    Ok(conns)
}

/// Measures the memory of `n` idle connections through `route`.
pub async fn run(tunnel: &Tunnel, route: &Route, n: usize) -> Result<Idle> {
    drop(open(route, WARMUP).await?);
    tokio::time::sleep(SETTLE).await;
    let (p0, a0) = tunnel.rss_kib()?;
    let conns = open(route, n).await?;
    tokio::time::sleep(SETTLE).await;
    let (p1, a1) = tunnel.rss_kib()?;
    let open_streams = tunnel
        .cluster_status()
        .ok()
        .flatten()
        .and_then(|c| c.get("openStreams").and_then(|v| v.as_u64()));
    drop(conns);
    tokio::time::sleep(SETTLE).await;
    let (p2, a2) = tunnel.rss_kib()?;
    let conns = open(route, n).await?;
    tokio::time::sleep(SETTLE).await;
    let (p3, a3) = tunnel.rss_kib()?;
    drop(conns);
    let per = |after: u64, before: u64| (after as f64 - before as f64) / n as f64;
    Ok(Idle {
        connections: n,
        open_streams_reported: open_streams,
        proxy_rss_before_kib: p0,
        agent_rss_before_kib: a0,
        proxy_rss_after_kib: p1,
        agent_rss_after_kib: a1,
        proxy_rss_closed_kib: p2,
        agent_rss_closed_kib: a2,
        proxy_rss_reopened_kib: p3,
        agent_rss_reopened_kib: a3,
        proxy_kib_per_conn: per(p1, p0),
        agent_kib_per_conn: per(a1, a0),
        kib_per_conn: per(p1 + a1, p0 + a0),
        proxy_kib_per_conn_churned: per(p3, p0),
        agent_kib_per_conn_churned: per(a3, a0),
        kib_per_conn_churned: per(p3 + a3, p0 + a0),
    })
}
