//! Scale: many concurrent streams on one agent session, and many agent sessions on one proxy,
//! each with the resident memory it costs.
//!
//! - **Streams.** A fresh proxy and agent whose upstream is a *separate* upstream process
//!   (`tether-bench --serve-upstream`), so that neither the bench nor the upstream holds more
//!   than N sockets (the bench's N client sockets and the upstream's N accepted ones would not
//!   fit one process under a 20,000 file limit). N connections are opened through the proxy's
//!   `--expose` listener, at most [`PARALLEL`] dials in flight, each proven open end to end by
//!   its echo greeting; all are held open, memory is read, the proxy's stream count is checked,
//!   every connection echoes once more, and all are closed. Any failure fails the case.
//! - **Agent sessions.** A fresh proxy (and its one real agent); M agent sessions are run in
//!   this process with the agent's own library ([`tether_agent::dialer::run`], i.e. the real
//!   dial, `Hello`, control stream and heartbeats), each for its own cluster `scale-{i}` with an
//!   agent token minted here with the proxy's signing key. They connect in waves of
//!   [`AGENT_WAVE`]; once `/api/v1/clusters` lists all M connected, memory is read: the proxy's
//!   delta / M is the proxy side of an idle session; this process's delta / M is the agent
//!   side, with M agents sharing one process (a real agent is a process of its own).
//!
//! Each figure is the resident memory (VmRSS) with the load minus before it, after a warm-up
//! whose lazily created state is in the baseline. Every loop is bounded in count and time.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use tether_agent::settings::{ProxyTransport, Settings};
use tether_proto::token::{Claims, SigningKey};
use tether_proto::transport::tls::Mux;

use crate::dial::{dial_echo, BoxIo, Route, DIAL_TIMEOUT};
use crate::harness::{self, TempDir, Transport, Tunnel};
use crate::report::{Compare, Row, Target};
use crate::Profile;

/// Dials (or echoes) in flight at once.
pub const PARALLEL: usize = 256;
/// Streams opened and closed before the baseline.
const WARMUP_STREAMS: usize = 32;
/// Agent sessions connected and closed before the baseline.
const WARMUP_AGENTS: usize = 8;
/// Agent sessions started at once; the next wave waits until these are connected.
pub const AGENT_WAVE: usize = 100;
/// Pause before reading memory, so buffers and tasks settle.
const SETTLE: Duration = Duration::from_millis(1000);
/// How often the proxy's status is polled.
const POLL: Duration = Duration::from_millis(100);
/// Longest the streams' close, or the agents' goodbye, may take to show on the proxy.
const CLOSE_CAP: Duration = Duration::from_secs(30);
/// Both sides' default stream limit per session (`--max-streams-per-session`,
/// `--max-streams`); above it the bench lifts both.
const DEFAULT_MAX_STREAMS: usize = 16_384;
/// File descriptors the bench keeps for itself beside the N client sockets.
const FD_HEADROOM: u64 = 1024;
/// The DESIGN.md targets.
const TARGET_STREAMS: f64 = 10_000.0;
const TARGET_AGENTS: f64 = 1_000.0;
const TARGET_KIB_PER_STREAM: f64 = 32.0;
const TARGET_KIB_PER_SESSION: f64 = 64.0;
/// What the child upstream prints before its address.
const READY_LINE: &str = "upstream listening on ";
/// Longest the child upstream lives (it is killed by PID long before).
const CHILD_LIFETIME: Duration = Duration::from_secs(3600);

/// What the scale case needs to start its own proxy and agent.
pub struct Setup {
    pub bin_dir: PathBuf,
    pub transport: Transport,
    pub proxy_args: Vec<String>,
    pub agent_args: Vec<String>,
    pub keep_logs: bool,
}

