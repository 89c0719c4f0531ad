//! `tether-bench`: a release-mode load generator for tether.
//!
//! It starts an in-process upstream server, `tether-proxy` and `tether-agent` as child
//! processes, and measures every case through the tunnel and against a direct connection to
//! the same upstream, in the same run:
//!
//! - `bulk`: throughput of 1 and 8 parallel streams into a sink;
//! - `rtt`: 64-byte request/response on an open connection;
//! - `connect`: new connection to first byte back, sequential and 16 in flight;
//! - `http`: HTTP/1.1 GET of a 1 KiB and of a 1 MiB object on 64 keep-alive connections;
//! - `gateway`: the same GETs through the kube gateway (`https://FRONT/clusters/NAME/object`
//!   with a bearer token; the agent forwards it over HTTPS to the upstream), against HTTPS
//!   straight to the upstream;
//! - `idle`: resident memory of proxy + agent per idle tunneled connection;
//! - `scale`: 10,000 streams on one agent session and 1,000 agent sessions on one proxy, with
//!   their memory, on fresh processes of their own (see `scale.rs`).
//!
//! Tunnel runs go through the proxy's `--expose` listener (the peers' topology); bulk and RTT
//! also through TLS + `CONNECT` on the front. The peer tunnels found installed (rathole with
//! and without TLS, `ssh -R`, ferrotunnel) run the bulk, rtt, connect and http cases right
//! after tether, and set tether's targets (`peers.rs`); rathole-TLS also runs inside the
//! gateway case, in rounds interleaved with the gateway, as its yardstick. The results are
//! printed as a table, with the targets of DESIGN.md, and written as JSON.

mod bulk;
mod connect;
mod dial;
mod harness;
mod http;
mod idle;
mod peers;
mod report;
mod rtt;
mod scale;
mod stats;
mod upstream;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};
use serde_json::json;

use dial::{ConnectRoute, Route};
use harness::Tunnel;
use report::{Compare, Row, Target, Usage};

/// Best encrypted peer (DESIGN.md): share of direct it reaches, in percent; tether's targets
/// are 1.2× these. Used when no encrypted peer runs in this run (see `peers::apply_targets`).
/// The kube gateway is held to 1.0× the HTTP share (rathole-TLS at L4).
const PEER_BULK: f64 = 25.0;
const PEER_HTTP: f64 = 32.0;
const PEER_CONN: f64 = 35.0;
const PEER_FACTOR: f64 = 1.2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Case {
    Bulk,
    Rtt,
    Connect,
    Http,
    Gateway,
    Idle,
    Scale,
}

/// tether-bench: throughput, latency, connection rate and memory of tether against a direct
/// connection, measured in one run on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Small sizes and counts: finishes in well under a minute.
    #[arg(long)]
    quick: bool,
    /// Where tether-proxy and tether-agent are [default: next to this executable].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Where to write the JSON results [default: target/bench-results.json].
    #[arg(long)]
    json: Option<PathBuf>,
    /// Cases to run, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "bulk,rtt,connect,http,gateway,idle,scale"
    )]
    cases: Vec<Case>,
    /// Bytes per bulk run, split among its streams [default: 2 GiB, quick 64 MiB].
    #[arg(long)]
    bulk_bytes: Option<u64>,
    /// Interleaved rounds of each bulk run; the median is reported.
    #[arg(long, default_value_t = 3)]
    bulk_rounds: usize,
    /// Round trips per RTT run [default: 20000, quick 500].
    #[arg(long)]
    rtt_count: Option<usize>,
    /// Connections per connect run [default: 3000, quick 100].
    #[arg(long)]
    conn_count: Option<usize>,
    /// Connections in flight in the concurrent connect run.
    #[arg(long, default_value_t = 16)]
    conn_concurrency: usize,
    /// Seconds per HTTP run [default: 10, quick 1].
    #[arg(long)]
    http_secs: Option<f64>,
    /// Keep-alive connections in the HTTP run.
    #[arg(long, default_value_t = 64)]
    http_conns: usize,
    /// Seconds per HTTP run of the 1 MiB object [default: 5, quick 1].
    #[arg(long)]
    http_1m_secs: Option<f64>,
    /// How the agent reaches the proxy: tls (TLS + the default multiplexer, tether's own),
    /// yamux (TLS + yamux), h2 (TLS + HTTP/2) or quic.
    #[arg(long, value_enum, default_value = "tls")]
    transport: harness::Transport,
    /// An extra argument for `tether-proxy serve` (repeatable), e.g. --proxy-arg=--foo=1.
    #[arg(long = "proxy-arg", allow_hyphen_values = true)]
    proxy_args: Vec<String>,
    /// An extra argument for `tether-agent` (repeatable).
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// Keep the temporary state dir with the proxy and agent logs (set TETHER_LOG for more).
    #[arg(long)]
    keep_logs: bool,
    /// Idle connections in the memory run [default: 1000, quick 100].
    #[arg(long)]
    idle_conns: Option<usize>,
    /// Streams held open on one agent session in the scale case; 0 skips
    /// [default: 10000, quick 1000].
    #[arg(long)]
    scale_streams: Option<usize>,
    /// Agent sessions connected to one proxy in the scale case; 0 skips
    /// [default: 1000, quick 100].
    #[arg(long)]
    scale_agents: Option<usize>,
    /// Internal: serve the upstream in this process and print its address (the scale case
    /// runs its upstream as a child process this way).
    #[arg(long, hide = true)]
    serve_upstream: bool,
    /// Peer tunnels to compare with, comma-separated: rathole-tls, rathole, ssh, ferrotunnel,
    /// or none [default: every peer whose programs are found].
    #[arg(long)]
    peers: Option<String>,
}

