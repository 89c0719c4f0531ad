//! The ways a client reaches the upstream: directly, through the proxy's `--expose` listener,
//! through a TLS connection to the front and `CONNECT`, or (HTTP only) directly over TLS and
//! through the front's kube gateway.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// A byte stream to the upstream, whatever the route.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// Longest a single dial (TCP connect, TLS handshake, CONNECT answer) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// How a case reaches the upstream.
#[derive(Clone)]
pub enum Route {
    /// Plain TCP straight to the upstream.
    Direct(SocketAddr),
    /// Plain TCP to the proxy's `--expose` listener, spliced through the tunnel.
    Expose(SocketAddr),
    /// Plain TCP to a peer tunnel's public port (rathole, `ssh -R`, ferrotunnel; see
    /// `peers.rs`): the same topology as [`Route::Expose`]. Named after the peer.
    Peer(&'static str, SocketAddr),
    /// TLS to the proxy's front, then `CONNECT cluster:443` with a client token.
    Connect(Arc<ConnectRoute>),
    /// TLS straight to the upstream's HTTPS mode (server name `127.0.0.1`).
    DirectTls(SocketAddr, TlsConnector),
    /// TLS to the proxy's front; HTTP requests go to `/clusters/{cluster}/...` with the client
    /// token as a bearer token (see [`Route::http_request`]).
    Gateway(Arc<ConnectRoute>),
}

/// What [`Route::Connect`] and [`Route::Gateway`] need.
pub struct ConnectRoute {
    pub front: SocketAddr,
    pub cluster: String,
    pub token: String,
    pub tls: TlsConnector,
}

impl Route {
    /// Short name used in tables and JSON.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Direct(_) => "direct",
            Route::Expose(_) => "expose",
            Route::Peer(name, _) => name,
            Route::Connect(_) => "connect",
            Route::DirectTls(..) => "direct-tls",
            Route::Gateway(_) => "gateway",
        }
    }

    /// The HTTP/1.1 request for `GET /{path}` on this route: through the gateway the path
    /// goes under `/clusters/{cluster}/` and the client token is added.
    pub fn http_request(&self, path: &str) -> Vec<u8> {
        match self {
            Route::Gateway(g) => format!(
                "GET /clusters/{cl}/{path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {tok}\r\n\
                 User-Agent: tether-bench\r\n\r\n",
                cl = g.cluster,
                tok = g.token
            ),
            _ => format!("GET /{path} HTTP/1.1\r\nHost: upstream\r\nUser-Agent: tether-bench\r\n\r\n"),
        }
        .into_bytes()
    }

    /// Opens one connection, bounded by [`DIAL_TIMEOUT`].
    pub async fn dial(&self) -> Result<BoxIo> {
        tokio::time::timeout(DIAL_TIMEOUT, self.dial_inner())
            .await
            .with_context(|| format!("dialing via {} timed out", self.name()))?
    }

    async fn dial_inner(&self) -> Result<BoxIo> {
        match self {
            Route::Direct(addr) | Route::Expose(addr) | Route::Peer(_, addr) => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                Ok(Box::new(tcp))
            }
            Route::Connect(c) => {
                let tcp = TcpStream::connect(c.front).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                let mut tls = c.tls.connect(name, tcp).await.context("TLS to the front")?;
                let req = format!(
                    "CONNECT {cl}:443 HTTP/1.1\r\nHost: {cl}:443\r\nProxy-Authorization: Bearer {tok}\r\n\r\n",
                    cl = c.cluster,
                    tok = c.token
                );
                tls.write_all(req.as_bytes()).await?;
                tls.flush().await?;
                // Read the answer head byte by byte so no tunnel byte is consumed.
                let mut head = Vec::with_capacity(256);
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if head.len() > 16 * 1024 || tls.read(&mut b).await? == 0 {
                        bail!("front closed or sent an oversized answer to CONNECT");
                    }
                    head.push(b[0]);
                }
                let status = String::from_utf8_lossy(&head);
                let line = status.lines().next().unwrap_or_default();
                if !line.starts_with("HTTP/1.1 200") {
                    bail!("CONNECT answered {line:?}");
                }
                Ok(Box::new(tls))
            }
            Route::DirectTls(addr, tls) => Ok(Box::new(tls_dial(*addr, "127.0.0.1", tls).await?)),
            Route::Gateway(g) => Ok(Box::new(tls_dial(g.front, "localhost", &g.tls).await?)),
        }
    }
}

/// TCP to `addr` (no Nagle), then a TLS handshake for `name`.
async fn tls_dial(
    addr: SocketAddr,
    name: &'static str,
    tls: &TlsConnector,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from(name)?;
    tls.connect(name, tcp)
        .await
        .with_context(|| format!("TLS to {addr}"))
}

/// Opens an echo connection and waits for the echoed mode byte: the stream is open end to end.
pub async fn dial_echo(route: &Route) -> Result<BoxIo> {
    let mut io = route.dial().await?;
    io.write_all(&[crate::upstream::MODE_ECHO]).await?;
    let mut b = [0u8; 1];
    tokio::time::timeout(DIAL_TIMEOUT, io.read_exact(&mut b))
        .await
        .context("waiting for the echo greeting timed out")??;
    if b[0] != crate::upstream::MODE_ECHO {
        bail!("unexpected echo greeting {:?}", b[0]);
    }
    Ok(io)
}
