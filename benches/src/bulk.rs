//! Bulk throughput: one or several parallel streams, each writing its share of the bytes to
//! the upstream sink, which acknowledges the count it received.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dial::Route;
use crate::upstream::MODE_SINK;

/// Size of each write.
const CHUNK: usize = 256 * 1024;
/// Longest wait for the sink's acknowledgement after the last write.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// One bulk run.
#[derive(Debug, Clone, Serialize)]
pub struct Bulk {
    pub route: &'static str,
    pub streams: usize,
    /// Bytes the sink acknowledged (all streams).
    pub bytes: u64,
    pub secs: f64,
    /// Decimal megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// True when the time cap stopped the writers before all bytes were sent.
    pub capped: bool,
}

/// Sends `total` bytes split over `streams` connections, stopping early at `cap`.
pub async fn run(route: &Route, streams: usize, total: u64, cap: Duration) -> Result<Bulk> {
    let per_stream = total / streams as u64;
    let chunk: Arc<[u8]> = (0..CHUNK)
        .map(|i| (i * 7 + 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let mut conns = Vec::with_capacity(streams);
    for _ in 0..streams {
        let mut io = route.dial().await?;
        io.write_all(&[MODE_SINK]).await?;
        io.write_all(&per_stream.to_le_bytes()).await?;
        conns.push(io);
    }
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + cap;
    let mut tasks = Vec::with_capacity(streams);
    for mut io in conns {
        let chunk = chunk.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while sent < per_stream {
                if tokio::time::Instant::now() >= deadline {
                    // Capped: report what was written; the sink will never acknowledge.
                    return Ok::<_, anyhow::Error>((sent, true));
                }
                let n = (per_stream - sent).min(CHUNK as u64) as usize;
                tokio::time::timeout_at(deadline + ACK_TIMEOUT, io.write_all(&chunk[..n]))
                    .await
                    .context("bulk write stalled")??;
                sent += n as u64;
            }
            io.flush().await?;
            let got = tokio::time::timeout(ACK_TIMEOUT, io.read_u64_le())
                .await
                .context("no acknowledgement from the sink")??;
            if got != per_stream {
                bail!("sink acknowledged {got} of {per_stream} bytes");
            }
            Ok((got, false))
        }));
    }
    let mut bytes = 0;
    let mut capped = false;
    for t in tasks {
        let (b, c) = t.await??;
        bytes += b;
        capped |= c;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(Bulk {
        route: route.name(),
        streams,
        bytes,
        secs,
        mb_per_s: bytes as f64 / secs / 1e6,
        capped,
    })
}