/// Sizes, counts and time caps of one run.
#[derive(Debug, Clone, serde::Serialize)]
struct Profile {
    name: &'static str,
    bulk_bytes: u64,
    bulk_cap_s: u64,
    bulk_rounds: usize,
    rtt_count: usize,
    rtt_cap_s: u64,
    conn_count: usize,
    conn_concurrency: usize,
    conn_cap_s: u64,
    http_secs: f64,
    http_conns: usize,
    http_1m_secs: f64,
    idle_conns: usize,
    scale_streams: usize,
    scale_agents: usize,
    scale_cap_s: u64,
    watchdog_s: u64,
}

impl Profile {
    fn from_cli(cli: &Cli) -> Profile {
        let q = cli.quick;
        Profile {
            name: if q { "quick" } else { "default" },
            bulk_bytes: cli
                .bulk_bytes
                .unwrap_or(if q { 64 << 20 } else { 2 << 30 })
                .max(8),
            bulk_cap_s: if q { 10 } else { 20 },
            bulk_rounds: cli.bulk_rounds.clamp(1, 20),
            rtt_count: cli.rtt_count.unwrap_or(if q { 500 } else { 20_000 }).max(1),
            rtt_cap_s: if q { 5 } else { 15 },
            conn_count: cli.conn_count.unwrap_or(if q { 100 } else { 3_000 }).max(1),
            conn_concurrency: cli.conn_concurrency.clamp(1, 1024),
            conn_cap_s: if q { 5 } else { 15 },
            http_secs: cli
                .http_secs
                .unwrap_or(if q { 1.0 } else { 10.0 })
                .clamp(0.1, 120.0),
            http_conns: cli.http_conns.clamp(1, 4096),
            http_1m_secs: cli
                .http_1m_secs
                .unwrap_or(if q { 1.0 } else { 5.0 })
                .clamp(0.1, 120.0),
            idle_conns: cli
                .idle_conns
                .unwrap_or(if q { 100 } else { 1_000 })
                .clamp(1, 8192),
            scale_streams: cli
                .scale_streams
                .unwrap_or(if q { 1_000 } else { 10_000 })
                .min(100_000),
            scale_agents: cli
                .scale_agents
                .unwrap_or(if q { 100 } else { 1_000 })
                .min(10_000),
            scale_cap_s: if q { 60 } else { 120 },
            watchdog_s: if q { 180 } else { 600 },
        }
    }
}

/// Everything the cases need.
struct Ctx {
    tunnel: Tunnel,
    direct: Route,
    expose: Route,
    connect: Route,
    /// HTTPS straight to the upstream, and through the kube gateway.
    direct_tls: Route,
    gateway: Route,
    profile: Profile,
    /// The scale case starts its own proxy and agent; the soft open-files limit.
    scale: scale::Setup,
    nofile: u64,
}

