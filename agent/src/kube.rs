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

use anyhow::{Context, Result};
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use tether_proto::http::{
    boxed, is_upgrade, remove_hop_by_hop, status_response, strip_caller_credentials, Body,
};
use tether_proto::messages::KubeHttp;
use tether_proto::transport::MuxStream;

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

/// The member's API server, as the kube handler reaches it.
pub struct KubeUpstream {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    /// `https://host:port`
    base: String,
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
        // No ALPN here: the connector sets it (and refuses a config that already has one).
        let tls = tether_proto::tls::client_config(&creds.ca_pem, &[], identity_pem)
            .context("TLS configuration for the API server")?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(256)
            .build(connector);
        Ok(KubeUpstream {
            client,
            base: format!("https://{upstream}"),
            token: creds.token_file.map(TokenFile::new),
            identity,
        })
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
        let path = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let uri: Uri = match format!("{}{}", self.base, path).parse() {
            Ok(u) => u,
            Err(e) => {
                return status_response(StatusCode::BAD_REQUEST, &format!("bad request path: {e}"))
            }
        };
        let (mut parts, body) = req.into_parts();
        parts.uri = uri;
        parts.version = http::Version::HTTP_11;
        strip_caller_credentials(&mut parts.headers);
        remove_hop_by_hop(&mut parts.headers);
        parts.headers.remove(header::HOST);
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
            parts.headers.insert("impersonate-user", user);
            for g in &who.groups {
                if let Ok(v) = HeaderValue::from_str(g) {
                    parts.headers.append("impersonate-group", v);
                }
            }
        }
        let request = Request::from_parts(parts, boxed(body));
        let resp = match self.client.request(request).await {
            Ok(r) => r,
            Err(e) => {
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
        let (mut parts, body) = resp.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, boxed(body))
    }
}
