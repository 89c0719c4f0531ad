//! TLS 1.3 over TCP, with a stream multiplexer on top: tether's own, yamux or HTTP/2.
//!
//! ALPN picks the multiplexer ([`Mux`]): `tether/2` is tether's own ([`super::tether_mux`]),
//! `tether/1` is yamux, `h2` is HTTP/2 (which also looks like ordinary HTTPS to egress
//! middleboxes). The proxy offers all three ([`AGENT_ALPNS`]); the agent offers the one it is
//! configured for ([`Mux::agent_alpns`]), through its client configuration's ALPN list.
//!
//! The agent dials with [`connect`]; the proxy binds a [`TlsListener`], accepts TCP
//! connections quickly, and completes each handshake in the connection's own task with
//! [`TlsListener::handshake`], so one slow or hostile client never holds up the others.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::{Role, Session, SessionConfig, SessionError, SessionInfo, SlowLinkHook};

/// A session's TLS connection on the agent's side, and on the proxy's.
type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;
type ServerStream = tokio_rustls::server::TlsStream<TcpStream>;

/// ALPN of tether's own multiplexer ([`super::tether_mux`]).
pub const TETHER_MUX_ALPN: &[u8] = b"tether/2";

/// The stream multiplexer running over a TLS connection, chosen by ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mux {
    /// tether's own multiplexer, ALPN `tether/2`.
    Tether,
    /// yamux, ALPN `tether/1`.
    Yamux,
    /// HTTP/2, ALPN `h2`: the agent serves, the proxy opens streams.
    H2,
}

/// ALPN protocols the proxy's agent listener offers, in its order of preference.
pub const AGENT_ALPNS: &[&[u8]] = &[TETHER_MUX_ALPN, crate::ALPN, b"h2"];

impl Mux {
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Mux::Tether => TETHER_MUX_ALPN,
            Mux::Yamux => crate::ALPN,
            Mux::H2 => b"h2",
        }
    }

    /// What an agent configured for this multiplexer offers in its handshake. tether's own
    /// multiplexer is offered with yamux after it, so a proxy older than `tether/2` still
    /// accepts the agent (and the session runs yamux).
    pub fn agent_alpns(self) -> Vec<Vec<u8>> {
        match self {
            Mux::Tether => vec![TETHER_MUX_ALPN.to_vec(), crate::ALPN.to_vec()],
            other => vec![other.alpn().to_vec()],
        }
    }

    /// The multiplexer an ALPN protocol names; `None` (no ALPN) means yamux.
    pub fn from_alpn(alpn: Option<&[u8]>) -> Option<Mux> {
        match alpn {
            None => Some(Mux::Yamux),
            Some(TETHER_MUX_ALPN) => Some(Mux::Tether),
            Some(p) if p == crate::ALPN => Some(Mux::Yamux),
            Some(b"h2") => Some(Mux::H2),
            Some(_) => None,
        }
    }

    /// Name shown in status pages and metrics.
    pub fn transport_name(self) -> &'static str {
        match self {
            Mux::Tether => "tls+tether",
            Mux::Yamux => "tls+yamux",
            Mux::H2 => "tls+h2",
        }
    }

    fn start<T>(
        self,
        io: T,
        role: Role,
        peer: SocketAddr,
        cfg: &SessionConfig,
        on_slow_link: Option<SlowLinkHook<T>>,
    ) -> Session
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let info = SessionInfo {
            transport: self.transport_name(),
            peer,
        };
        match self {
            Mux::Tether => super::tether_mux::start_with(io, role, info, cfg, on_slow_link),
            Mux::Yamux => super::yamux::start(io, role, info, cfg),
            Mux::H2 => super::h2::start(io, role, info, cfg),
        }
    }
}

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes a session's socket holds that TCP has not sent yet (`TCP_NOTSENT_LOWAT`).
///
/// Without a bound the kernel queues as much as its send buffer takes, up to megabytes,
/// first come first served: on a slow or lossy link a small frame written behind a bulk
/// stream waits for all of it, whatever order the multiplexer would have chosen. With the
/// bound, what waits beyond it stays with the multiplexer, which takes turns between streams
/// and (tether's) shrinks its outbox when the link drains slowly. On a link with 40 ms round
/// trips, 1% loss and TCP on CUBIC, small exchanges behind a bulk stream went from about 2.2 s
/// to about 1 s over tether's multiplexer with both; a 32 KiB bound gave 0.77 s but cost 5–10%
/// of bulk on fast links (`benches/RESULTS.md`, session 7).
pub const UNSENT_LOWAT: u32 = 128 * 1024;