impl Ctx {
    /// Runs `f`, returning its result and the CPU the processes and the host used meanwhile.
    async fn usage<T>(&self, f: impl Future<Output = Result<T>>) -> Result<(T, Option<Usage>)> {
        peers::usage_of(|| self.tunnel.cpu(), f).await
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether-bench: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // The children are spawned from this (the main) thread, so their PR_SET_PDEATHSIG
    // fires only when the whole bench goes away.
    match runtime.block_on(run(cli)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("tether-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the selected cases; `Ok(false)` when some case failed.
async fn run(cli: Cli) -> Result<bool> {
    // The scale case holds 10,000 sockets per process: soft limit up to the hard one.
    let nofile = scale::raise_nofile_limit()?;
    if cli.serve_upstream {
        return scale::serve_upstream().await.map(|()| true);
    }
    let mut profile = Profile::from_cli(&cli);
    let peer_selection = peers::select(cli.peers.as_deref())?;
    profile.watchdog_s += peers::watchdog_extra(&peer_selection, cli.quick);
    let exe_dir = std::env::current_exe()?
        .parent()
        .context("executable has no directory")?
        .to_path_buf();
    let bin_dir = cli.bin_dir.clone().unwrap_or_else(|| exe_dir.clone());
    let json_path = cli.json.clone().unwrap_or_else(|| {
        exe_dir
            .parent()
            .map(|t| t.join("bench-results.json"))
            .unwrap_or_else(|| PathBuf::from("target/bench-results.json"))
    });
    start_watchdog(Duration::from_secs(profile.watchdog_s));

    let started = Instant::now();
    let upstream = upstream::start().await?;
    eprintln!(
        "upstream on {}; starting tether-proxy and tether-agent from {}",
        upstream.addr,
        bin_dir.display()
    );
    let mut tunnel = Tunnel::start(&harness::Options {
        bin_dir: &bin_dir,
        upstream: upstream.addr,
        upstream_ca_pem: Some(&upstream.ca_pem),
        transport: cli.transport,
        proxy_args: &cli.proxy_args,
        agent_args: &cli.agent_args,
    })?;
    tunnel.dir.keep = cli.keep_logs;
    eprintln!(
        "agent connected (agent port {}, front {}, admin {}, expose {}) after {:.1}s",
        tunnel.agent_addr,
        tunnel.front_addr,
        tunnel.admin_addr,
        tunnel.expose_addr,
        started.elapsed().as_secs_f64()
    );
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tether_proto::tls::client_config(
        &tunnel.ca_pem,
        &[b"http/1.1"],
        None,
    )?));
    let upstream_tls = tokio_rustls::TlsConnector::from(Arc::new(
        tether_proto::tls::client_config(&upstream.ca_pem, &[b"http/1.1"], None)?,
    ));
    let front = Arc::new(ConnectRoute {
        front: tunnel.front_addr,
        cluster: harness::CLUSTER.into(),
        token: tunnel.client_token.clone(),
        tls,
    });
    let ctx = Ctx {
        direct: Route::Direct(upstream.addr),
        expose: Route::Expose(tunnel.expose_addr),
        connect: Route::Connect(front.clone()),
        direct_tls: Route::DirectTls(upstream.addr, upstream_tls),
        gateway: Route::Gateway(front),
        tunnel,
        profile,
        scale: scale::Setup {
            bin_dir: bin_dir.clone(),
            transport: cli.transport,
            proxy_args: cli.proxy_args.clone(),
            agent_args: cli.agent_args.clone(),
            keep_logs: cli.keep_logs,
        },
        nofile,
    };
    let mut ctx = ctx;
    let mut peers = peers::start(peer_selection, upstream.addr, cli.keep_logs).await;

    let mut rows = Vec::new();
    let mut details = serde_json::Map::new();
    let mut errors = Vec::new();
    // Idle memory first, while the processes have not grown from the other cases.
    for case in [
        Case::Idle,
        Case::Rtt,
        Case::Connect,
        Case::Bulk,
        Case::Http,
        Case::Gateway,
        Case::Scale,
    ] {
        if !cli.cases.contains(&case) {
            continue;
        }
        let name = format!("{case:?}").to_lowercase();
        let t0 = Instant::now();
        eprintln!("== {name}");
        let result = match case {
            Case::Idle => case_idle(&ctx).await,
            Case::Rtt => case_rtt(&ctx).await,
            Case::Connect => case_connect(&ctx).await,
            Case::Bulk => case_bulk(&ctx).await,
            Case::Http => case_http(&ctx).await,
            Case::Gateway => case_gateway(&ctx, peers::gateway_yardstick(&peers)).await,
            Case::Scale => scale::case(&ctx.scale, &ctx.profile, ctx.nofile).await,
        };
        let result = result.and_then(|r| ctx.tunnel.check_alive().map(|()| r));
        match result {
            Ok((r, d)) => {
                rows.extend(r);
                details.insert(name.clone(), d);
                let (r, d) = peers::run_case(case, &ctx, &mut peers, &rows).await;
                rows.extend(r);
                if !d.is_null() {
                    details.insert(format!("{name}-peers"), d);
                }
            }
            Err(e) => {
                eprintln!("{name} failed: {e:#}");
                errors.push(json!({ "case": name, "error": format!("{e:#}") }));
                if ctx.tunnel.check_alive().is_err() {
                    eprintln!("a tether process died; stopping");
                    break;
                }
            }
        }
        eprintln!("   {name} took {:.1}s", t0.elapsed().as_secs_f64());
    }
    let elapsed = started.elapsed().as_secs_f64();
    let targets = peers::apply_targets(&mut rows, PEER_FACTOR);

    let tether_rows: Vec<Row> = rows
        .iter()
        .filter(|r| !peers::is_peer_route(r.route))
        .cloned()
        .collect();
    let table = report::table(&tether_rows);
    println!("\n{table}");
    if !targets.text.is_empty() {
        println!(
            "peers, same run (value and % of direct; latencies as added us); tether's ratio \
             targets = max({PEER_FACTOR} x best encrypted peer, rathole without TLS):\n{}",
            targets.text
        );
    }
    let cpu = peers::cpu_table(&rows);
    if !cpu.text.is_empty() {
        println!(
            "CPU cost per unit of work (both tunnel ends; lower is better): us of CPU of proxy + \
             agent (a peer's server + client) per request, connection or MB; in brackets the \
             bench process' us per unit and how busy the host was; * = run under {}s, CPU \
             times in 10 ms ticks, rough:\n{}",
            peers::SHORT_RUN_S,
            cpu.text
        );
    }
    println!("target source: {}", targets.source);
    println!(
        "profile {}, transport {:?}, {:.0}s total, {} CPUs; direct = same upstream without tether \
         (HTTPS for the gateway rows); ratios are tunnel/direct",
        ctx.profile.name,
        cli.transport,
        elapsed,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let doc = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "unixTime": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "machine": {
            "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "network": "loopback 127.0.0.1",
        },
        "profile": ctx.profile,
        "transport": cli.transport,
        "proxyArgs": cli.proxy_args,
        "agentArgs": cli.agent_args,
        "elapsedSecs": elapsed,
        "rows": rows,
        "details": details,
        "errors": errors,
        "targetSource": targets.source,
        "peers": peers.json(&ctx.profile),
        "peerComparison": targets.comparison,
        "cpuComparison": cpu.comparison,
        "peerErrors": peers.errors,
    });
    if let Some(dir) = json_path.parent() {
        std::fs::create_dir_all(dir).ok();
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    eprintln!("wrote {}", json_path.display());
    Ok(errors.is_empty())
}

/// Kills the children and exits if the run exceeds `limit` (a hang somewhere).
fn start_watchdog(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        eprintln!("tether-bench: still running after {limit:?}; killing the children and exiting");
        harness::kill_children();
        std::process::exit(3);
    });
}

