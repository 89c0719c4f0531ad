//! The front: the HTTPS port host-side callers use.
//!
//! - `CONNECT {cluster}:443` opens a raw byte stream to that cluster's API server (TLS stays
//!   end to end between the caller and the member). Answers: 407 without or with bad
//!   credentials, 403 for a cluster the token does not cover, 404 for a cluster never seen,
//!   503 when no agent is connected, 502 when the agent could not reach its target, each with
//!   a one-line reason.
//! - `/clusters/{name}/...` is the kube gateway ([`crate::gateway`]): the caller authenticates
//!   with a client token (`Authorization: Bearer`) or a client certificate.
//! - Any other request gets a 404 `Status` naming what the front serves.
//!
//! Limits: connections are capped, TLS handshakes and request headers must arrive in time,
//! and header size is bounded.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tether_proto::http::{full, status_response, Body};
use tether_proto::messages::{StreamRejectCode, Target};
use tether_proto::token::TokenVerifier;

use crate::callers::{authenticate, Caller};
use crate::gateway::{split_gateway_path, Gateway};
use crate::registry::{OpenError, SessionRegistry};
use crate::shards::Shards;

/// Most front connections open at once; more wait in the kernel's backlog.
pub const MAX_FRONT_CONNECTIONS: usize = 16_384;
/// Time for a caller to complete TLS and send request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request head accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// What the front needs from the rest of the proxy.
#[derive(Clone)]
pub struct Front {
    pub registry: Arc<SessionRegistry>,
    pub verifier: Arc<std::sync::RwLock<TokenVerifier>>,
    pub gateway: Arc<Gateway>,
}

/// Serves the front on `listener` with TLS until `shutdown`, dealing the connections to the
/// shards in turn.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    front: Front,
    shards: Arc<Shards>,
    shutdown: CancellationToken,
) {
    let limit = Arc::new(Semaphore::new(MAX_FRONT_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
            _ = shutdown.cancelled() => return,
        };
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accepting front connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let (tls, front) = (tls.clone(), front.clone());
        shards.run_with(shards.next_front(), tcp, move |tcp| async move {
            let _permit = permit;
            let stream = match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    info!(%peer, error = %e, "front TLS handshake failed");
                    return;
                }
                Err(_) => {
                    info!(%peer, "front TLS handshake timed out");
                    return;
                }
            };
            // A client certificate, if any, was verified against the proxy's CA by TLS.
            let cert_caller = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|der| Caller::from_certificate(der));
            let service = hyper::service::service_fn(move |req| {
                let (front, cert_caller) = (front.clone(), cert_caller.clone());
                async move { Ok::<_, Infallible>(front.handle(req, peer, cert_caller).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES);
            builder
                .http2()
                .max_header_list_size(MAX_HEADER_BYTES as u32);
            if let Err(e) = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%peer, error = %e, "front connection ended with an error");
            }
        });
    }
}

