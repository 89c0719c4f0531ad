//! The kube handler: serves the gateway's HTTP on a tunnel stream and forwards each request to
//! the member's API server with the agent's own credentials.
//!
//! The proxy has verified the caller and sends its identity in `StreamOpen` (never in HTTP
//! headers). For each request the agent removes any credentials and impersonation headers that
//! came along, adds its own credential (the ServiceAccount token, re-read as the kubelet
//! rotates it, or a token file or client certificate outside a cluster), and — in the default
//! `impersonate` mode — `Impersonate-User` and one `Impersonate-Group` per group, so the
//! member's RBAC decides what the caller may do. The agent's credential never crosses the
//! tunnel.
//!
//! Responses stream back as they arrive (watches, `logs -f`); upgrades (exec, attach,
//! port-forward over SPDY or WebSocket) are passed through: after `101 Switching Protocols`
//! bytes are spliced both ways until either side closes.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use tether_proto::http::{
    boxed, is_upgrade, remove_hop_by_hop, status_response, strip_caller_credentials, Body,
};
use tether_proto::messages::KubeHttp;
use tether_proto::pool::{ConnPool, SendError};
use tether_proto::transport::MuxStream;

/// `Impersonate-User`.
const IMPERSONATE_USER: HeaderName = HeaderName::from_static("impersonate-user");
/// `Impersonate-Group`.
const IMPERSONATE_GROUP: HeaderName = HeaderName::from_static("impersonate-group");
/// How long a connection to the API server may take (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an idle connection to the API server is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Most idle connections to the API server kept.
const MAX_IDLE: usize = 256;

/// How the agent presents callers to its API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IdentityMode {
    /// Impersonate the verified caller (member RBAC applies to the caller).
    Impersonate,
    /// Send every request as the agent itself (tower-like; the agent's RBAC applies).
    Agent,
}

/// How the agent authenticates to its API server.
#[derive(Debug, Clone)]
pub struct KubeCredentials {
    /// CA bundle (PEM) that signed the API server's certificate.
    pub ca_pem: String,
    /// A bearer token file, re-read every minute (the kubelet rotates ServiceAccount tokens).
    pub token_file: Option<PathBuf>,
    /// A client certificate and key (PEM) instead of, or besides, a token.
    pub client_identity: Option<(String, String)>,
}

/// How often a token file is re-read.
const TOKEN_REFRESH: Duration = Duration::from_secs(60);

/// A bearer token read from a file, refreshed now and then.
struct TokenFile {
    path: PathBuf,
    cached: RwLock<(Option<HeaderValue>, Instant)>,
}

impl TokenFile {
    fn new(path: PathBuf) -> Self {
        TokenFile {
            path,
            cached: RwLock::new((None, Instant::now())),
        }
    }

    /// The `Authorization` value, re-reading the file when the cached one is old.
    fn header(&self) -> Result<HeaderValue> {
        {
            let c = self.cached.read().expect("token lock");
            if let Some(v) = &c.0 {
                if c.1.elapsed() < TOKEN_REFRESH {
                    return Ok(v.clone());
                }
            }
        }
        let token = std::fs::read_to_string(&self.path)
            .with_context(|| format!("reading the API server token {}", self.path.display()))?;
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.trim()))
            .context("the API server token is not a valid header value")?;
        value.set_sensitive(true);
        *self.cached.write().expect("token lock") = (Some(value.clone()), Instant::now());
        Ok(value)
    }
}

/// The member's API server, as the kube handler reaches it: HTTP/1.1 over TLS, on pooled
/// keep-alive connections (an upgrade gets a connection of its own).
pub struct KubeUpstream {
    /// `host:port`
    addr: String,
    /// `https://host:port`, for messages.
    base: String,
    /// The `Host` header of every request.
    host: HeaderValue,
    server_name: ServerName<'static>,
    tls: TlsConnector,
    pool: Arc<ConnPool<()>>,
    token: Option<TokenFile>,
    identity: IdentityMode,
}

