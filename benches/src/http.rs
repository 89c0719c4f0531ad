//! HTTP/1.1 GET of a 1 KiB or a 1 MiB object over many concurrent keep-alive connections,
//! with a hand-rolled client loop (one request in flight per connection). The request is the
//! route's ([`Route::http_request`]): plain `GET /object`, or through the kube gateway
//! `GET /clusters/{cluster}/object` with a bearer token (`object-1m` for the large object).
//!
//! The client reads the head, takes Content-Length, and reads the body into a reused buffer
//! without copying or parsing it, so that it costs little next to the server and the tunnel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::dial::{BoxIo, Route};
use crate::report::{Compare, Row, Target};
use crate::stats::{Samples, Summary};
use crate::upstream::{find_head_end, HTTP_BODY, HTTP_BODY_1M, PATH_1M};

/// Longest a single request may take before its connection gives up.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of each connection's read buffer (the body is read through it and discarded).
const READ_BUFFER: usize = 64 * 1024;

/// An object the upstream serves: its path (under `/clusters/{cluster}/` through the
/// gateway) and body size.
#[derive(Debug, Clone, Copy)]
pub struct Object {
    pub path: &'static str,
    pub body: usize,
}

/// `GET /object`: 1 KiB.
pub const OBJECT_1K: Object = Object {
    path: "object",
    body: HTTP_BODY,
};
/// `GET /object-1m`: 1 MiB.
pub const OBJECT_1M: Object = Object {
    path: PATH_1M,
    body: HTTP_BODY_1M,
};

/// One HTTP run.
#[derive(Debug, Clone, Serialize)]
pub struct Http {
    pub route: &'static str,
    pub body_bytes: usize,
    pub connections: usize,
    pub requests: u64,
    pub errors: usize,
    pub secs: f64,
    pub req_per_s: f64,
    /// Body bytes per second, in MB/s (10^6).
    pub mb_per_s: f64,
    pub latency: Summary,
}

/// A keep-alive connection, its read buffers and the request it sends.
struct Conn {
    io: BoxIo,
    /// Bytes read but not consumed yet (a response head).
    buf: Vec<u8>,
    /// Reused read buffer; body bytes past `buf` are read into it and dropped.
    scratch: Box<[u8]>,
    request: Arc<[u8]>,
    body: usize,
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
        if len != self.body {
            bail!("body of {len} bytes, expected {}", self.body);
        }
        // The body: what came with the head, then the rest straight into the scratch buffer
        // (never past this response's end).
        let have = (self.buf.len() - head).min(len);
        self.buf.drain(..head + have);
        let mut left = len - have;
        while left > 0 {
            let cap = left.min(self.scratch.len());
            let n = self.io.read(&mut self.scratch[..cap]).await?;
            if n == 0 {
                bail!("connection closed mid-response");
            }
            left -= n;
        }
        Ok(())
    }

    async fn fill(&mut self) -> Result<()> {
        let n = self.io.read(&mut self.scratch).await?;
        if n == 0 {
            bail!("connection closed mid-response");
        }
        self.buf.extend_from_slice(&self.scratch[..n]);
        Ok(())
    }
}

/// Runs `connections` keep-alive clients asking for `object` for `duration` (after one
/// warm-up request each).
pub async fn run(
    route: &Route,
    object: Object,
    connections: usize,
    duration: Duration,
) -> Result<Http> {
    let request: Arc<[u8]> = route.http_request(object.path).into();
    let mut conns = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut c = Conn {
            io: route.dial().await?,
            buf: Vec::with_capacity(4096),
            scratch: vec![0u8; READ_BUFFER].into_boxed_slice(),
            request: request.clone(),
            body: object.body,
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
        body_bytes: object.body,
        connections,
        requests,
        errors,
        secs,
        req_per_s: requests as f64 / secs,
        mb_per_s: (requests as f64 * object.body as f64) / secs / 1e6,
        latency: samples.summary(),
    })
}

/// GET of the 1 MiB object on `tunnel` next to `direct`: rate, throughput (held to `target`
/// percent of direct) and p99.
pub async fn rows_1m(
    ctx: &crate::Ctx,
    label: &str,
    direct: &Route,
    tunnel: &Route,
    target: f64,
) -> Result<(Vec<Row>, [Http; 2])> {
    let p = &ctx.profile;
    let dur = Duration::from_secs_f64(p.http_1m_secs);
    let d = run(direct, OBJECT_1M, p.http_conns, dur).await?;
    let (t, usage) = ctx.usage(run(tunnel, OBJECT_1M, p.http_conns, dur)).await?;
    let (c, name) = (p.http_conns, tunnel.name());
    let rows = vec![
        Row::new(
            format!("{label} GET 1 MiB, {c} conns, rate"),
            name,
            "req/s",
            Some(d.req_per_s),
            t.req_per_s,
            Compare::Ratio,
            None,
        ),
        Row::new(
            format!("{label} GET 1 MiB, {c} conns, throughput"),
            name,
            "MB/s",
            Some(d.mb_per_s),
            t.mb_per_s,
            Compare::Ratio,
            Some(Target::RatioAtLeast(target)),
        )
        .with_usage(usage),
        Row::new(
            format!("{label} GET 1 MiB, {c} conns, p99"),
            name,
            "us",
            Some(d.latency.p99_us),
            t.latency.p99_us,
            Compare::Added,
            None,
        ),
    ];
    if t.errors > 0 || d.errors > 0 {
        eprintln!(
            "   {label} 1 MiB errors: {} {}, {name} {}",
            direct.name(),
            d.errors,
            t.errors
        );
    }
    Ok((rows, [d, t]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_both_objects() {
        let up = crate::upstream::start().await.unwrap();
        let route = Route::Direct(up.addr);
        for object in [OBJECT_1K, OBJECT_1M, OBJECT_1K] {
            // The warm-up request (one per connection) reads a whole response or fails.
            let r = run(&route, object, 2, Duration::from_millis(50))
                .await
                .unwrap();
            assert_eq!(r.errors, 0);
            assert_eq!(r.body_bytes, object.body);
        }
    }
}