impl Front {
    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        cert_caller: Option<Caller>,
    ) -> Response<Body> {
        if req.method() == Method::CONNECT {
            return self.connect(req, peer).await;
        }
        let Some((cluster, _)) = split_gateway_path(req.uri().path()) else {
            return status_response(
                StatusCode::NOT_FOUND,
                "this port serves /clusters/{cluster}/... (the kube gateway) and CONNECT {cluster}:443",
            );
        };
        let cluster = cluster.to_string();
        let started = std::time::Instant::now();
        // A bearer token wins over a certificate, as with kube-apiserver.
        let header = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller = match (header, cert_caller) {
            (None, Some(c)) => Ok(c),
            (header, _) => {
                let verifier = self.verifier.read().expect("verifier lock");
                authenticate(&verifier, header)
            }
        };
        let caller = match caller {
            Ok(c) => c,
            Err(e) => {
                self.registry.metrics().caller_auth_failure(e.label());
                info!(%peer, %cluster, reason = %e, "gateway request refused: not authenticated");
                let mut resp = status_response(StatusCode::UNAUTHORIZED, &format!("tether: {e}"));
                resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"tether\""),
                );
                return self.count_gateway(&cluster, started, resp);
            }
        };
        let resp = self.gateway.handle(req, caller, &cluster).await;
        self.count_gateway(&cluster, started, resp)
    }

    /// Counts a gateway request in the metrics (time to the response head). Names no agent
    /// ever connected with share one label, so callers cannot grow the label set.
    fn count_gateway(
        &self,
        cluster: &str,
        started: std::time::Instant,
        resp: Response<Body>,
    ) -> Response<Body> {
        let label = if self.registry.is_known(cluster) {
            cluster
        } else {
            "_unknown"
        };
        self.registry
            .metrics()
            .gateway_request(label, resp.status().as_u16(), started.elapsed());
        resp
    }

    /// `CONNECT {cluster}:443`: authenticate, authorize, open a tunnel stream, then splice.
    async fn connect(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let Some(authority) = req.uri().authority().cloned() else {
            return text(
                StatusCode::BAD_REQUEST,
                "CONNECT needs a target of the form {cluster}:443",
            );
        };
        let cluster = authority.host().to_string();
        if authority.port_u16().unwrap_or(443) != 443 {
            return text(
                StatusCode::BAD_REQUEST,
                "CONNECT reaches a cluster's API server at {cluster}:443; other ports are not served",
            );
        }
        let header = req
            .headers()
            .get(http::header::PROXY_AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let caller = {
            let verifier = self.verifier.read().expect("verifier lock");
            authenticate(&verifier, header)
        };
        let caller = match caller {
            Ok(c) => c,
            Err(e) => {
                self.registry.metrics().caller_auth_failure(e.label());
                info!(%peer, %cluster, reason = %e, "CONNECT refused: not authenticated");
                let mut resp = text(StatusCode::PROXY_AUTHENTICATION_REQUIRED, &e.to_string());
                resp.headers_mut().insert(
                    http::header::PROXY_AUTHENTICATE,
                    http::HeaderValue::from_static("Basic realm=\"tether\""),
                );
                return resp;
            }
        };
        if !caller.may_reach(&cluster) {
            self.registry
                .metrics()
                .caller_auth_failure("cluster_not_allowed");
            info!(%peer, %cluster, user = %caller.user(), "CONNECT refused: cluster not covered by token");
            return text(
                StatusCode::FORBIDDEN,
                &format!(
                    "user {:?} may not reach cluster {cluster:?} (token covers: {})",
                    caller.user(),
                    caller.clusters().join(",")
                ),
            );
        }
        let request_id = tether_proto::token::random_id();
        let tunnel = match self
            .registry
            .open(&cluster, Target::api_server(), &request_id)
            .await
        {
            Ok(t) => t,
            Err(e) => {
                info!(%peer, %cluster, user = %caller.user(), request_id = %request_id, error = %e, "CONNECT failed");
                return text(open_error_status(&e), &e.to_string());
            }
        };
        let user = caller.user().to_string();
        tokio::spawn(async move {
            match hyper::upgrade::on(&mut req).await {
                Ok(upgraded) => {
                    let result = tunnel.splice_with(TokioIo::new(upgraded)).await;
                    tracing::debug!(%cluster, %user, request_id = %request_id, ?result, "CONNECT stream ended");
                }
                Err(e) => info!(%peer, error = %e, "CONNECT upgrade failed"),
            }
        });
        Response::new(full(Bytes::new()))
    }
}

/// The HTTP status for a failure to open a tunnel stream.
pub fn open_error_status(e: &OpenError) -> StatusCode {
    match e {
        OpenError::UnknownCluster { .. } => StatusCode::NOT_FOUND,
        OpenError::NoAgent { .. } => StatusCode::SERVICE_UNAVAILABLE,
        OpenError::Rejected { code, .. } => match code {
            StreamRejectCode::NotAllowed => StatusCode::FORBIDDEN,
            StreamRejectCode::Draining => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_GATEWAY,
        },
        OpenError::Session { .. } | OpenError::Protocol { .. } => StatusCode::BAD_GATEWAY,
        OpenError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
    }
}

/// A short plain-text response: one line, the reason.
fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{msg}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
