//! Round trip on an open connection: 64-byte request, 64-byte echo, one at a time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dial::{dial_echo, Route};
use crate::stats::{Samples, Summary};

/// Message size.
pub const SIZE: usize = 64;
/// Round trips before measuring.
const WARMUP: usize = 200;
/// Longest a single round trip may take before the run fails.
const ROUND_TIMEOUT: Duration = Duration::from_secs(5);

/// One RTT run.
#[derive(Debug, Clone, Serialize)]
pub struct Rtt {
    pub route: &'static str,
    pub latency: Summary,
}

/// Measures `count` round trips, stopping early at `cap`.
pub async fn run(route: &Route, count: usize, cap: Duration) -> Result<Rtt> {
    let mut io = dial_echo(route).await?;
    let msg = [0x5au8; SIZE];
    let mut back = [0u8; SIZE];
    let mut samples = Samples::with_capacity(count);
    let deadline = Instant::now() + cap;
    for i in 0..WARMUP + count {
        if Instant::now() > deadline {
            break;
        }
        let t0 = Instant::now();
        tokio::time::timeout(ROUND_TIMEOUT, async {
            io.write_all(&msg).await?;
            io.read_exact(&mut back).await
        })
        .await
        .context("round trip timed out")??;
        if i >= WARMUP {
            samples.push(t0.elapsed());
        }
    }
    Ok(Rtt {
        route: route.name(),
        latency: samples.summary(),
    })
}
