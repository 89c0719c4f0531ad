//! Connecting to the proxy and staying connected.
//!
//! The loop: dial (TLS 1.3, the proxy verified against the configured CA) → open the control
//! stream → `Hello` → `Welcome` or `Reject` → serve data streams and answer heartbeats until
//! the session ends → back off → again.
//!
//! Backoff is exponential with full jitter, starting at 200 ms. While the proxy cannot be
//! reached at all the wait is capped at 2 s, so an agent is back within about 2 s of the
//! proxy's return; after a `Reject` (a configuration problem that retrying fast does not fix)
//! it is capped at 30 s. A session that stayed up for a minute resets the backoff.
//!
//! On `GoAway` the agent connects again at once; the old session keeps serving its open
//! streams until they finish. On SIGTERM the agent refuses new streams, tells the proxy
//! `GoAway`, lets open streams finish for the drain timeout, and returns.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::Rng;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use tether_proto::frame::{read_message, write_message, FrameError, DEFAULT_MAX_FRAME};
use tether_proto::messages::{
    control_message, hello_reply, ControlMessage, Hello, HelloReply, RejectCode, Welcome,
};
use tether_proto::transport::{quic, tls, MuxStream, Session, SessionConfig, SessionError};

use crate::kube::KubeUpstream;
use crate::settings::{ProxyTransport, Settings};
use crate::streams::{self, StreamContext};

/// Time the proxy has to answer `Hello`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// A session up this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);
/// `auto://`: how long QUIC has to come up before the agent dials TLS instead.
pub const AUTO_QUIC_TIMEOUT: Duration = Duration::from_millis(2500);
/// `auto://` on TLS: every this many dials, try QUIC first again...
pub const RETRY_QUIC_EVERY: u32 = 10;
/// ... and at the first dial after this long on TLS.
pub const RETRY_QUIC_AFTER: Duration = Duration::from_secs(600);

/// The transports one dial tries, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    Tls,
    Quic,
    /// QUIC, and TLS if QUIC is not up within [`AUTO_QUIC_TIMEOUT`].
    QuicThenTls,
}

impl std::fmt::Display for Plan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Plan::Tls => "tls",
            Plan::Quic => "quic",
            Plan::QuicThenTls => "quic, then tls",
        })
    }
}

/// Picks the transport of each dial. For `auto://` it remembers what worked: QUIC while QUIC
/// comes up; TLS once QUIC did not and TLS did, trying QUIC first again on every
/// [`RETRY_QUIC_EVERY`]th dial, after [`RETRY_QUIC_AFTER`] on TLS, and whenever TLS itself
/// fails (the proxy may have moved or restarted with QUIC on).
#[derive(Debug)]
pub struct TransportChooser {
    transport: ProxyTransport,
    /// Since when TLS is used because QUIC did not come up, and dials made since.
    on_tls: Option<(Instant, u32)>,
    /// QUIC came up but the session failed before `Welcome`: dial TLS once.
    tls_next: bool,
}

impl TransportChooser {
    pub fn new(transport: ProxyTransport) -> Self {
        TransportChooser {
            transport,
            on_tls: None,
            tls_next: false,
        }
    }

    /// The plan of the next dial.
    pub fn plan(&mut self) -> Plan {
        match self.transport {
            ProxyTransport::Tls => Plan::Tls,
            ProxyTransport::Quic => Plan::Quic,
            ProxyTransport::Auto if std::mem::take(&mut self.tls_next) => Plan::Tls,
            ProxyTransport::Auto => match &mut self.on_tls {
                None => Plan::QuicThenTls,
                Some((since, dials)) => {
                    *dials += 1;
                    if *dials % RETRY_QUIC_EVERY == 0 || since.elapsed() >= RETRY_QUIC_AFTER {
                        Plan::QuicThenTls
                    } else {
                        Plan::Tls
                    }
                }
            },
        }
    }