/// The unsent bound while tether's multiplexer finds the link slow (its outbox limit has
/// fallen to [`super::tether_mux::SLOW_LINK_OUTBOX`]: batches took over 20 ms to hand over,
/// a link under about 3 MB/s). There the bound's cost in system calls does not matter, and a
/// small frame sent ahead of queued bulk waits behind 16 KiB of the kernel's instead of
/// 128 KiB (and behind one TLS record in rustls, [`SLOW_TLS_BUFFER`], instead of 64 KiB): on
/// a link with 40 ms round trips, 1% loss and TCP on CUBIC, small exchanges beside a bulk
/// stream went from 0.69–0.83 s to 0.32–0.41 s (p50, `benches/RESULTS.md`, session 8). Back
/// to [`UNSENT_LOWAT`] when the outbox grows again. The other multiplexers keep
/// [`UNSENT_LOWAT`].
pub const SLOW_UNSENT_LOWAT: u32 = 16 * 1024;

/// Encrypted bytes rustls holds for the socket at most (its own default).
pub const TLS_BUFFER: usize = 64 * 1024;

/// Encrypted bytes rustls holds for the socket at most while the link is slow (see
/// [`SLOW_UNSENT_LOWAT`]): one full record (rustls takes as much plaintext as there is room
/// left, so a limit just above a record's size would add a small second record).
pub const SLOW_TLS_BUFFER: usize = 16 * 1024;

/// Dials `addr`, completes TLS 1.3 verifying the server as `server_name`, and starts a session
/// in the agent role.
pub async fn connect(
    addr: &str,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
    cfg: &SessionConfig,
) -> Result<Session, SessionError> {
    let tcp = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| SessionError::Connect {
            addr: addr.into(),
            source: std::io::ErrorKind::TimedOut.into(),
        })?
        .map_err(|source| SessionError::Connect {
            addr: addr.into(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    set_unsent_lowat(&tcp, UNSENT_LOWAT);
    let peer = tcp.peer_addr().map_err(|source| SessionError::Connect {
        addr: addr.into(),
        source,
    })?;
    let name = ServerName::try_from(server_name.to_string())
        .map_err(|e| SessionError::Config(format!("invalid server name {server_name:?}: {e}")))?;
    let tls = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| SessionError::Handshake {
        peer: addr.into(),
        source: std::io::ErrorKind::TimedOut.into(),
    })?
    .map_err(|source| SessionError::Handshake {
        peer: addr.into(),
        source,
    })?;
    let mux = mux_of(tls.get_ref().1.alpn_protocol(), addr)?;
    let on_slow_link: SlowLinkHook<_> = Box::new(|tls: &mut ClientStream, slow| {
        let (tcp, conn) = tls.get_mut();
        follow_pace(tcp, slow, |limit| conn.set_buffer_limit(limit));
    });
    Ok(mux.start(tls, Role::Agent, peer, cfg, Some(on_slow_link)))
}

/// The proxy's TLS listener for agent sessions.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: TlsAcceptor,
}