/// Raises the soft limit of open files to the hard limit (children inherit it); returns the
/// soft limit now in force.
pub fn raise_nofile_limit() -> Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// The hidden `--serve-upstream` mode: an upstream server in a process of its own, whose
/// address goes to stdout; it runs until killed (or for [`CHILD_LIFETIME`]).
pub async fn serve_upstream() -> Result<()> {
    let up = crate::upstream::start().await?;
    let mut out = std::io::stdout();
    writeln!(out, "{READY_LINE}{}", up.addr)?;
    out.flush()?;
    tokio::time::sleep(CHILD_LIFETIME).await;
    Ok(())
}

/// The upstream child process; killed by PID on drop, then its log dir removed.
struct ChildUpstream {
    proc: harness::Proc,
    addr: SocketAddr,
    _dir: TempDir,
}

impl ChildUpstream {
    fn start(keep_logs: bool) -> Result<ChildUpstream> {
        let mut dir = TempDir::new()?;
        dir.keep = keep_logs;
        let log = dir.path.join("upstream.log");
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--serve-upstream");
        let mut proc = harness::spawn("bench upstream", cmd, log.clone())?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            proc.check_alive()?;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(|l| l.strip_prefix(READY_LINE)) {
                let addr = addr
                    .trim()
                    .parse()
                    .context("the child upstream's address")?;
                return Ok(ChildUpstream {
                    proc,
                    addr,
                    _dir: dir,
                });
            }
            if Instant::now() > deadline {
                bail!(
                    "the upstream child did not start; log:\n{}",
                    proc.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A fresh proxy and agent for one part of the case, on `upstream`.
fn start_tunnel(
    setup: &Setup,
    upstream: SocketAddr,
    proxy_extra: &[String],
    agent_extra: &[String],
) -> Result<Tunnel> {
    let proxy_args: Vec<String> = proxy_extra
        .iter()
        .chain(&setup.proxy_args)
        .cloned()
        .collect();
    let agent_args: Vec<String> = agent_extra
        .iter()
        .chain(&setup.agent_args)
        .cloned()
        .collect();
    let mut t = Tunnel::start(&harness::Options {
        bin_dir: &setup.bin_dir,
        upstream,
        upstream_ca_pem: None,
        transport: setup.transport,
        proxy_args: &proxy_args,
        agent_args: &agent_args,
    })?;
    t.dir.keep = setup.keep_logs;
    Ok(t)
}

/// Runs `f` on every input, at most [`PARALLEL`] at once, until `deadline`; all must succeed.
async fn bounded<T, F, Fut>(
    what: &str,
    inputs: Vec<T>,
    deadline: Instant,
    f: F,
) -> Result<Vec<BoxIo>>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = Result<BoxIo>> + Send + 'static,
{
    let n = inputs.len();
    let mut inputs = inputs.into_iter();
    let mut set = JoinSet::new();
    let mut done = Vec::with_capacity(n);
    let (mut errors, mut first_error) = (0usize, None);
    loop {
        // Stop starting new ones after many failures: the tunnel is broken, not one stream.
        while set.len() < PARALLEL && errors < 100 {
            match inputs.next() {
                Some(i) => set.spawn(f(i)),
                None => break,
            };
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, set.join_next()).await {
            Err(_) => bail!(
                "{what}: {} of {n} done, {errors} failed, when the time cap hit",
                done.len()
            ),
            Ok(None) => break,
            Ok(Some(r)) => match r.context("a task panicked")? {
                Ok(io) => done.push(io),
                Err(e) => {
                    errors += 1;
                    first_error.get_or_insert(e);
                }
            },
        }
    }
    if let Some(e) = first_error {
        bail!(
            "{what}: {errors} failed, {} of {n} done; first error: {e:#}",
            done.len()
        );
    }
    Ok(done)
}

/// Opens `n` echo connections via `route`, each proven open end to end by its greeting.
async fn open(route: &Route, n: usize, deadline: Instant) -> Result<Vec<BoxIo>> {
    bounded("opening streams", vec![(); n], deadline, |()| {
        let route = route.clone();
        async move { dial_echo(&route).await }
    })
    .await
}

/// Sends 8 bytes (the connection's index) on every connection and reads them back.
async fn echo_all(conns: Vec<BoxIo>, deadline: Instant) -> Result<Vec<BoxIo>> {
    let inputs: Vec<(u64, BoxIo)> = (0u64..).zip(conns).collect();
    bounded(
        "echo on every stream",
        inputs,
        deadline,
        |(i, mut io)| async move {
            io.write_all(&i.to_le_bytes()).await?;
            io.flush().await?;
            let mut back = [0u8; 8];
            tokio::time::timeout(DIAL_TIMEOUT, io.read_exact(&mut back))
                .await
                .context("echo timed out")??;
            if u64::from_le_bytes(back) != i {
                bail!("stream {i} echoed {back:?}");
            }
            Ok(io)
        },
    )
    .await
}

/// The streams result.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Streams {
    pub streams: usize,
    pub parallel_dials: usize,
    /// Flags added to the proxy and agent to admit N streams (none up to their defaults).
    pub proxy_flags: Vec<String>,
    pub agent_flags: Vec<String>,
    pub open_secs: f64,
    pub opens_per_s: f64,
    /// `openStreams` of the cluster in `/api/v1/clusters` with all N open.
    pub open_streams_reported: Option<u64>,
    pub echo_all_secs: f64,
    /// From dropping the client ends until the proxy reports no open stream.
    pub close_secs: f64,
    pub proxy_rss_before_kib: u64,
    pub agent_rss_before_kib: u64,
    pub proxy_rss_open_kib: u64,
    pub agent_rss_open_kib: u64,
    pub proxy_rss_closed_kib: u64,
    pub agent_rss_closed_kib: u64,
    /// The separate upstream process with N connections open.
    pub upstream_rss_open_kib: u64,
    pub proxy_kib_per_stream: f64,
    pub agent_kib_per_stream: f64,
    pub kib_per_stream: f64,
}

/// `openStreams` of the bench cluster, as the proxy reports it.
fn reported_streams(tunnel: &Tunnel) -> Option<u64> {
    tunnel
        .cluster_status()
        .ok()
        .flatten()
        .and_then(|c| c.get("openStreams").and_then(|v| v.as_u64()))
}

async fn streams(
    setup: &Setup,
    upstream: &ChildUpstream,
    n: usize,
    cap: Duration,
    nofile: u64,
) -> Result<Streams> {
    if (n as u64) + FD_HEADROOM > nofile {
        bail!(
            "{n} streams need about {} open files in this process, the limit is {nofile} \
             (raise `ulimit -Hn`, or lower --scale-streams)",
            n as u64 + FD_HEADROOM
        );
    }
    // Each side admits 16,384 streams per session by default; lift both above N if needed.
    let (mut proxy_flags, mut agent_flags) = (Vec::new(), Vec::new());
    if n + WARMUP_STREAMS + 16 > DEFAULT_MAX_STREAMS {
        let limit = n + WARMUP_STREAMS + 64;
        proxy_flags.push(format!("--max-streams-per-session={limit}"));
        agent_flags.push(format!("--max-streams={limit}"));
    }
    let mut tunnel = start_tunnel(setup, upstream.addr, &proxy_flags, &agent_flags)?;
    let route = Route::Expose(tunnel.expose_addr);
    let deadline = Instant::now() + cap;

    drop(open(&route, WARMUP_STREAMS, deadline).await?);
    tokio::time::sleep(SETTLE).await;
    let (p0, a0) = tunnel.rss_kib()?;

    let t0 = Instant::now();
    let conns = open(&route, n, deadline).await?;
    let open_secs = t0.elapsed().as_secs_f64();
    eprintln!("   {n} streams open on one session after {open_secs:.1}s");
    tokio::time::sleep(SETTLE).await;
    tunnel.check_alive()?;
    let (p1, a1) = tunnel.rss_kib()?;
    let upstream_rss = harness::rss_kib(upstream.proc.pid())?;
    let reported = reported_streams(&tunnel);
    if let Some(r) = reported {
        if r != n as u64 {
            bail!("{n} streams open, but the proxy reports {r}");
        }
    }

    let t1 = Instant::now();
    let conns = echo_all(conns, Instant::now() + cap).await?;
    let echo_all_secs = t1.elapsed().as_secs_f64();
    let alive = conns.len();
    if alive != n {
        bail!("{alive} of {n} streams echoed");
    }

    let t2 = Instant::now();
    drop(conns);
    loop {
        if reported_streams(&tunnel) == Some(0) {
            break;
        }
        if t2.elapsed() > CLOSE_CAP {
            bail!(
                "the proxy still reports {:?} open streams {CLOSE_CAP:?} after all were closed",
                reported_streams(&tunnel)
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let close_secs = t2.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    tunnel.check_alive()?;
    let (p2, a2) = tunnel.rss_kib()?;
    let per = |after: u64, before: u64| (after as f64 - before as f64) / n as f64;
    Ok(Streams {
        streams: n,
        parallel_dials: PARALLEL,
        proxy_flags,
        agent_flags,
        open_secs,
        opens_per_s: n as f64 / open_secs.max(1e-9),
        open_streams_reported: reported,
        echo_all_secs,
        close_secs,
        proxy_rss_before_kib: p0,
        agent_rss_before_kib: a0,
        proxy_rss_open_kib: p1,
        agent_rss_open_kib: a1,
        proxy_rss_closed_kib: p2,
        agent_rss_closed_kib: a2,
        upstream_rss_open_kib: upstream_rss,
        proxy_kib_per_stream: per(p1, p0),
        agent_kib_per_stream: per(a1, a0),
        kib_per_stream: per(p1 + a1, p0 + a0),
    })
}

/// Agent sessions run in this process, all stopped by one token.
struct Fleet {
    proxy_addr: String,
    transport: ProxyTransport,
    mux: Mux,
    ca_pem: String,
    key: SigningKey,
    token_dir: PathBuf,
    upstream: String,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<Result<()>>>,
}

impl Fleet {
    fn new(tunnel: &Tunnel, transport: Transport, upstream: SocketAddr) -> Result<Fleet> {
        let state = tunnel.dir.path.join("state");
        let key_path = state.join("signing.key");
        let key = SigningKey::from_pem(
            &std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?,
        )
        .context("loading the proxy's signing key")?;
        let token_dir = tunnel.dir.path.join("scale-tokens");
        std::fs::create_dir_all(&token_dir)?;
        let (transport, mux) = match transport {
            Transport::Tls => (ProxyTransport::Tls, Mux::Tether),
            Transport::Yamux => (ProxyTransport::Tls, Mux::Yamux),
            Transport::H2 => (ProxyTransport::Tls, Mux::H2),
            // QUIC has its own streams; the multiplexer is not used.
            Transport::Quic => (ProxyTransport::Quic, Mux::Tether),
        };
        Ok(Fleet {
            proxy_addr: tunnel.agent_addr.to_string(),
            transport,
            mux,
            ca_pem: tunnel.ca_pem.clone(),
            key,
            token_dir,
            upstream: upstream.to_string(),
            shutdown: CancellationToken::new(),
            tasks: Vec::new(),
        })
    }

    /// Starts one agent for cluster `name`, with a token minted for it.
    fn spawn(&mut self, name: &str) -> Result<()> {
        let token_file = self.token_dir.join(format!("{name}.token"));
        std::fs::write(&token_file, self.key.mint(&Claims::agent(name, None)?))?;
        let settings = Settings {
            proxy_addr: self.proxy_addr.clone(),
            transport: self.transport,
            server_name: "127.0.0.1".into(),
            cluster: name.into(),
            token_file,
            ca_pem: self.ca_pem.clone(),
            upstream: self.upstream.clone(),
            allow: Vec::new(),
            // Set (empty) so that the agent does not look for an in-cluster API server.
            cluster_uid: Some(String::new()),
            agent_id: format!("{name}-bench"),
            labels: Vec::new(),
            drain_timeout: Duration::from_secs(1),
            max_streams: DEFAULT_MAX_STREAMS,
            kube: None,
            mux: self.mux,
            identity: tether_agent::kube::IdentityMode::Impersonate,
            quic_congestion_control: Default::default(),
        };
        let shutdown = self.shutdown.clone();
        self.tasks
            .push(tokio::spawn(tether_agent::dialer::run(settings, shutdown)));
        Ok(())
    }

    /// Fails if an agent has stopped on its own (only a setup error makes it return).
    async fn check(&mut self) -> Result<()> {
        if let Some(i) = self.tasks.iter().position(|t| t.is_finished()) {
            let t = self.tasks.swap_remove(i);
            return match t.await {
                Ok(Ok(())) => bail!("an in-process agent stopped"),
                Ok(Err(e)) => Err(e.context("an in-process agent failed")),
                Err(e) => bail!("an in-process agent panicked: {e}"),
            };
        }
        Ok(())
    }

    /// Tells every agent to say goodbye and waits (bounded) for them; aborts stragglers.
    async fn stop(mut self) {
        self.shutdown.cancel();
        let deadline = tokio::time::Instant::now() + CLOSE_CAP;
        for t in std::mem::take(&mut self.tasks) {
            let abort = t.abort_handle();
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                abort.abort();
            }
        }
    }
}

/// On an early return (a failed case), the agents must not go on retrying in the background.
impl Drop for Fleet {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// How many clusters named `{prefix}…` `/api/v1/clusters` lists as connected.
fn connected(tunnel: &Tunnel, prefix: &str) -> Result<usize> {
    let (code, body) = harness::http_get(tunnel.admin_addr, "/api/v1/clusters")?;
    if code != 200 {
        bail!("/api/v1/clusters answered {code}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .filter(|c| {
                    c.get("name")
                        .and_then(|n| n.as_str())
                        .is_some_and(|n| n.starts_with(prefix))
                        && c.get("connected").and_then(|v| v.as_bool()) == Some(true)
                })
                .count()
        })
        .unwrap_or(0))
}

/// The proxy's nonzero `agent_auth_failures` counters (agents refused at TLS or `Hello`).
fn agent_refusals(tunnel: &Tunnel) -> Vec<String> {
    let (_, metrics) = harness::http_get(tunnel.admin_addr, "/metrics").unwrap_or_default();
    metrics
        .lines()
        .filter(|l| l.contains("agent_auth_failures") && !l.starts_with('#'))
        .filter(|l| l.rsplit(' ').next().is_some_and(|v| v.trim() != "0"))
        .map(str::to_string)
        .collect()
}

/// Polls until `want(count)` for clusters named `{prefix}…`; fails at `deadline`, or as soon
/// as the proxy has refused an agent (the in-process agents would only retry).
async fn wait_connected(
    tunnel: &mut Tunnel,
    fleet: Option<&mut Fleet>,
    prefix: &str,
    want: impl Fn(usize) -> bool,
    deadline: Instant,
) -> Result<usize> {
    let (mut fleet, mut polls) = (fleet, 0u64);
    loop {
        polls += 1;
        tunnel.check_alive()?;
        if let Some(f) = fleet.as_deref_mut() {
            f.check().await?;
        }
        let n = connected(tunnel, prefix)?;
        if want(n) {
            return Ok(n);
        }
        let timed_out = Instant::now() > deadline;
        if timed_out || polls % 20 == 0 {
            let refusals = agent_refusals(tunnel);
            if timed_out || !refusals.is_empty() {
                bail!(
                    "{n} agent sessions ({prefix}…) connected{}; agent refusals on the proxy: \
                     {refusals:?}; proxy log tail:\n{}",
                    if timed_out {
                        " when the time cap hit"
                    } else {
                        ""
                    },
                    tunnel.proxy.log_tail()
                );
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The agent-sessions result.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Agents {
    pub sessions: usize,
    pub transport: Transport,
    pub wave: usize,
    /// From the first dial until `/api/v1/clusters` lists all M connected.
    pub connect_secs: f64,
    /// From the shutdown until the proxy lists none connected.
    pub disconnect_secs: f64,
    pub proxy_rss_before_kib: u64,
    pub proxy_rss_connected_kib: u64,
    pub proxy_rss_closed_kib: u64,
    /// This process, where the M agents run.
    pub bench_rss_before_kib: u64,
    pub bench_rss_connected_kib: u64,
    pub proxy_kib_per_session: f64,
    /// This process's delta / M: the agent side, M agents sharing one process and runtime.
    pub agent_side_kib_per_session: f64,
}

async fn agents(
    setup: &Setup,
    upstream: &ChildUpstream,
    m: usize,
    cap: Duration,
) -> Result<Agents> {
    let mut tunnel = start_tunnel(setup, upstream.addr, &[], &[])?;
    let deadline = Instant::now() + cap;
    let me = std::process::id();

    // Warm-up: a few sessions come and go, so lazily created state is in the baseline.
    let mut warm = Fleet::new(&tunnel, setup.transport, upstream.addr)?;
    for i in 0..WARMUP_AGENTS {
        warm.spawn(&format!("warm-{i}"))?;
    }
    wait_connected(
        &mut tunnel,
        Some(&mut warm),
        "warm-",
        |n| n == WARMUP_AGENTS,
        deadline,
    )
    .await?;
    warm.stop().await;
    wait_connected(&mut tunnel, None, "warm-", |n| n == 0, deadline).await?;
    tokio::time::sleep(SETTLE).await;
    let (p0, b0) = (tunnel.rss_kib()?.0, harness::rss_kib(me)?);

    let t0 = Instant::now();
    let mut fleet = Fleet::new(&tunnel, setup.transport, upstream.addr)?;
    for wave in (0..m).step_by(AGENT_WAVE) {
        let end = (wave + AGENT_WAVE).min(m);
        for i in wave..end {
            fleet.spawn(&format!("scale-{i}"))?;
        }
        wait_connected(
            &mut tunnel,
            Some(&mut fleet),
            "scale-",
            |n| n >= end,
            deadline,
        )
        .await?;
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    eprintln!("   {m} agent sessions connected after {connect_secs:.1}s");
    tokio::time::sleep(SETTLE).await;
    // All still there after the pause (none dropped, e.g. for missed heartbeats).
    let still = connected(&tunnel, "scale-")?;
    if still != m {
        bail!("{still} of {m} agent sessions connected after the pause");
    }
    fleet.check().await?;
    let (p1, b1) = (tunnel.rss_kib()?.0, harness::rss_kib(me)?);

    let t1 = Instant::now();
    fleet.stop().await;
    wait_connected(
        &mut tunnel,
        None,
        "scale-",
        |n| n == 0,
        Instant::now() + CLOSE_CAP,
    )
    .await?;
    let disconnect_secs = t1.elapsed().as_secs_f64();
    tokio::time::sleep(SETTLE).await;
    tunnel.check_alive()?;
    let p2 = tunnel.rss_kib()?.0;
    let per = |after: u64, before: u64| (after as f64 - before as f64) / m as f64;
    Ok(Agents {
        sessions: m,
        transport: setup.transport,
        wave: AGENT_WAVE,
        connect_secs,
        disconnect_secs,
        proxy_rss_before_kib: p0,
        proxy_rss_connected_kib: p1,
        proxy_rss_closed_kib: p2,
        bench_rss_before_kib: b0,
        bench_rss_connected_kib: b1,
        proxy_kib_per_session: per(p1, p0),
        agent_side_kib_per_session: per(b1, b0),
    })
}

/// The scale case: streams, then agent sessions (either skipped when its count is 0).
pub async fn case(setup: &Setup, p: &Profile, nofile: u64) -> crate::CaseResult {
    let cap = Duration::from_secs(p.scale_cap_s);
    let upstream = ChildUpstream::start(setup.keep_logs)?;
    let mut rows = Vec::new();
    let mut details = serde_json::Map::new();
    details.insert("nofileLimit".into(), json!(nofile));
    if p.scale_streams > 0 {
        let s = streams(setup, &upstream, p.scale_streams, cap, nofile).await?;
        eprintln!(
            "   streams: proxy {} -> {} KiB, agent {} -> {} KiB (closed: {} / {} KiB), \
             reported {:?}, echo on all {:.1}s, closed in {:.1}s",
            s.proxy_rss_before_kib,
            s.proxy_rss_open_kib,
            s.agent_rss_before_kib,
            s.agent_rss_open_kib,
            s.proxy_rss_closed_kib,
            s.agent_rss_closed_kib,
            s.open_streams_reported,
            s.echo_all_secs,
            s.close_secs
        );
        let n = s.streams;
        let kib = "KiB/stream";
        rows.extend([
            Row::new(
                "streams open at once on one session",
                "expose",
                "streams",
                None,
                n as f64,
                Compare::None,
                Some(Target::AtLeast(TARGET_STREAMS)),
            ),
            Row::new(
                format!("{n} streams, seconds to open all"),
                "expose",
                "s",
                None,
                s.open_secs,
                Compare::None,
                None,
            ),
            Row::new(
                format!("{n} idle streams, proxy+agent"),
                "expose",
                kib,
                None,
                s.kib_per_stream,
                Compare::None,
                Some(Target::AtMost(TARGET_KIB_PER_STREAM)),
            ),
            Row::new(
                format!("{n} idle streams, proxy"),
                "expose",
                kib,
                None,
                s.proxy_kib_per_stream,
                Compare::None,
                None,
            ),
            Row::new(
                format!("{n} idle streams, agent"),
                "expose",
                kib,
                None,
                s.agent_kib_per_stream,
                Compare::None,
                None,
            ),
        ]);
        details.insert("streams".into(), serde_json::to_value(s)?);
    }
    if p.scale_agents > 0 {
        let a = agents(setup, &upstream, p.scale_agents, cap).await?;
        eprintln!(
            "   agents: proxy {} -> {} KiB (closed {} KiB), bench {} -> {} KiB, \
             disconnected in {:.1}s",
            a.proxy_rss_before_kib,
            a.proxy_rss_connected_kib,
            a.proxy_rss_closed_kib,
            a.bench_rss_before_kib,
            a.bench_rss_connected_kib,
            a.disconnect_secs
        );
        let m = a.sessions;
        let kib = "KiB/session";
        rows.extend([
            Row::new(
                "agent sessions connected to one proxy",
                "agents",
                "sessions",
                None,
                m as f64,
                Compare::None,
                Some(Target::AtLeast(TARGET_AGENTS)),
            ),
            Row::new(
                format!("{m} agent sessions, seconds to connect all"),
                "agents",
                "s",
                None,
                a.connect_secs,
                Compare::None,
                None,
            ),
            Row::new(
                format!("{m} idle agent sessions, proxy"),
                "agents",
                kib,
                None,
                a.proxy_kib_per_session,
                Compare::None,
                Some(Target::AtMost(TARGET_KIB_PER_SESSION)),
            ),
            Row::new(
                format!("{m} idle agent sessions, agent side ({m} in one process)"),
                "agents",
                kib,
                None,
                a.agent_side_kib_per_session,
                Compare::None,
                None,
            ),
        ]);
        details.insert("agents".into(), serde_json::to_value(a)?);
    }
    Ok((rows, serde_json::Value::Object(details)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_and_echoes_more_than_parallel() {
        let up = crate::upstream::start().await.unwrap();
        let route = Route::Direct(up.addr);
        let deadline = Instant::now() + Duration::from_secs(60);
        let n = PARALLEL + 44;
        let conns = open(&route, n, deadline).await.unwrap();
        assert_eq!(conns.len(), n);
        let conns = echo_all(conns, deadline).await.unwrap();
        assert_eq!(conns.len(), n);
    }

    #[tokio::test]
    async fn a_failed_dial_fails_the_batch() {
        // A port nobody listens on (bound, then released).
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let err = open(&Route::Direct(addr), 3, deadline).await.err().unwrap();
        assert!(format!("{err:#}").contains("3 failed"), "{err:#}");
    }
}
