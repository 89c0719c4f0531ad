//! TLS 1.3 over TCP, with a stream multiplexer (yamux) on top.
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

use super::{Role, Session, SessionConfig, SessionError, SessionInfo};

/// Name shown for this transport in status pages and metrics.
pub const TRANSPORT_NAME: &str = "tls+yamux";

/// Longest a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    let info = SessionInfo {
        transport: TRANSPORT_NAME,
        peer,
    };
    Ok(super::yamux::start(tls, Role::Agent, info, cfg))
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
        Ok((tcp, peer))
    }

    /// A cloneable handshaker, for use inside per-connection tasks.
    pub fn handshaker(&self) -> TlsHandshaker {
        TlsHandshaker {
            acceptor: self.acceptor.clone(),
        }
    }
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
        let info = SessionInfo {
            transport: TRANSPORT_NAME,
            peer,
        };
        Ok(super::yamux::start(tls, Role::Proxy, info, cfg))
    }
}