    /// The proxy answered `Hello` (`Welcome` or `Reject`) over `transport` (a [`SessionInfo`]
    /// transport name): the transport works.
    ///
    /// [`SessionInfo`]: tether_proto::transport::SessionInfo
    pub fn worked(&mut self, transport: &str) {
        if self.transport != ProxyTransport::Auto {
            return;
        }
        if transport == quic::TRANSPORT_NAME {
            if self.on_tls.take().is_some() {
                info!("QUIC comes up again; auto:// uses QUIC from now on");
            }
            return;
        }
        match &mut self.on_tls {
            None => {
                warn!(
                    quic_timeout_ms = AUTO_QUIC_TIMEOUT.as_millis() as u64,
                    retry_every = RETRY_QUIC_EVERY,
                    retry_after_s = RETRY_QUIC_AFTER.as_secs(),
                    "QUIC did not come up (UDP blocked, or QUIC off on the proxy?); auto:// uses TLS \
                     and tries QUIC again every {RETRY_QUIC_EVERY}th connection or after {} minutes",
                    RETRY_QUIC_AFTER.as_secs() / 60
                );
                self.on_tls = Some((Instant::now(), 0));
            }
            // QUIC was tried again and did not come up: the next timed try is a while off.
            Some((since, _)) => *since = Instant::now(),
        }
    }

    /// No transport of the plan could be dialed.
    pub fn dial_failed(&mut self) {
        // What worked no longer does: start over with QUIC first.
        self.on_tls = None;
    }

    /// A session over `transport` came up but failed before `Welcome` (not a `Reject`).
    pub fn session_failed(&mut self, transport: &str) {
        if self.transport != ProxyTransport::Auto {
            return;
        }
        if transport == quic::TRANSPORT_NAME {
            self.tls_next = true;
        } else {
            self.on_tls = None;
        }
    }
}

/// Exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    attempt: u32,
    base: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            attempt: 0,
            base: Duration::from_millis(200),
        }
    }
}

impl Backoff {
    /// The next wait: uniform in `[0, min(cap, base × 2^attempt)]`.
    pub fn next(&mut self, cap: Duration) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(cap);
        self.attempt = self.attempt.saturating_add(1);
        rand::rng().random_range(Duration::ZERO..=ceiling)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Caps of the two kinds of failure.
pub const UNREACHABLE_CAP: Duration = Duration::from_secs(2);
pub const REJECTED_CAP: Duration = Duration::from_secs(30);

/// How a session attempt ended.
enum Outcome {
    /// Could not reach or handshake with the proxy.
    Unreachable,
    /// The proxy refused the Hello.
    Rejected,
    /// A session ran and ended after `lasted`; `reconnect_after` is the proxy's hint.
    Ended {
        lasted: Duration,
        reconnect_after: Duration,
    },
    /// SIGTERM: drained, stop.
    Shutdown,
}

/// Runs the agent until `shutdown` is cancelled and the drain is over.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<()> {
    let client_tls = Arc::new(tether_proto::tls::client_config(
        &settings.ca_pem,
        &[tether_proto::ALPN],
        None,
    )?);
    let cluster_uid = resolve_cluster_uid(&settings).await;
    let session_cfg = SessionConfig {
        max_streams: settings.max_streams,
    };
    let ctx = Arc::new(StreamContext {
        upstream: settings.upstream.clone(),
        allow: settings.allow.clone(),
        draining: CancellationToken::new(),
        kube: match &settings.kube {
            Some(creds) => Some(Arc::new(
                KubeUpstream::new(&settings.upstream, creds.clone(), settings.identity)
                    .context("setting up the kube gateway handler")?,
            )),
            None => {
                info!(
                    "no API server credentials configured: the kube gateway is off for this agent"
                );
                None
            }
        },
    });
    info!(
        cluster = %settings.cluster, agent_id = %settings.agent_id, proxy = %settings.proxy_addr,
        transport = %settings.transport, upstream = %settings.upstream, allow = ?settings.allow,
        "tether-agent starting"
    );
    let mut backoff = Backoff::default();
    let mut chooser = TransportChooser::new(settings.transport);
    loop {
        // `attempt` watches `shutdown` itself, so that a running session can drain.
        let outcome = attempt(
            &settings,
            &cluster_uid,
            &client_tls,
            &session_cfg,
            &ctx,
            &mut chooser,
            &shutdown,
        )
        .await;
        let wait = match outcome {
            Outcome::Shutdown => return Ok(()),
            Outcome::Unreachable => backoff.next(UNREACHABLE_CAP),
            Outcome::Rejected => backoff.next(REJECTED_CAP),
            Outcome::Ended {
                lasted,
                reconnect_after,
            } => {
                if lasted >= STABLE_AFTER {
                    backoff.reset();
                }
                reconnect_after.max(backoff.next(UNREACHABLE_CAP))
            }
        };
        info!(
            wait_ms = wait.as_millis() as u64,
            "reconnecting to the proxy"
        );
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

async fn resolve_cluster_uid(settings: &Settings) -> String {
    if let Some(uid) = &settings.cluster_uid {
        return uid.clone();
    }
    if crate::incluster::api_server_addr().is_none() {
        return String::new();
    }
    match crate::incluster::cluster_uid(&settings.upstream).await {
        Ok(uid) => uid,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "could not read the kube-system namespace UID; the proxy cannot tell this cluster from another of the same name");
            String::new()
        }
    }
}

