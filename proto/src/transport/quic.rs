//! QUIC (quinn) as a transport: the same [`Session`] as TLS + yamux, over UDP.
//!
//! Over lossy or high-latency links one TCP connection makes every stream wait for every lost
//! packet; QUIC delivers each stream on its own, so a loss on one stream delays only that one.
//! The agent dials with [`connect`]; the proxy binds a [`QuicListener`] on UDP (the same port
//! number as its TLS listener), takes connection attempts off it quickly with
//! [`QuicListener::accept`], and completes each handshake in the connection's own task with
//! [`QuicIncoming::handshake`]. TLS 1.3 with ALPN `tether/1` and the same certificates as the
//! TLS transport; native QUIC bidirectional streams carry the session's streams.
//!
//! quinn's defaults do not suit a tunnel, so this module changes them:
//!
//! - **Stream count.** quinn allows 100 concurrent bidirectional streams. The peer may open
//!   [`SessionConfig::max_streams`] plus [`STREAM_HEADROOM`], so our own limit (which refuses
//!   just the one stream) is always hit first. Unidirectional streams and datagrams are off.
//! - **Flow-control windows.** [`STREAM_WINDOW`] per stream and [`CONNECTION_WINDOW`] per
//!   connection, [`SEND_WINDOW`] of unacknowledged data per connection; see each constant for
//!   the reasoning. They bound what one session can make the receiver buffer.
//! - **Liveness.** quinn sends no keep-alives and gives up after 30 s of silence. Here each end
//!   sends a keep-alive after [`QuicConfig::keep_alive`] without sending anything, and the
//!   idle timeout is derived from the proxy's heartbeat ([`QuicConfig::for_heartbeat`]); each
//!   end offers its own and the smaller applies, so the proxy's value rules.
//! - **UDP socket buffers.** The kernel defaults (~200 KiB) drop packets on loopback at full
//!   speed. Sockets ask for [`SOCKET_BUFFER`]; a kernel that caps the request is logged once.
//! - **Stateless reset.** A proxy that restarts cannot decrypt packets of its old connections.
//!   With a stable [`ResetSecret`] (derived from the proxy's key) the new process answers them
//!   with a stateless reset the agent trusts, so the agent reconnects at once instead of waiting
//!   out its heartbeats: the QUIC counterpart of a TCP RST.
//!
//! Half-close maps onto QUIC directly: shutting down a stream's write half sends FIN
//! (`SendStream::finish`) and reading goes on. Dropping a stream finishes what was written and
//! tells the peer to stop sending (STOP_SENDING). A stream the peer opened becomes visible to
//! it only once data is sent on it; in protocol v1 the opener always writes first (`Hello`,
//! `StreamOpen`).

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use quinn::crypto::rustls::{HandshakeData, QuicClientConfig, QuicServerConfig};
use quinn::{Connection, Endpoint, EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{debug, warn};

use super::{session_parts, DriverParts, Role, Session, SessionConfig, SessionError, SessionInfo};

/// Name shown for this transport in status pages and metrics.
pub const TRANSPORT_NAME: &str = "quic";

/// Longest a QUIC handshake may take before the attempt is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Receive window of one stream: 4 MiB.
///
/// A stream moves at most one window per round trip: 4 MiB is ~1.6 Gbit/s at 20 ms and
/// ~330 Mbit/s at 100 ms, and not a limit on loopback or in a data centre. It is also what a
/// stream whose reader stopped can make the receiver hold.
pub const STREAM_WINDOW: u32 = 4 << 20;

/// Receive window of a whole connection: 64 MiB, sixteen stream windows.
///
/// Data the application has not read yet counts against it, so it is also how much a stalled
/// reader can take from the others: up to fifteen streams whose readers stopped still leave a
/// full stream window for the rest. It caps what one session can make the receiver buffer.
pub const CONNECTION_WINDOW: u32 = 64 << 20;

/// Data sent but not yet acknowledged, per connection: 16 MiB, four stream windows: a
/// connection's throughput is at most this per round trip (~6 Gbit/s at 20 ms).
pub const SEND_WINDOW: u64 = 16 << 20;

/// Streams the peer may open beyond [`SessionConfig::max_streams`], so that the session's own
/// limit, which refuses one stream with a clear error, is always reached first.
pub const STREAM_HEADROOM: usize = 256;

/// UDP socket send and receive buffers asked of the kernel: 4 MiB.
pub const SOCKET_BUFFER: usize = 4 << 20;

/// Round trip assumed before one is measured. quinn's 333 ms (the RFC's) retransmits an
/// unanswered first packet after ~1 s and then ~3 s, so an `auto://` agent whose QUIC attempt
/// began while the proxy was restarting gets only two tries within its fallback window and
/// often settles on TLS; 100 ms gives four. Past the first round trip the measured value
/// rules, so slower links cost at most a few early retransmissions.
pub const INITIAL_RTT: Duration = Duration::from_millis(100);

/// Connection attempts whose handshake has not finished yet, at most, on one listener.
pub const MAX_PENDING_HANDSHAKES: usize = 4096;

/// How long opening a stream may wait for the peer to allow one more (it allows our limit
/// plus [`STREAM_HEADROOM`], so this only happens against a peer configured for fewer).
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a closed connection may take to say goodbye before its endpoint goes away.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Errors binding or configuring QUIC.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("resolving {addr}: {source}")]
    Resolve { addr: String, source: io::Error },
    #[error("binding UDP {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error("TLS configuration cannot be used for QUIC: {0}")]
    Crypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("QUIC configuration: {0}")]
    Config(String),
}

