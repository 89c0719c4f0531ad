//! The agent listener: accepts agent sessions, checks each `Hello`, and keeps the control
//! stream alive with heartbeats.
//!
//! Agents come over TLS ([`serve_tls`]) or QUIC ([`serve_quic`]); both feed the same
//! [`run_session`], which sees only the transport-neutral session.
//!
//! A session's life: TLS or QUIC handshake (bounded) → the agent opens the control stream and
//! sends `Hello` (bounded in time and size) → the proxy verifies protocol version, cluster name,
//! token and cluster UID → `Welcome` and registration, or `Reject` with a reason the operator
//! can act on (logged and counted) → heartbeats every interval; three missed intervals, the
//! control stream ending, or the session dying unregister the agent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use tether_proto::frame::{read_message, write_message, FrameError, DEFAULT_MAX_FRAME};
use tether_proto::messages::{
    control_message, ControlMessage, Hello, HelloReply, RejectCode, Welcome,
};
use tether_proto::name::validate_cluster_name;
use tether_proto::token::{TokenError, TokenKind, TokenVerifier};
use tether_proto::transport::quic::QuicListener;
use tether_proto::transport::tls::TlsListener;
use tether_proto::transport::{MuxStream, Session, SessionConfig, SessionHandle};

use crate::registry::{AgentSession, SessionRegistry};
use crate::shards::Shards;

/// Time an agent has, after TLS, to open the control stream and send `Hello`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// What the agent listener needs from the rest of the proxy.
#[derive(Clone)]
pub struct AgentGate {
    pub registry: Arc<SessionRegistry>,
    pub verifier: Arc<std::sync::RwLock<TokenVerifier>>,
    pub proxy_id: String,
    pub heartbeat: Duration,
    pub session: SessionConfig,
    pub replica_count: u32,
    /// Cancelled when the proxy starts shutting down.
    pub shutdown: CancellationToken,
    /// The event loops sessions are placed on.
    pub shards: Arc<Shards>,
}

/// Accepts TLS connections and runs each agent session in its own task until shutdown, on
/// the shard [`Shards::place_agent`] picks: the handshake, the multiplexer and the control
/// loop all run there.
pub async fn serve_tls(listener: TlsListener, gate: AgentGate) {
    let handshaker = listener.handshaker();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = gate.shutdown.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                warn!(error = %e, "accepting agent connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (shard, place) = gate.shards.place_agent();
        let (session_gate, handshaker) = (gate.clone(), handshaker.clone());
        gate.shards.run_with(shard, tcp, move |tcp| async move {
            let (gate, _place) = (session_gate, place);
            match handshaker.handshake(tcp, peer, &gate.session).await {
                Ok(session) => run_session(session, gate).await,
                Err(e) => {
                    gate.registry.metrics().agent_auth_failure("tls_handshake");
                    info!(%peer, error = %e, "agent connection refused at TLS");
                }
            }
        });
    }
}

/// Accepts QUIC connections and runs each agent session in its own task until shutdown; then
/// refuses new connections while the sessions already running drain.
pub async fn serve_quic(listener: QuicListener, gate: AgentGate) {
    loop {
        let incoming = tokio::select! {
            i = listener.accept() => i,
            _ = gate.shutdown.cancelled() => {
                listener.stop_accepting();
                return;
            }
        };
        let Some(incoming) = incoming else {
            warn!("the QUIC endpoint closed; no more QUIC agent connections");
            return;
        };
        let gate = gate.clone();
        // QUIC sessions stay here, on the shard that drives quinn's endpoint.
        let place = gate.shards.count_agent(Shards::current());
        tokio::spawn(async move {
            let _place = place;
            let peer = incoming.peer();
            match incoming.handshake().await {
                Ok(session) => run_session(session, gate).await,
                Err(e) => {
                    gate.registry.metrics().agent_auth_failure("quic_handshake");
                    info!(%peer, error = %e, "agent connection refused at the QUIC handshake");
                }
            }
        });
    }
}