type CaseResult = Result<(Vec<Row>, serde_json::Value)>;

async fn case_idle(ctx: &Ctx) -> CaseResult {
    let n = ctx.profile.idle_conns;
    let r = idle::run(&ctx.tunnel, &ctx.expose, n).await?;
    eprintln!(
        "   {n} idle: proxy {} -> {} KiB (closed {}, reopened {}), agent {} -> {} KiB (closed {}, \
         reopened {}), streams reported {:?}",
        r.proxy_rss_before_kib,
        r.proxy_rss_after_kib,
        r.proxy_rss_closed_kib,
        r.proxy_rss_reopened_kib,
        r.agent_rss_before_kib,
        r.agent_rss_after_kib,
        r.agent_rss_closed_kib,
        r.agent_rss_reopened_kib,
        r.open_streams_reported
    );
    let target = Some(Target::AtMost(32.0));
    let kib = "KiB/conn";
    let none = Compare::None;
    let rows = vec![
        Row::new(
            "idle conn, first open, proxy+agent",
            "expose",
            kib,
            None,
            r.kib_per_conn,
            none,
            target,
        ),
        Row::new(
            "idle conn, first open, proxy",
            "expose",
            kib,
            None,
            r.proxy_kib_per_conn,
            none,
            None,
        ),
        Row::new(
            "idle conn, first open, agent",
            "expose",
            kib,
            None,
            r.agent_kib_per_conn,
            none,
            None,
        ),
        Row::new(
            "idle conn, after churn, proxy+agent",
            "expose",
            kib,
            None,
            r.kib_per_conn_churned,
            none,
            target,
        ),
        Row::new(
            "idle conn, after churn, proxy",
            "expose",
            kib,
            None,
            r.proxy_kib_per_conn_churned,
            none,
            None,
        ),
        Row::new(
            "idle conn, after churn, agent",
            "expose",
            kib,
            None,
            r.agent_kib_per_conn_churned,
            none,
            None,
        ),
    ];
    Ok((rows, serde_json::to_value(r)?))
}