impl From<QuicError> for SessionError {
    fn from(e: QuicError) -> Self {
        match e {
            QuicError::Resolve { addr, source } | QuicError::Bind { addr, source } => {
                SessionError::Connect { addr, source }
            }
            other => SessionError::Config(other.to_string()),
        }
    }
}

/// Secret keying QUIC stateless resets; stable across restarts of the proxy.
#[derive(Clone)]
pub struct ResetSecret([u8; 32]);

impl ResetSecret {
    /// Derives the secret from key material that survives restarts (the proxy's private key),
    /// with a label of its own, so it reveals nothing about that material.
    pub fn derive(material: &[u8]) -> Self {
        use aws_lc_rs::hmac;
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"tether/1 quic stateless reset");
        let tag = hmac::sign(&key, material);
        let mut out = [0u8; 32];
        out.copy_from_slice(&tag.as_ref()[..32]);
        ResetSecret(out)
    }

    fn hmac_key(&self) -> Arc<dyn quinn::crypto::HmacKey> {
        Arc::new(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &self.0,
        ))
    }
}

/// Random connection ids that a restarted proxy does not dismiss as foreign, so that it answers
/// packets of its old connections with a stateless reset. (quinn's own generator embeds a
/// check keyed randomly per process, and a new process silently drops those packets.)
struct RandomConnectionIds;

/// Length of our connection ids (quinn's default length).
const CID_LEN: usize = 8;

impl quinn::ConnectionIdGenerator for RandomConnectionIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; CID_LEN];
        rand::Rng::fill(&mut rand::rng(), &mut id[..]);
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

impl std::fmt::Debug for ResetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetSecret(..)")
    }
}

/// The congestion controller of this end's sending side (each end picks its own).
///
/// - **CUBIC** (the default, quinn's): backs off on every loss, as most TCP stacks do. On a
///   link that loses packets at random it stays far below the link's capacity: with 20 ms
///   delay and 1% loss each way, 0.4 MiB/s of bulk.
/// - **BBR**: paces by the measured bandwidth and round-trip time and ignores random loss:
///   on that link 40 MiB/s of bulk, and small exchanges alongside at 44 ms p50 instead of 67.
///   quinn calls its BBR experimental (it follows an early draft of BBRv1), so it is opt-in;
///   on clean links it measured level with CUBIC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CongestionControl {
    #[default]
    Cubic,
    Bbr,
}