/// One connection attempt and, if welcomed, the whole session.
async fn attempt(
    settings: &Settings,
    cluster_uid: &str,
    client_tls: &Arc<rustls::ClientConfig>,
    session_cfg: &SessionConfig,
    ctx: &Arc<StreamContext>,
    chooser: &mut TransportChooser,
    shutdown: &CancellationToken,
) -> Outcome {
    let plan = chooser.plan();
    let connect = dial(settings, client_tls, session_cfg, plan);
    let session = match tokio::select! {
        s = connect => s,
        _ = shutdown.cancelled() => return Outcome::Shutdown,
    } {
        Ok(s) => s,
        Err(e) => {
            warn!(proxy = %settings.proxy_addr, transport = %plan, error = %e, "cannot reach the proxy");
            chooser.dial_failed();
            return Outcome::Unreachable;
        }
    };
    let Session { handle, incoming } = session;
    let transport = handle.info().transport;
    let greeting = tokio::select! {
        h = hello(settings, cluster_uid, &handle) => h,
        _ = shutdown.cancelled() => {
            handle.close();
            return Outcome::Shutdown;
        }
    };
    let (control, welcome) = match greeting {
        Ok(pair) => pair,
        Err(HelloError::Rejected { code, reason }) => {
            error!(cluster = %settings.cluster, ?code, %reason, "the proxy refused this agent");
            chooser.worked(transport);
            handle.close();
            return Outcome::Rejected;
        }
        Err(HelloError::Other(e)) => {
            warn!(error = %format!("{e:#}"), transport, "handshake with the proxy failed");
            chooser.session_failed(transport);
            handle.close();
            return Outcome::Unreachable;
        }
    };
    chooser.worked(transport);
    let started = Instant::now();
    let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms.max(100)));
    info!(
        cluster = %settings.cluster, agent_id = %settings.agent_id, proxy_id = %welcome.proxy_id,
        session_id = %welcome.session_id, transport, "connected to the proxy"
    );
    let tracker = TaskTracker::new();
    let acceptor = tokio::spawn(streams::serve(incoming, ctx.clone(), tracker.clone()));
    let (rd, mut wr) = tokio::io::split(control);
    let mut rx = spawn_reader(rd);
    let mut last_heard = Instant::now();
    let mut check = tokio::time::interval(heartbeat);
    let end = loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Some(Ok(m)) => {
                    last_heard = Instant::now();
                    match m.message {
                        Some(control_message::Message::Ping(p)) => {
                            if write_message(&mut wr, &ControlMessage::pong(p.nonce, handle.link_is_slow())).await.is_err() {
                                break End::Lost("control stream write failed".into());
                            }
                        }
                        Some(control_message::Message::GoAway(g)) => {
                            break End::GoAway(g.reason, Duration::from_millis(u64::from(g.reconnect_after_ms)));
                        }
                        Some(control_message::Message::Pong(_)) | None => {}
                    }
                }
                Some(Err(FrameError::Closed)) | None => break End::Lost("the proxy closed the control stream".into()),
                Some(Err(e)) => break End::Lost(format!("control stream error: {e}")),
            },
            _ = check.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    break End::Lost(format!("no heartbeat from the proxy for {:?}", last_heard.elapsed()));
                }
            }
            _ = handle.closed() => break End::Lost("session ended".into()),
            _ = shutdown.cancelled() => break End::Shutdown,
        }
    };
    match end {
        End::Lost(reason) => {
            warn!(%reason, "lost the proxy session");
            handle.close();
            acceptor.abort();
            Outcome::Ended {
                lasted: started.elapsed(),
                reconnect_after: Duration::ZERO,
            }
        }
        End::GoAway(reason, after) => {
            info!(%reason, "proxy asked this agent to go away; reconnecting, open streams finish on the old session");
            // The old session lives on in the background until its streams are done.
            tokio::spawn(async move {
                tracker.close();
                tracker.wait().await;
                handle.close();
                acceptor.abort();
                drop(wr);
            });
            Outcome::Ended {
                lasted: started.elapsed(),
                reconnect_after: after,
            }
        }
        End::Shutdown => {
            ctx.draining.cancel();
            let _ = write_message(
                &mut wr,
                &ControlMessage::go_away("agent is shutting down", 0),
            )
            .await;
            tracker.close();
            info!(open = tracker.len(), drain_timeout = ?settings.drain_timeout, "draining open streams");
            if tokio::time::timeout(settings.drain_timeout, tracker.wait())
                .await
                .is_err()
            {
                warn!(
                    open = tracker.len(),
                    "drain timeout passed; closing open streams"
                );
            }
            handle.close();
            acceptor.abort();
            Outcome::Shutdown
        }
    }
}