async fn case_rtt(ctx: &Ctx) -> CaseResult {
    let (n, cap) = (
        ctx.profile.rtt_count,
        Duration::from_secs(ctx.profile.rtt_cap_s),
    );
    let direct = rtt::run(&ctx.direct, n, cap).await?;
    let mut rows = Vec::new();
    let mut runs = vec![direct.clone()];
    for route in [&ctx.expose, &ctx.connect] {
        let (t, usage) = ctx.usage(rtt::run(route, n, cap)).await?;
        let (d, l) = (&direct.latency, &t.latency);
        rows.push(
            Row::new(
                "rtt 64 B p50",
                route.name(),
                "us",
                Some(d.p50_us),
                l.p50_us,
                Compare::Added,
                Some(Target::AddedAtMost(25.0)),
            )
            .with_usage(usage),
        );
        rows.push(Row::new(
            "rtt 64 B p99",
            route.name(),
            "us",
            Some(d.p99_us),
            l.p99_us,
            Compare::Added,
            Some(Target::AddedAtMost(100.0)),
        ));
        rows.push(Row::new(
            "rtt 64 B p999",
            route.name(),
            "us",
            Some(d.p999_us),
            l.p999_us,
            Compare::Added,
            None,
        ));
        runs.push(t);
    }
    Ok((rows, serde_json::to_value(runs)?))
}

async fn case_connect(ctx: &Ctx) -> CaseResult {
    let p = &ctx.profile;
    let cap = Duration::from_secs(p.conn_cap_s);
    let target_rate = Some(Target::RatioAtLeast(PEER_CONN * PEER_FACTOR));
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for conc in [1, p.conn_concurrency] {
        let direct = connect::run(&ctx.direct, p.conn_count, conc, cap).await?;
        let (t, usage) = ctx
            .usage(connect::run(&ctx.expose, p.conn_count, conc, cap))
            .await?;
        let label = if conc == 1 {
            "new conn, sequential".to_string()
        } else {
            format!("new conn, {conc} in flight")
        };
        let (d, l) = (&direct.latency, &t.latency);
        rows.push(
            Row::new(
                format!("{label}, rate"),
                "expose",
                "conn/s",
                Some(direct.per_sec),
                t.per_sec,
                Compare::Ratio,
                target_rate,
            )
            .with_usage(usage),
        );
        rows.push(Row::new(
            format!("{label}, p50"),
            "expose",
            "us",
            Some(d.p50_us),
            l.p50_us,
            Compare::Added,
            None,
        ));
        let p99_target = (conc == 1).then_some(Target::AtMost(1000.0));
        rows.push(Row::new(
            format!("{label}, p99"),
            "expose",
            "us",
            Some(d.p99_us),
            l.p99_us,
            Compare::Added,
            p99_target,
        ));
        if t.errors > 0 || direct.errors > 0 {
            eprintln!(
                "   connect errors: direct {}, expose {}",
                direct.errors, t.errors
            );
        }
        runs.push(direct);
        runs.push(t);
    }
    Ok((rows, serde_json::to_value(runs)?))
}