impl std::str::FromStr for CongestionControl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cubic" => Ok(CongestionControl::Cubic),
            "bbr" => Ok(CongestionControl::Bbr),
            other => Err(format!(
                "unknown congestion controller {other:?} (expected cubic or bbr)"
            )),
        }
    }
}

impl std::fmt::Display for CongestionControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CongestionControl::Cubic => "cubic",
            CongestionControl::Bbr => "bbr",
        })
    }
}

/// Liveness and congestion settings of QUIC connections (the rest is fixed by this module's
/// constants).
#[derive(Debug, Clone)]
pub struct QuicConfig {
    /// Close the connection after this long without a packet from the peer. Each end offers
    /// its own value and the smaller applies.
    pub idle_timeout: Duration,
    /// Send a keep-alive after this long without sending anything. Keeps NAT bindings open,
    /// and lets an agent learn quickly (by a stateless reset) that its proxy restarted.
    pub keep_alive: Duration,
    /// Key of stateless resets; random per process when `None`.
    pub reset_secret: Option<ResetSecret>,
    /// How this end paces what it sends.
    pub congestion: CongestionControl,
}

/// Agent default: keep-alive every second, and an idle timeout of a minute that the proxy's
/// smaller, heartbeat-derived value overrides.
impl Default for QuicConfig {
    fn default() -> Self {
        QuicConfig {
            idle_timeout: Duration::from_secs(60),
            keep_alive: Duration::from_secs(1),
            reset_secret: None,
            congestion: CongestionControl::default(),
        }
    }
}

impl QuicConfig {
    /// The proxy's settings for a control-stream heartbeat of `heartbeat`.
    ///
    /// The control stream closes a session after three missed heartbeats (checked once per
    /// interval, so between three and four intervals) and says why; the idle timeout is five
    /// intervals, a backstop that never fires first. Keep-alives go out at least once per
    /// interval, and at least every second.
    pub fn for_heartbeat(heartbeat: Duration) -> Self {
        let heartbeat = heartbeat.max(Duration::from_millis(50));
        QuicConfig {
            idle_timeout: heartbeat * 5,
            keep_alive: heartbeat.min(Duration::from_secs(1)),
            reset_secret: None,
            congestion: CongestionControl::default(),
        }
    }

    /// The same, with `congestion` pacing what this end sends.
    pub fn with_congestion(mut self, congestion: CongestionControl) -> Self {
        self.congestion = congestion;
        self
    }

    /// The same, with a stable stateless-reset key.
    pub fn with_reset_secret(mut self, secret: ResetSecret) -> Self {
        self.reset_secret = Some(secret);
        self
    }

    fn endpoint_config(&self) -> EndpointConfig {
        match &self.reset_secret {
            Some(secret) => {
                let mut config = EndpointConfig::new(secret.hmac_key());
                config.cid_generator(|| Box::new(RandomConnectionIds));
                config
            }
            None => EndpointConfig::default(),
        }
    }
}

/// Streams the proxy lets an agent open at once. An agent opens only its control stream (the
/// proxy opens the data streams), and quinn keeps state for every stream the peer may open,
/// about 80 bytes each: a limit of `max_streams` here cost the proxy 1.3 MiB per idle agent
/// session (tether-bench's scale case, 16,384 streams), this one costs nothing measurable.
const STREAMS_AN_AGENT_MAY_OPEN: usize = 16;