impl TlsListener {
    /// Binds `addr` with the given TLS server configuration (which should offer ALPN `tether/1`).
    pub async fn bind(addr: &str, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        Ok(TlsListener {
            tcp: TcpListener::bind(addr).await?,
            acceptor: TlsAcceptor::from(config),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Accepts the next TCP connection (no TLS yet: call [`handshake`](Self::handshake) in the
    /// connection's own task).
    pub async fn accept(&self) -> std::io::Result<(TcpStream, SocketAddr)> {
        let (tcp, peer) = self.tcp.accept().await?;
        let _ = tcp.set_nodelay(true);
        set_unsent_lowat(&tcp, UNSENT_LOWAT);
        Ok((tcp, peer))
    }

    /// A cloneable handshaker, for use inside per-connection tasks.
    pub fn handshaker(&self) -> TlsHandshaker {
        TlsHandshaker {
            acceptor: self.acceptor.clone(),
        }
    }
}

/// The multiplexer the handshake agreed on.
fn mux_of(alpn: Option<&[u8]>, peer: &str) -> Result<Mux, SessionError> {
    Mux::from_alpn(alpn).ok_or_else(|| SessionError::Handshake {
        peer: peer.into(),
        source: std::io::Error::other(format!(
            "peer negotiated ALPN {:?}, which is not a tether multiplexer",
            String::from_utf8_lossy(alpn.unwrap_or_default())
        )),
    })
}

/// Completes server-side handshakes and starts sessions in the proxy role.
#[derive(Clone)]
pub struct TlsHandshaker {
    acceptor: TlsAcceptor,
}

impl TlsHandshaker {
    /// Completes TLS (bounded by [`HANDSHAKE_TIMEOUT`]) and starts the multiplexer.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        cfg: &SessionConfig,
    ) -> Result<Session, SessionError> {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp))
            .await
            .map_err(|_| SessionError::Handshake {
                peer: peer.to_string(),
                source: std::io::ErrorKind::TimedOut.into(),
            })?
            .map_err(|source| SessionError::Handshake {
                peer: peer.to_string(),
                source,
            })?;
        let mux = mux_of(tls.get_ref().1.alpn_protocol(), &peer.to_string())?;
        let on_slow_link: SlowLinkHook<_> = Box::new(|tls: &mut ServerStream, slow| {
            let (tcp, conn) = tls.get_mut();
            follow_pace(tcp, slow, |limit| conn.set_buffer_limit(limit));
        });
        Ok(mux.start(tls, Role::Proxy, peer, cfg, Some(on_slow_link)))
    }
}

/// What a session's connection does when its multiplexer finds the link slow, or fast
/// again: the socket's unsent bound and rustls's buffer (set through `set_tls_buffer`) go to
/// [`SLOW_UNSENT_LOWAT`] and [`SLOW_TLS_BUFFER`], or back to [`UNSENT_LOWAT`] and
/// [`TLS_BUFFER`].
fn follow_pace(tcp: &TcpStream, slow: bool, set_tls_buffer: impl FnOnce(Option<usize>)) {
    let (unsent, buffer) = if slow {
        (SLOW_UNSENT_LOWAT, SLOW_TLS_BUFFER)
    } else {
        (UNSENT_LOWAT, TLS_BUFFER)
    };
    tracing::debug!(
        slow,
        unsent_bound = unsent,
        tls_buffer = buffer,
        "session link pace changed"
    );
    set_tls_buffer(Some(buffer));
    set_unsent_lowat(tcp, unsent);
}

/// Sets `TCP_NOTSENT_LOWAT` on a session's socket (Linux; elsewhere the kernel's default
/// stays).
#[cfg(target_os = "linux")]
fn set_unsent_lowat(tcp: &TcpStream, bytes: u32) {
    use std::os::fd::AsRawFd;
    let lowat = bytes as libc::c_int;
    // SAFETY: the descriptor of a socket borrowed for the call, and a c_int option value of
    // the size given.
    let r = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&lowat as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "TCP_NOTSENT_LOWAT not set");
    }
}

#[cfg(not(target_os = "linux"))]
fn set_unsent_lowat(_: &TcpStream, _: u32) {}