/// Dials the proxy over the transports of `plan`.
async fn dial(
    settings: &Settings,
    client_tls: &Arc<rustls::ClientConfig>,
    session_cfg: &SessionConfig,
    plan: Plan,
) -> Result<Session, SessionError> {
    let (addr, name) = (settings.proxy_addr.as_str(), settings.server_name.as_str());
    // Over TCP, ALPN asks for the multiplexer (`tether/2` = tether's own, `tether/1` = yamux,
    // `h2` = HTTP/2); QUIC always negotiates `tether/1`.
    let tcp_tls = match settings.mux {
        tls::Mux::Yamux => client_tls.clone(),
        mux => {
            let mut config = (**client_tls).clone();
            config.alpn_protocols = mux.agent_alpns();
            Arc::new(config)
        }
    };
    let tls = || tls::connect(addr, name, tcp_tls.clone(), session_cfg);
    let quic_cfg = quic::QuicConfig::default().with_congestion(settings.quic_congestion_control);
    let quic = || quic::connect_with(addr, name, client_tls.clone(), session_cfg, &quic_cfg);
    match plan {
        Plan::Tls => tls().await,
        Plan::Quic => quic().await,
        Plan::QuicThenTls => {
            let quic = quic();
            match tokio::time::timeout(AUTO_QUIC_TIMEOUT, quic).await {
                Ok(Ok(session)) => Ok(session),
                Ok(Err(e)) => {
                    info!(proxy = %addr, error = %e, "QUIC failed; dialing TLS");
                    tls().await
                }
                Err(_) => {
                    info!(
                        proxy = %addr, timeout_ms = AUTO_QUIC_TIMEOUT.as_millis() as u64,
                        "QUIC did not come up in time; dialing TLS"
                    );
                    tls().await
                }
            }
        }
    }
}

enum End {
    Lost(String),
    GoAway(String, Duration),
    Shutdown,
}

/// Reads control messages in their own task, so `select!` never cancels a half-read frame.
fn spawn_reader(
    mut rd: tokio::io::ReadHalf<MuxStream>,
) -> mpsc::Receiver<Result<ControlMessage, FrameError>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let msg = read_message::<_, ControlMessage>(&mut rd, DEFAULT_MAX_FRAME).await;
            let end = msg.is_err();
            if tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });
    rx
}

enum HelloError {
    Rejected { code: RejectCode, reason: String },
    Other(anyhow::Error),
}