/// The transport parameters of a session with `cfg`'s limits, on the side given by `role`.
///
/// The stream limit is what the *peer* may open: the agent accepts up to `max_streams` (plus
/// headroom, so our own limit refuses first) from the proxy; the proxy accepts only a few.
fn transport_config(
    cfg: &SessionConfig,
    quic: &QuicConfig,
    role: Role,
) -> Result<TransportConfig, QuicError> {
    let peer_streams = match role {
        Role::Agent => cfg.max_streams.saturating_add(STREAM_HEADROOM),
        Role::Proxy => STREAMS_AN_AGENT_MAY_OPEN,
    };
    let streams = u64::try_from(peer_streams).unwrap_or(u64::MAX);
    let idle = IdleTimeout::try_from(quic.idle_timeout).map_err(|_| {
        QuicError::Config(format!("idle timeout {:?} is too long", quic.idle_timeout))
    })?;
    if quic.keep_alive >= quic.idle_timeout {
        return Err(QuicError::Config(format!(
            "keep-alive {:?} must be shorter than the idle timeout {:?}",
            quic.keep_alive, quic.idle_timeout
        )));
    }
    let mut t = TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u64(streams).unwrap_or(VarInt::MAX))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .datagram_receive_buffer_size(None)
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(SEND_WINDOW)
        .keep_alive_interval(Some(quic.keep_alive))
        .max_idle_timeout(Some(idle))
        .initial_rtt(INITIAL_RTT);
    if quic.congestion == CongestionControl::Bbr {
        t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
    }
    Ok(t)
}

/// A non-blocking UDP socket bound to `addr`, with enlarged buffers.
fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        // `[::]` serves IPv4 too, as the TCP listener does.
        let _ = socket.set_only_v6(false);
    }
    size_buffers(&socket);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Asks for [`SOCKET_BUFFER`] each way; says once per process when the kernel gives less.
fn size_buffers(socket: &socket2::Socket) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    // Linux reports twice what it grants (the doubling covers its bookkeeping).
    let recv = socket.recv_buffer_size().unwrap_or(0);
    let send = socket.send_buffer_size().unwrap_or(0);
    if recv < SOCKET_BUFFER || send < SOCKET_BUFFER {
        if !WARNED.swap(true, Ordering::Relaxed) {
            warn!(
                asked = SOCKET_BUFFER,
                recv_buffer = recv,
                send_buffer = send,
                "the kernel capped the UDP socket buffers; QUIC may drop packets at high rates \
                 (raise net.core.rmem_max and net.core.wmem_max)"
            );
        } else {
            debug!(
                asked = SOCKET_BUFFER,
                recv_buffer = recv,
                send_buffer = send,
                "UDP socket buffers capped"
            );
        }
    }
}

/// The first address `addr` (`host:port`) resolves to.
async fn resolve(addr: &str) -> Result<SocketAddr, QuicError> {
    let mut addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|source| QuicError::Resolve {
            addr: addr.into(),
            source,
        })?;
    addrs.next().ok_or_else(|| QuicError::Resolve {
        addr: addr.into(),
        source: io::Error::new(io::ErrorKind::NotFound, "no address"),
    })
}

/// Fails unless the handshake agreed on ALPN `tether/1` (the TLS layer should already have
/// refused any other; this is the transport's own check).
fn check_alpn(conn: &Connection, peer: &str) -> Result<(), SessionError> {
    let protocol = conn
        .handshake_data()
        .and_then(|d| d.downcast::<HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if protocol.as_deref() == Some(crate::ALPN) {
        return Ok(());
    }
    conn.close(VarInt::from_u32(0), b"ALPN tether/1 required");
    Err(SessionError::Handshake {
        peer: peer.into(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "peer did not agree to ALPN tether/1 (got {:?})",
                protocol.map(|p| String::from_utf8_lossy(&p).into_owned())
            ),
        ),
    })
}

/// Dials `addr` over UDP, completes QUIC with TLS 1.3 verifying the server as `server_name`,
/// and starts a session in the agent role (with [`QuicConfig::default`]).
pub async fn connect(
    addr: &str,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
    cfg: &SessionConfig,
) -> Result<Session, SessionError> {
    connect_with(addr, server_name, config, cfg, &QuicConfig::default()).await
}

