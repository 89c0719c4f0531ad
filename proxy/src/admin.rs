//! The admin port (plain HTTP): health, readiness, cluster status and metrics.
//!
//! - `/healthz`: 200 while the process serves requests.
//! - `/readyz`: 200 once every listener is bound, 503 (with the reason) before that and while
//!   shutting down.
//! - `/api/v1/clusters`: JSON array of cluster status (see [`ClusterStatus`]).
//! - `/metrics`: Prometheus text.
//! - `/api/v1/publish-address`: the address agents dial, or why there is none yet (JSON, see
//!   [`PublishStatus`](crate::publish::PublishStatus)).
//! - `/api/v1/clusters/{name}/check[?namespace=NS&skipNamespaceCheck=true]`: the connectivity
//!   check through the tunnel ([`crate::check`]); 200 when it passed, 503 when a step failed.
//!
//! [`ClusterStatus`]: crate::registry::ClusterStatus

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::registry::SessionRegistry;

/// Shared state the admin endpoints read.
#[derive(Clone)]
pub struct Admin {
    pub registry: Arc<SessionRegistry>,
    pub ready: Arc<AtomicBool>,
    pub shutdown: CancellationToken,
    /// The publish address (for `/readyz` while `auto` waits, and for `tether-proxy manifest`).
    pub publish: Arc<crate::publish::Publish>,
}

/// Serves the admin port until `shutdown` (it keeps answering during the drain, so
/// `/readyz` can say the proxy is going away).
pub async fn serve(listener: TcpListener, admin: Admin, stop: CancellationToken) {
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move {
                    if let Some(cluster) = check_path(req.uri().path()) {
                        let cluster = cluster.to_string();
                        return Ok::<_, Infallible>(admin.check(&cluster, req.uri().query()).await);
                    }
                    Ok::<_, Infallible>(admin.handle(req))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

impl Admin {
    fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match req.uri().path() {
            "/healthz" => respond(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                if self.shutdown.is_cancelled() {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "shutting down\n".into(),
                    )
                } else if let Some(why) = self
                    .ready
                    .load(Ordering::Relaxed)
                    .then(|| self.publish.waiting())
                    .flatten()
                {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("no publish address yet: {why}\n"),
                    )
                } else if self.ready.load(Ordering::Relaxed) {
                    respond(StatusCode::OK, "text/plain", "ok\n".into())
                } else {
                    respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "listeners not bound yet\n".into(),
                    )
                }
            }
            "/api/v1/clusters" => respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&self.registry.status()).expect("status serializes"),
            ),
            "/api/v1/publish-address" => respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&self.publish.status()).expect("status serializes"),
            ),
            "/metrics" => respond(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.registry.metrics().render(),
            ),
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /healthz, /readyz, /api/v1/clusters, /api/v1/clusters/NAME/check, \
                 /api/v1/publish-address, /metrics\n"
                    .into(),
            ),
        }
    }
}

/// `/api/v1/clusters/{name}/check` → the cluster name.
fn check_path(path: &str) -> Option<&str> {
    path.strip_prefix("/api/v1/clusters/")?
        .strip_suffix("/check")
        .filter(|c| !c.is_empty() && !c.contains('/'))
}

impl Admin {
    /// The connectivity check of one cluster.
    async fn check(&self, cluster: &str, query: Option<&str>) -> Response<Full<Bytes>> {
        if let Err(e) = tether_proto::name::validate_cluster_name(cluster) {
            return respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n"));
        }
        let opts = match crate::check::parse_query(query) {
            Ok(o) => o,
            Err(e) => return respond(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        };
        let report = crate::check::run(&self.registry, cluster, &opts).await;
        let status = if report.passed {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        respond(
            status,
            "application/json",
            serde_json::to_string_pretty(&report).expect("report serializes"),
        )
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}