impl KubeUpstream {
    /// `upstream` is `host:port` of the API server.
    pub fn new(upstream: &str, creds: KubeCredentials, identity: IdentityMode) -> Result<Self> {
        let identity_pem = creds
            .client_identity
            .as_ref()
            .map(|(c, k)| (c.as_str(), k.as_str()));
        let tls = tether_proto::tls::client_config(&creds.ca_pem, &[b"http/1.1"], identity_pem)
            .context("TLS configuration for the API server")?;
        let authority: http::uri::Authority = upstream
            .parse()
            .with_context(|| format!("API server address {upstream:?} is not host:port"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|_| anyhow!("API server host {host:?} is not a valid TLS server name"))?;
        Ok(KubeUpstream {
            addr: upstream.to_string(),
            base: format!("https://{upstream}"),
            host: HeaderValue::from_str(upstream).context("API server address")?,
            server_name,
            tls: TlsConnector::from(Arc::new(tls)),
            pool: ConnPool::new(IDLE_TIMEOUT, MAX_IDLE),
            token: creds.token_file.map(TokenFile::new),
            identity,
        })
    }

    /// A new HTTP/1.1 connection to the API server.
    async fn connect(&self) -> Result<SendRequest<Body>> {
        let dial = async {
            let tcp = TcpStream::connect(&self.addr).await?;
            tcp.set_nodelay(true)?;
            self.tls.connect(self.server_name.clone(), tcp).await
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, dial)
            .await
            .map_err(|_| anyhow!("no connection within {CONNECT_TIMEOUT:?}"))??;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "API server connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Serves HTTP/1.1 on a tunnel stream until the proxy closes it, or, once `drain` is
    /// cancelled, until the request in flight is done.
    pub async fn serve(
        self: Arc<Self>,
        stream: MuxStream,
        who: KubeHttp,
        drain: CancellationToken,
    ) {
        let who = Arc::new(who);
        let service = hyper::service::service_fn(move |req| {
            let (this, who) = (self.clone(), who.clone());
            async move { Ok::<_, Infallible>(this.forward(req, &who).await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            debug!(error = %e, "gateway stream ended with an error");
        }
    }

    /// Forwards one request to the API server.
    async fn forward(&self, mut req: Request<Incoming>, who: &KubeHttp) -> Response<Body> {
        let upgrade = is_upgrade(req.headers());
        let caller_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // Origin form (`/path?query`) for the API server; the proxy only ever sends that.
        let path = parts.uri.path_and_query().cloned();
        parts.uri = match path {
            Some(p) if p.as_str().starts_with('/') => p.into(),
            _ => return status_response(StatusCode::BAD_REQUEST, "bad request path"),
        };
        parts.version = http::Version::HTTP_11;
        strip_caller_credentials(&mut parts.headers);
        remove_hop_by_hop(&mut parts.headers);
        parts.headers.insert(header::HOST, self.host.clone());
        if let Some(token) = &self.token {
            match token.header() {
                Ok(v) => {
                    parts.headers.insert(header::AUTHORIZATION, v);
                }
                Err(e) => {
                    return status_response(
                        StatusCode::BAD_GATEWAY,
                        &format!("agent has no credential for its API server: {e:#}"),
                    )
                }
            }
        }
        if self.identity == IdentityMode::Impersonate {
            let Ok(user) = HeaderValue::from_str(&who.user) else {
                return status_response(
                    StatusCode::BAD_REQUEST,
                    "caller user name is not a valid header value",
                );
            };
            parts.headers.insert(IMPERSONATE_USER, user);
            for g in &who.groups {
                if let Ok(v) = HeaderValue::from_str(g) {
                    parts.headers.append(IMPERSONATE_GROUP, v);
                }
            }
        }
        let request = Request::from_parts(parts, boxed(body));
        let sent = self
            .pool
            .send(&(), upgrade, request, || self.connect())
            .await;
        let (sender, resp) = match sent {
            Ok(sent) => sent,
            Err(e) => {
                let e = match e {
                    SendError::Connect(e) => format!("{e:#}"),
                    SendError::Http(e) => e.to_string(),
                };
                info!(upstream = %self.base, error = %e, "API server unreachable");
                return status_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("agent could not reach its API server at {}: {e}", self.base),
                );
            }
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return tether_proto::http::finish_upgrade(caller_upgrade, resp);
        }
        self.pool.relay((), sender, resp, !upgrade)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> KubeCredentials {
        let ca = tether_proto::tls::CertificateAuthority::generate("test ca").unwrap();
        KubeCredentials {
            ca_pem: ca.cert_pem().to_string(),
            token_file: None,
            client_identity: None,
        }
    }

    #[tokio::test]
    async fn api_server_addresses() {
        for (addr, name) in [
            ("10.96.0.1:443", "10.96.0.1"),
            ("[::1]:6443", "::1"),
            ("kubernetes.default.svc:443", "kubernetes.default.svc"),
        ] {
            let k = KubeUpstream::new(addr, creds(), IdentityMode::Impersonate).unwrap();
            assert_eq!(k.host, addr);
            assert_eq!(k.server_name.to_str(), name);
        }
        for bad in ["no port at all/", "bad host name!:443"] {
            assert!(
                KubeUpstream::new(bad, creds(), IdentityMode::Agent).is_err(),
                "{bad}"
            );
        }
    }
}
