//! New connections: connect, send one byte, wait for its echo, close. Sequentially and with
//! several connections in flight; latency per connection and connections per second.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::dial::{dial_echo, Route};
use crate::stats::{Samples, Summary};

/// One connection-rate run.
#[derive(Debug, Clone, Serialize)]
pub struct Connect {
    pub route: &'static str,
    pub concurrency: usize,
    pub connections: usize,
    pub errors: usize,
    pub secs: f64,
    pub per_sec: f64,
    pub latency: Summary,
}

/// Opens `count` connections with `concurrency` in flight, stopping early at `cap`.
pub async fn run(
    route: &Route,
    count: usize,
    concurrency: usize,
    cap: Duration,
) -> Result<Connect> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let deadline = start + cap;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (route, next) = (route.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::with_capacity(count / concurrency + 1);
            let mut errors = 0;
            while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                let t0 = Instant::now();
                match dial_echo(&route).await {
                    Ok(io) => {
                        samples.push(t0.elapsed());
                        drop(io);
                    }
                    Err(_) => errors += 1,
                }
            }
            (samples, errors)
        }));
    }
    let mut samples = Samples::with_capacity(count);
    let mut errors = 0;
    for t in tasks {
        let (s, e) = t.await?;
        samples.extend(s);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    if samples.is_empty() {
        bail!(
            "no connection via {} succeeded ({errors} errors)",
            route.name()
        );
    }
    Ok(Connect {
        route: route.name(),
        concurrency,
        connections: samples.len(),
        errors,
        secs,
        per_sec: samples.len() as f64 / secs,
        latency: samples.summary(),
    })
}