async fn case_bulk(ctx: &Ctx) -> CaseResult {
    let p = &ctx.profile;
    let cap = Duration::from_secs(p.bulk_cap_s);
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for streams in [1usize, 8] {
        // Rounds interleave the routes so that drift in the machine's load hits all alike;
        // each route reports its median round.
        let mut direct = Vec::new();
        let mut tunneled: [Vec<(bulk::Bulk, Option<Usage>)>; 2] = [Vec::new(), Vec::new()];
        for round in 0..p.bulk_rounds {
            let d = bulk::run(&ctx.direct, streams, p.bulk_bytes, cap).await?;
            let mut line = format!(
                "   {streams} stream(s), round {}: direct {:.0}",
                round + 1,
                d.mb_per_s
            );
            direct.push(d);
            for (i, route) in [&ctx.expose, &ctx.connect].into_iter().enumerate() {
                let (t, usage) = ctx
                    .usage(bulk::run(route, streams, p.bulk_bytes, cap))
                    .await?;
                line += &format!(
                    ", {} {:.0}{}",
                    route.name(),
                    t.mb_per_s,
                    if t.capped { " (time cap hit)" } else { "" }
                );
                tunneled[i].push((t, usage));
            }
            eprintln!("{line} MB/s");
        }
        let label = if streams == 1 {
            "bulk, 1 stream".to_string()
        } else {
            format!("bulk, {streams} streams")
        };
        let direct_median = median_by(&direct, |b| b.mb_per_s).mb_per_s;
        for (route, results) in [&ctx.expose, &ctx.connect].into_iter().zip(&tunneled) {
            let (t, usage) = median_by(results, |(b, _)| b.mb_per_s);
            let target =
                (route.name() == "expose").then_some(Target::RatioAtLeast(PEER_BULK * PEER_FACTOR));
            rows.push(
                Row::new(
                    label.clone(),
                    route.name(),
                    "MB/s",
                    Some(direct_median),
                    t.mb_per_s,
                    Compare::Ratio,
                    target,
                )
                .with_usage(*usage),
            );
        }
        runs.extend(direct.into_iter().map(|b| json!({ "run": b })));
        for results in tunneled {
            runs.extend(
                results
                    .into_iter()
                    .map(|(b, u)| json!({ "run": b, "usage": u })),
            );
        }
    }
    Ok((rows, serde_json::to_value(runs)?))
}

/// The median element by `key` (the upper one of an even count).
fn median_by<T>(items: &[T], key: impl Fn(&T) -> f64) -> &T {
    let mut idx: Vec<usize> = (0..items.len()).collect();
    idx.sort_by(|&a, &b| key(&items[a]).total_cmp(&key(&items[b])));
    &items[idx[idx.len() / 2]]
}

async fn case_http(ctx: &Ctx) -> CaseResult {
    http_case(
        ctx,
        "http",
        (&ctx.direct, &ctx.expose),
        PEER_HTTP * PEER_FACTOR,
        PEER_BULK * PEER_FACTOR,
    )
    .await
}

/// Rounds of the kube gateway's 1 KiB run, each next to HTTPS direct and (when it runs)
/// rathole-TLS at L4, its yardstick.
const GATEWAY_ROUNDS: usize = 3;