/// Opens the control stream, sends `Hello`, and reads the proxy's answer.
async fn hello(
    settings: &Settings,
    cluster_uid: &str,
    handle: &tether_proto::transport::SessionHandle,
) -> Result<(MuxStream, Welcome), HelloError> {
    let token = std::fs::read_to_string(&settings.token_file)
        .with_context(|| format!("reading the token file {}", settings.token_file.display()))
        .map_err(HelloError::Other)?;
    let hello = Hello {
        protocol_version: tether_proto::PROTOCOL_VERSION,
        cluster: settings.cluster.clone(),
        agent_id: settings.agent_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        token: token.trim().to_string(),
        cluster_uid: cluster_uid.to_string(),
        labels: settings.labels.iter().cloned().collect(),
        capabilities: vec!["api-server".into(), "address".into()],
    };
    let exchange = async {
        let mut control = handle.open_stream().await?;
        write_message(&mut control, &hello).await?;
        let reply: HelloReply = read_message(&mut control, DEFAULT_MAX_FRAME).await?;
        Ok::<_, anyhow::Error>((control, reply))
    };
    let (control, reply) = tokio::time::timeout(WELCOME_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            HelloError::Other(anyhow::anyhow!(
                "no answer to Hello within {WELCOME_TIMEOUT:?}"
            ))
        })?
        .map_err(HelloError::Other)?;
    match reply.reply {
        Some(hello_reply::Reply::Welcome(w)) => Ok((control, w)),
        Some(hello_reply::Reply::Reject(r)) => Err(HelloError::Rejected {
            code: RejectCode::try_from(r.code).unwrap_or(RejectCode::Unspecified),
            reason: r.reason,
        }),
        None => Err(HelloError::Other(anyhow::anyhow!("empty answer to Hello"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_quic_falls_back_to_tls_and_tries_quic_again() {
        let mut c = TransportChooser::new(ProxyTransport::Auto);
        assert_eq!(c.plan(), Plan::QuicThenTls);
        // QUIC did not come up, TLS did: TLS from now on, QUIC first on every 10th dial.
        c.worked(tls::Mux::Yamux.transport_name());
        let plans: Vec<Plan> = (0..2 * RETRY_QUIC_EVERY).map(|_| c.plan()).collect();
        let retries: Vec<usize> = (0..plans.len())
            .filter(|&i| plans[i] == Plan::QuicThenTls)
            .collect();
        assert_eq!(retries, vec![9, 19], "{plans:?}");
        // ... and at the first dial after ten minutes on TLS.
        c.on_tls = Some((Instant::now() - RETRY_QUIC_AFTER, 0));
        assert_eq!(c.plan(), Plan::QuicThenTls);
        // A retry where QUIC still does not come up restarts the clock.
        c.worked(tls::Mux::Yamux.transport_name());
        assert_eq!(c.plan(), Plan::Tls);
        // QUIC works again.
        c.on_tls = Some((Instant::now() - RETRY_QUIC_AFTER, 0));
        assert_eq!(c.plan(), Plan::QuicThenTls);
        c.worked(quic::TRANSPORT_NAME);
        assert_eq!(c.plan(), Plan::QuicThenTls);
        // TLS that stops working sends the next dial to QUIC first.
        c.worked(tls::Mux::Yamux.transport_name());
        assert_eq!(c.plan(), Plan::Tls);
        c.dial_failed();
        assert_eq!(c.plan(), Plan::QuicThenTls);
        // QUIC that comes up but fails before Welcome: TLS next, once.
        c.session_failed(quic::TRANSPORT_NAME);
        assert_eq!(c.plan(), Plan::Tls);
        assert_eq!(c.plan(), Plan::QuicThenTls);
    }

    #[test]
    fn fixed_transports_never_change() {
        for (t, plan) in [
            (ProxyTransport::Tls, Plan::Tls),
            (ProxyTransport::Quic, Plan::Quic),
        ] {
            let mut c = TransportChooser::new(t);
            c.worked(tls::Mux::Yamux.transport_name());
            c.session_failed(quic::TRANSPORT_NAME);
            c.dial_failed();
            assert!((0..20).all(|_| c.plan() == plan));
        }
    }

    #[test]
    fn backoff_is_bounded_and_resets() {
        let mut b = Backoff::default();
        for _ in 0..100 {
            assert!(b.next(UNREACHABLE_CAP) <= UNREACHABLE_CAP);
        }
        for _ in 0..100 {
            assert!(b.next(REJECTED_CAP) <= REJECTED_CAP);
        }
        b.reset();
        assert!(b.next(REJECTED_CAP) <= Duration::from_millis(200));
    }
}