/// As [`connect`], with explicit QUIC settings.
pub async fn connect_with(
    addr: &str,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
    cfg: &SessionConfig,
    quic: &QuicConfig,
) -> Result<Session, SessionError> {
    let remote = resolve(addr).await?;
    let local: SocketAddr = if remote.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let connect_err = |source| SessionError::Connect {
        addr: addr.into(),
        source,
    };
    let socket = udp_socket(local).map_err(connect_err)?;
    let endpoint = Endpoint::new(
        quic.endpoint_config(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(connect_err)?;
    let crypto = QuicClientConfig::try_from(config).map_err(QuicError::from)?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(Arc::new(transport_config(cfg, quic, Role::Agent)?));
    let connecting = endpoint
        .connect_with(client, remote, server_name)
        .map_err(|e| {
            SessionError::Config(format!("QUIC connection to {addr} as {server_name:?}: {e}"))
        })?;
    let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
        .await
        .map_err(|_| SessionError::Handshake {
            peer: addr.into(),
            source: io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|e| SessionError::Handshake {
            peer: addr.into(),
            source: io::Error::other(e),
        })?;
    check_alpn(&conn, addr)?;
    Ok(start(conn, Some(endpoint), cfg))
}

/// The proxy's QUIC listener for agent sessions.
pub struct QuicListener {
    endpoint: Endpoint,
    session: SessionConfig,
}

impl QuicListener {
    /// Binds UDP `addr` with the given TLS server configuration (which should offer ALPN
    /// `tether/1`); sessions get `session`'s limits and `quic`'s liveness settings.
    pub async fn bind(
        addr: &str,
        config: Arc<rustls::ServerConfig>,
        session: &SessionConfig,
        quic: &QuicConfig,
    ) -> Result<Self, QuicError> {
        let local = resolve(addr).await?;
        let crypto = QuicServerConfig::try_from(config)?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server
            .transport_config(Arc::new(transport_config(session, quic, Role::Proxy)?))
            .max_incoming(MAX_PENDING_HANDSHAKES);
        let socket = udp_socket(local).map_err(|source| QuicError::Bind {
            addr: local.to_string(),
            source,
        })?;
        let endpoint = Endpoint::new(
            quic.endpoint_config(),
            Some(server),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| QuicError::Bind {
            addr: local.to_string(),
            source,
        })?;
        Ok(QuicListener {
            endpoint,
            session: session.clone(),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// The next connection attempt (no handshake yet: call [`QuicIncoming::handshake`] in the
    /// connection's own task); `None` once the listener is closed.
    pub async fn accept(&self) -> Option<QuicIncoming> {
        let incoming = self.endpoint.accept().await?;
        Some(QuicIncoming {
            incoming,
            session: self.session.clone(),
        })
    }

    /// Refuses new connections from now on; sessions already running go on.
    pub fn stop_accepting(&self) {
        self.endpoint.set_server_config(None);
    }
}

/// One connection attempt taken off a [`QuicListener`].
pub struct QuicIncoming {
    incoming: quinn::Incoming,
    session: SessionConfig,
}

impl QuicIncoming {
    /// Where the attempt comes from.
    pub fn peer(&self) -> SocketAddr {
        self.incoming.remote_address()
    }

    /// Completes the handshake (bounded by [`HANDSHAKE_TIMEOUT`]) and starts a session in the
    /// proxy role.
    pub async fn handshake(self) -> Result<Session, SessionError> {
        let peer = self.peer().to_string();
        let handshake_err = |source| SessionError::Handshake {
            peer: peer.clone(),
            source,
        };
        let connecting = self
            .incoming
            .accept()
            .map_err(|e| handshake_err(io::Error::other(e)))?;
        let conn = tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .map_err(|_| handshake_err(io::ErrorKind::TimedOut.into()))?
            .map_err(|e| handshake_err(io::Error::other(e)))?;
        check_alpn(&conn, &peer)?;
        Ok(start(conn, None, &self.session))
    }
}

/// Starts the driver of an established connection and returns its session. `endpoint` is kept
/// alive by the driver when the connection has one of its own (the agent's).
fn start(conn: Connection, endpoint: Option<Endpoint>, cfg: &SessionConfig) -> Session {
    let info = SessionInfo {
        transport: TRANSPORT_NAME,
        peer: conn.remote_address(),
    };
    let (session, parts) = session_parts(info, cfg);
    tokio::spawn(drive(conn, endpoint, parts));
    session
}

/// An open request being served: the requester, and the open waiting for the peer's credit.
type Opening = (
    super::OpenRequest,
    BoxFuture<
        'static,
        Result<
            Result<(quinn::SendStream, quinn::RecvStream), quinn::ConnectionError>,
            tokio::time::error::Elapsed,
        >,
    >,
);

/// The driver: accepts the peer's streams, serves open requests in order, and closes the
/// connection when a handle asks or when nobody can use the session any more. Marks the
/// session closed when the connection ends.
async fn drive(conn: Connection, endpoint: Option<Endpoint>, mut parts: DriverParts) {
    let peer = conn.remote_address();
    let mut opening: Option<Opening> = None;
    let mut handles_gone = false;
    let reason = loop {
        tokio::select! {
            biased;
            _ = parts.closed.cancelled() => break "closed by this end".to_string(),
            e = conn.closed() => break e.to_string(),
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => parts.deliver(Box::new(QuicStream { send, recv })),
                Err(e) => break e.to_string(),
            },
            done = async { (&mut opening.as_mut().expect("guarded").1).await }, if opening.is_some() => {
                let (req, _) = opening.take().expect("guarded");
                let _ = req.send(match done {
                    Ok(Ok((send, recv))) => Ok(Box::new(QuicStream { send, recv })),
                    Ok(Err(_)) => Err(SessionError::Closed),
                    Err(_) => Err(SessionError::Mux(format!(
                        "the peer allowed no further stream within {OPEN_TIMEOUT:?} \
                         (its stream limit is lower than ours)"
                    ))),
                });
            }
            req = parts.open_rx.recv(), if opening.is_none() && !handles_gone => match req {
                Some(req) => {
                    // Usually the peer has credit and the stream is there at once.
                    match conn.open_bi().now_or_never() {
                        Some(Ok((send, recv))) => {
                            // A requester that gave up drops the stream, which closes it.
                            let _ = req.send(Ok(Box::new(QuicStream { send, recv })));
                        }
                        Some(Err(_)) => {
                            let _ = req.send(Err(SessionError::Closed));
                        }
                        None => {
                            let conn = conn.clone();
                            let wait = async move { tokio::time::timeout(OPEN_TIMEOUT, conn.open_bi()).await };
                            opening = Some((req, Box::pin(wait)));
                        }
                    }
                }
                // Every handle is gone: nobody can open streams or close the session, so
                // end it once nobody accepts streams either.
                None => handles_gone = true,
            },
            _ = parts.incoming_tx.closed(), if handles_gone => break "no handle and no acceptor left".to_string(),
        }
    };
    debug!(%peer, %reason, "QUIC connection ended");
    if let Some((req, _)) = opening.take() {
        let _ = req.send(Err(SessionError::Closed));
    }
    parts.closed.cancel();
    parts.open_rx.close();
    while let Ok(req) = parts.open_rx.try_recv() {
        let _ = req.send(Err(SessionError::Closed));
    }
    conn.close(VarInt::from_u32(0), b"session closed");
    if let Some(endpoint) = endpoint {
        // Let the close reach the peer, but never wait long for a peer that is gone.
        drop(conn);
        let _ = tokio::time::timeout(CLOSE_GRACE, endpoint.wait_idle()).await;
    }
}

/// One QUIC bidirectional stream as one `AsyncRead + AsyncWrite`.
struct QuicStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl super::RawStream for QuicStream {}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.recv), cx, buf)
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written data is already the connection's to send.
        Poll::Ready(Ok(()))
    }

    /// Sends FIN; shutting down twice is not an error.
    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // `ClosedStream` means finished or reset already; either way, nothing more to send.
        let _ = self.send.finish();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
pub(super) mod tests;