/// Through the kube gateway against HTTPS direct. Held, like an L4 tunnel, to 1.0x the best
/// encrypted peer's share (of HTTP for 1 KiB, of bulk for 1 MiB); with peers, to rathole-TLS's
/// plain-L4 rate for 1 KiB (`peers::apply_targets`). The 1 KiB runs go in rounds that
/// interleave direct, the gateway and `yardstick` (rathole-TLS), each reporting its median
/// round, so that the host's speed drifting during the run hits them alike.
async fn case_gateway(ctx: &Ctx, yardstick: Option<&peers::Peer>) -> CaseResult {
    let p = &ctx.profile;
    let dur = Duration::from_secs_f64(p.http_secs / GATEWAY_ROUNDS as f64);
    let object = http::OBJECT_1K;
    let mut direct = Vec::new();
    let mut gateway = Vec::new();
    let mut l4 = Vec::new();
    let mut l4_failed = false;
    for round in 0..GATEWAY_ROUNDS {
        let d = http::run(&ctx.direct_tls, object, p.http_conns, dur).await?;
        let (t, usage) = ctx
            .usage(http::run(&ctx.gateway, object, p.http_conns, dur))
            .await?;
        let mut line = format!(
            "   1 KiB, round {}: direct {:.0}, gateway {:.0}",
            round + 1,
            d.req_per_s,
            t.req_per_s
        );
        if let Some(y) = yardstick.filter(|_| !l4_failed) {
            match y.http_rate(object, p.http_conns, dur).await {
                Ok((r, usage)) => {
                    line += &format!(", {} at L4 {:.0}", y.kind.name(), r.req_per_s);
                    l4.push((r, usage));
                }
                Err(e) => {
                    eprintln!("   {} at L4 failed: {e:#}", y.kind.name());
                    l4_failed = true;
                }
            }
        }
        eprintln!("{line} req/s");
        if t.errors > 0 || d.errors > 0 {
            eprintln!(
                "   gateway errors: direct {}, gateway {}",
                d.errors, t.errors
            );
        }
        direct.push(d);
        gateway.push((t, usage));
    }
    let d = median_by(&direct, |h| h.req_per_s);
    let (t, usage) = median_by(&gateway, |(h, _)| h.req_per_s);
    let mut rows = rows_1k("kube gateway", ctx.gateway.name(), d, t, *usage, PEER_HTTP);
    if let (Some(y), false) = (yardstick, l4_failed || l4.is_empty()) {
        let (r, usage) = median_by(&l4, |(h, _)| h.req_per_s);
        rows.push(
            Row::new(
                format!("kube gateway GET 1 KiB, {} conns, rate", p.http_conns),
                y.kind.name(),
                "req/s",
                None,
                r.req_per_s,
                Compare::Ratio,
                None,
            )
            .with_usage(*usage),
        );
    }
    let (r, [d1m, t1m]) = http::rows_1m(
        ctx,
        "kube gateway",
        &ctx.direct_tls,
        &ctx.gateway,
        PEER_BULK,
    )
    .await?;
    rows.extend(r);
    let details = json!({
        "rounds1k": {
            "direct": direct,
            "gateway": gateway.iter().map(|(h, _)| h).collect::<Vec<_>>(),
            "yardstickL4": l4.iter().map(|(h, _)| h).collect::<Vec<_>>(),
        },
        "direct1m": d1m,
        "gateway1m": t1m,
    });
    Ok((rows, details))
}

/// The rows of a 1 KiB run `t` of `name` next to `direct`: rate (held to `target` percent of
/// direct, with the CPU used, `usage`), p50 and p99.
fn rows_1k(
    label: &str,
    name: &'static str,
    direct: &http::Http,
    t: &http::Http,
    usage: Option<Usage>,
    target: f64,
) -> Vec<Row> {
    let c = direct.connections;
    let (d, l) = (&direct.latency, &t.latency);
    let mut rows = vec![Row::new(
        format!("{label} GET 1 KiB, {c} conns, rate"),
        name,
        "req/s",
        Some(direct.req_per_s),
        t.req_per_s,
        Compare::Ratio,
        Some(Target::RatioAtLeast(target)),
    )
    .with_usage(usage)];
    for (q, dv, tv) in [("p50", d.p50_us, l.p50_us), ("p99", d.p99_us, l.p99_us)] {
        rows.push(Row::new(
            format!("{label} GET 1 KiB, {c} conns, {q}"),
            name,
            "us",
            Some(dv),
            tv,
            Compare::Added,
            None,
        ));
    }
    rows
}

/// GETs of the 1 KiB object (rate held to `target_1k` percent of direct, p50, p99) and of the
/// 1 MiB object (see [`http::rows_1m`]) on `tunnel` next to `direct`.
async fn http_case(
    ctx: &Ctx,
    label: &str,
    (direct_route, tunnel): (&Route, &Route),
    target_1k: f64,
    target_1m: f64,
) -> CaseResult {
    let p = &ctx.profile;
    let dur = Duration::from_secs_f64(p.http_secs);
    let direct = http::run(direct_route, http::OBJECT_1K, p.http_conns, dur).await?;
    let (t, usage) = ctx
        .usage(http::run(tunnel, http::OBJECT_1K, p.http_conns, dur))
        .await?;
    if t.errors > 0 || direct.errors > 0 {
        eprintln!(
            "   {label} errors: {} {}, {} {}",
            direct_route.name(),
            direct.errors,
            tunnel.name(),
            t.errors
        );
    }
    let mut rows = rows_1k(label, tunnel.name(), &direct, &t, usage, target_1k);
    let (r, [d1m, t1m]) = http::rows_1m(ctx, label, direct_route, tunnel, target_1m).await?;
    rows.extend(r);
    Ok((rows, serde_json::to_value([direct, t, d1m, t1m])?))
}