/// Runs one agent session from `Hello` to its end.
pub async fn run_session(mut session: Session, gate: AgentGate) {
    let peer = session.handle.info().peer;
    // The control stream, then a Hello on it, both within HELLO_TIMEOUT.
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let mut control = match tokio::time::timeout_at(deadline, session.incoming.accept()).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            // The multiplexer gave up: garbage or a closed connection instead of a session.
            gate.registry.metrics().agent_auth_failure("protocol_error");
            info!(%peer, "agent refused: the connection ended before a control stream (not a tether agent?)");
            return;
        }
        Err(_) => {
            gate.registry.metrics().agent_auth_failure("hello_timeout");
            info!(%peer, "agent refused: no control stream within {}s", HELLO_TIMEOUT.as_secs());
            session.handle.close();
            return;
        }
    };
    let hello = match tokio::time::timeout_at(
        deadline,
        read_message::<_, Hello>(&mut control, DEFAULT_MAX_FRAME),
    )
    .await
    {
        Ok(Ok(hello)) => hello,
        Ok(Err(e)) => {
            gate.registry.metrics().agent_auth_failure("protocol_error");
            info!(%peer, error = %e, "agent refused: no valid Hello");
            let reason = format!("expected a Hello message: {e}");
            refuse(control, &session.handle, RejectCode::ProtocolError, reason).await;
            return;
        }
        Err(_) => {
            gate.registry.metrics().agent_auth_failure("hello_timeout");
            info!(%peer, "agent refused: no Hello within {}s", HELLO_TIMEOUT.as_secs());
            let reason = format!("no Hello within {}s", HELLO_TIMEOUT.as_secs());
            refuse(control, &session.handle, RejectCode::ProtocolError, reason).await;
            return;
        }
    };

    if let Err((code, label, reason)) = check_hello(&hello, &gate) {
        gate.registry.metrics().agent_auth_failure(label);
        warn!(%peer, cluster = %hello.cluster, agent_id = %hello.agent_id, reason = %reason, "agent refused");
        refuse(control, &session.handle, code, reason).await;
        return;
    }

    let session_id = tether_proto::token::random_id();
    let welcome = Welcome {
        proxy_id: gate.proxy_id.clone(),
        session_id: session_id.clone(),
        heartbeat_interval_ms: gate.heartbeat.as_millis() as u32,
        replica_count: gate.replica_count,
    };
    if let Err(e) = write_message(&mut control, &HelloReply::welcome(welcome)).await {
        info!(%peer, error = %e, "agent went away before Welcome");
        session.handle.close();
        return;
    }
    let agent = Arc::new(AgentSession {
        cluster: hello.cluster.clone(),
        agent_id: hello.agent_id.clone(),
        agent_version: hello.agent_version.clone(),
        session_id,
        labels: hello.labels.clone().into_iter().collect::<HashMap<_, _>>(),
        handle: session.handle.clone(),
        connected_at: SystemTime::now(),
        rtt_micros: AtomicU64::new(0),
        agent_finds_link_slow: AtomicBool::new(false),
        bytes_to_agent: AtomicU64::new(0),
        bytes_from_agent: AtomicU64::new(0),
        draining: AtomicBool::new(false),
        shard: Shards::current(),
    });
    gate.registry.register(agent.clone());
    info!(
        cluster = %agent.cluster, agent_id = %agent.agent_id, session_id = %agent.session_id,
        %peer, transport = agent.handle.info().transport, "agent connected"
    );

    // Streams the agent opens after the control stream are not part of protocol v1.
    let mut incoming = session.incoming;
    let extra = tokio::spawn(async move {
        while let Some(s) = incoming.accept().await {
            debug!("closing an unexpected stream opened by the agent");
            drop(s);
        }
    });

    let why = control_loop(control, &agent, &gate).await;
    gate.registry.unregister(&agent);
    agent.handle.close();
    extra.abort();
    info!(cluster = %agent.cluster, agent_id = %agent.agent_id, session_id = %agent.session_id, reason = %why, "agent disconnected");
}

/// Sends `Reject` on the control stream and closes the session.
async fn refuse(mut control: MuxStream, handle: &SessionHandle, code: RejectCode, reason: String) {
    let send = async {
        let _ = write_message(&mut control, &HelloReply::reject(code, reason)).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut control).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), send).await;
    // Give the Reject a moment to reach the agent before the session goes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle.close();
}

