//! HTTP/1.1 GET of a 1 KiB object over many concurrent keep-alive connections, with a
//! hand-rolled client loop (one request in flight per connection). The request is the
//! route's ([`Route::http_request`]): plain `GET /object`, or through the kube gateway
//! `GET /clusters/{cluster}/object` with a bearer token.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dial::{BoxIo, Route};
use crate::stats::{Samples, Summary};
use crate::upstream::{find_head_end, HTTP_BODY};

/// The path asked for (under `/clusters/{cluster}/` through the gateway).
const PATH: &str = "object";
/// Longest a single request may take before its connection gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP run.
#[derive(Debug, Clone, Serialize)]
pub struct Http {
    pub route: &'static str,
    pub connections: usize,
    pub requests: u64,
    pub errors: usize,
    pub secs: f64,
    pub req_per_s: f64,
    pub latency: Summary,
}

/// A keep-alive connection, its read buffer and the request it sends.
struct Conn {
    io: BoxIo,
    buf: Vec<u8>,
    request: Arc<[u8]>,
}

impl Conn {
    /// Sends one GET and reads the whole response; checks the status and body length.
    async fn get(&mut self) -> Result<()> {
        self.io.write_all(&self.request).await?;
        // TLS routes may hold the record back until flushed; a no-op on TCP.
        self.io.flush().await?;
        let head = loop {
            if let Some(h) = find_head_end(&self.buf) {
                break h;
            }
            if self.buf.len() > 64 * 1024 {
                bail!("response head too large");
            }
            self.fill().await?;
        };
        let head_text =
            std::str::from_utf8(&self.buf[..head]).context("response head is not UTF-8")?;
        if !head_text.starts_with("HTTP/1.1 200") {
            bail!("unexpected response {:?}", head_text.lines().next());
        }
        let len: usize = head_text
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .context("no Content-Length")?;
        if len != HTTP_BODY {
            bail!("body of {len} bytes, expected {HTTP_BODY}");
        }
        while self.buf.len() < head + len {
            self.fill().await?;
        }
        self.buf.drain(..head + len);
        Ok(())
    }

    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.io.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

/// Runs `connections` keep-alive clients for `duration` (after one warm-up request each).
pub async fn run(route: &Route, connections: usize, duration: Duration) -> Result<Http> {
    let request: Arc<[u8]> = route.http_request(PATH).into();
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut c = Conn {
            io: route.dial().await?,
            buf: Vec::with_capacity(4096),
            request: request.clone(),
        };
        tokio::time::timeout(REQUEST_TIMEOUT, c.get())
            .await
            .context("warm-up request timed out")??;
        conns.push(c);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::with_capacity(connections);
    for mut c in conns {
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::with_capacity(1 << 14);
            let mut errors = 0;
            while Instant::now() < deadline {
                let t0 = Instant::now();
                match tokio::time::timeout(REQUEST_TIMEOUT, c.get()).await {
                    Ok(Ok(())) => samples.push(t0.elapsed()),
                    // The connection's state is unknown after a failure: stop using it.
                    _ => {
                        errors += 1;
                        break;
                    }
                }
            }
            (samples, errors)
        }));
    }
    let mut samples = Samples::default();
    let mut errors = 0;
    for t in tasks {
        let (s, e) = t.await?;
        samples.extend(s);
        errors += e;
    }
    let secs = start.elapsed().as_secs_f64();
    let requests = samples.len() as u64;
    Ok(Http {
        route: route.name(),
        connections,
        requests,
        errors,
        secs,
        req_per_s: requests as f64 / secs,
        latency: samples.summary(),
    })
}