/// Verifies a `Hello`: version, name, token, scope, UID. The error carries the reject code,
/// a metrics label, and the sentence for the operator.
fn check_hello(hello: &Hello, gate: &AgentGate) -> Result<(), (RejectCode, &'static str, String)> {
    if hello.protocol_version != tether_proto::PROTOCOL_VERSION {
        return Err((
            RejectCode::UnsupportedVersion,
            "unsupported_version",
            format!(
                "agent speaks protocol v{}, this proxy speaks v{}; upgrade the older of the two",
                hello.protocol_version,
                tether_proto::PROTOCOL_VERSION
            ),
        ));
    }
    if gate.shutdown.is_cancelled() {
        return Err((
            RejectCode::ShuttingDown,
            "shutting_down",
            "proxy is shutting down; connect to another replica".into(),
        ));
    }
    validate_cluster_name(&hello.cluster)
        .map_err(|e| (RejectCode::InvalidClusterName, "invalid_cluster_name", e))?;
    let claims = gate
        .verifier
        .read()
        .expect("verifier lock")
        .verify(&hello.token, TokenKind::Agent)
        .map_err(|e| {
            let code = match e {
                TokenError::Expired { .. } => RejectCode::TokenExpired,
                TokenError::Revoked { .. } => RejectCode::TokenRevoked,
                _ => RejectCode::BadToken,
            };
            (code, e.label(), format!("agent token refused: {e}"))
        })?;
    if claims.sub != hello.cluster {
        return Err((
            RejectCode::WrongCluster,
            "wrong_cluster",
            format!(
                "agent token is for cluster {:?}, but the agent says it is cluster {:?}; \
                 use the token minted for {:?} (`tether-proxy token agent --cluster {}`)",
                claims.sub, hello.cluster, hello.cluster, hello.cluster
            ),
        ));
    }
    if let Err(known) = gate
        .registry
        .uids()
        .check_and_record(&hello.cluster, &hello.cluster_uid)
    {
        return Err((
            RejectCode::DuplicateClusterUid,
            "duplicate_cluster_uid",
            format!(
                "cluster name {:?} already belongs to the cluster with UID {known}, but this \
                 agent's cluster has UID {}: two clusters cannot share a name. Give this \
                 cluster another name, or, if the cluster was rebuilt, remove {:?} from the \
                 proxy's clusters.json and restart the proxy",
                hello.cluster, hello.cluster_uid, hello.cluster
            ),
        ));
    }
    gate.registry
        .metrics()
        .agent_token_expiry(&hello.cluster, claims.exp);
    Ok(())
}

/// Heartbeats and control messages until the session ends; returns why it ended.
async fn control_loop(control: MuxStream, agent: &Arc<AgentSession>, gate: &AgentGate) -> String {
    let (mut rd, mut wr) = tokio::io::split(control);
    // Reading in its own task keeps partial frames safe from `select!` cancellation.
    let (tx, mut rx) = mpsc::channel::<Result<ControlMessage, FrameError>>(16);
    let reader = tokio::spawn(async move {
        loop {
            let msg = read_message::<_, ControlMessage>(&mut rd, DEFAULT_MAX_FRAME).await;
            let end = msg.is_err();
            if tx.send(msg).await.is_err() || end {
                return;
            }
        }
    });
    let mut tick = tokio::time::interval(gate.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    let mut nonce = 0u64;
    let mut sent: Option<(u64, Instant)> = None;
    let mut going_away = false;
    // Whether this session is counted in the slow-link gauge.
    let mut counted_slow = false;
    let metrics = gate.registry.metrics();
    let why = loop {
        let slow = agent.link_is_slow();
        if slow != counted_slow {
            metrics.slow_link(&agent.cluster, slow);
            counted_slow = slow;
        }
        tokio::select! {
            _ = tick.tick() => {
                if last_heard.elapsed() > gate.heartbeat * 3 {
                    break format!("no heartbeat for {:?} (three intervals)", last_heard.elapsed());
                }
                nonce += 1;
                sent = Some((nonce, Instant::now()));
                let rtt = agent.rtt_micros.load(Ordering::Relaxed);
                if write_message(&mut wr, &ControlMessage::ping(nonce, rtt)).await.is_err() {
                    break "control stream write failed".into();
                }
            }
            msg = rx.recv() => match msg {
                Some(Ok(m)) => {
                    last_heard = Instant::now();
                    match m.message {
                        Some(control_message::Message::Pong(p)) => {
                            agent.agent_finds_link_slow.store(p.link_slow, Ordering::Relaxed);
                            if let Some((n, at)) = sent {
                                if n == p.nonce {
                                    let micros = at.elapsed().as_micros() as u64;
                                    agent.rtt_micros.store(micros, Ordering::Relaxed);
                                    gate.registry.metrics().heartbeat_rtt(micros);
                                }
                            }
                        }
                        Some(control_message::Message::Ping(p)) => {
                            let pong = ControlMessage::pong(p.nonce, agent.handle.link_is_slow());
                            let answered = write_message(&mut wr, &pong).await;
                            if answered.is_err() {
                                break "control stream write failed".into();
                            }
                        }
                        Some(control_message::Message::GoAway(g)) => {
                            agent.draining.store(true, Ordering::Relaxed);
                            info!(cluster = %agent.cluster, agent_id = %agent.agent_id, reason = %g.reason, "agent is draining");
                        }
                        None => {}
                    }
                }
                Some(Err(FrameError::Closed)) | None => break "agent closed the control stream".into(),
                Some(Err(e)) => break format!("control stream error: {e}"),
            },
            _ = agent.handle.closed() => break "session ended".into(),
            _ = gate.shutdown.cancelled(), if !going_away => {
                going_away = true;
                agent.draining.store(true, Ordering::Relaxed);
                let _ = write_message(&mut wr, &ControlMessage::go_away("proxy is shutting down", 0)).await;
            }
        }
    };
    reader.abort();
    if counted_slow {
        metrics.slow_link(&agent.cluster, false);
    }
    why
}
