//! The kube gateway: `https://FRONT/clusters/{name}/{api path}` forwarded to that member's API
//! server as `/{api path}`, on behalf of a verified caller.
//!
//! Per request: authenticate the caller (client token as `Authorization: Bearer`, or a client
//! certificate signed by the proxy's CA), authorize the cluster against the caller's
//! patterns, strip the caller's credentials and any `Impersonate-*` headers, and send the
//! request as HTTP/1.1 on a tunnel stream whose `StreamOpen` carries the verified identity.
//! The agent adds its own credentials and impersonates the caller.
//!
//! Tunnel streams are kept alive and reused per (cluster, user, groups): each is one HTTP/1.1
//! connection, so a stream serves one request at a time; the pool holds idle ones for
//! [`IDLE_TIMEOUT`]. Bodies stream both ways without buffering, so watches and `logs -f`
//! flow chunk by chunk for as long as they last; upgrades (exec, attach, port-forward over
//! SPDY or WebSocket) get their own stream and are spliced after `101 Switching Protocols`.
//!
//! Failures are Kubernetes `Status` objects: 401, 403, 404, 503, 502.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tracing::{debug, info};

use tether_proto::http::{
    boxed, is_upgrade, remove_hop_by_hop, status_response, strip_caller_credentials, Body,
};
use tether_proto::messages::{target, KubeHttp, StreamRejectCode, Target};
use tether_proto::pool::{ConnPool, SendError};

use crate::callers::Caller;
use crate::front::open_error_status;
use crate::registry::{OpenError, SessionRegistry};
use crate::shards::Shards;

/// How long an idle tunnel stream stays in the pool.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most idle tunnel streams kept per (cluster, identity).
pub const MAX_IDLE_PER_KEY: usize = 64;

/// Which pooled connections a request may use: the agent fixed the identity per stream, so
/// streams are shared by requests of the same cluster, user and groups. Each event loop keeps
/// its own: a pooled stream's HTTP connection task runs on the loop that opened it, and a
/// request from another loop would hand every read and write across threads.
#[derive(Debug, Clone)]
struct PoolKey {
    cluster: String,
    caller: Caller,
    shard: usize,
}

impl PartialEq for PoolKey {
    fn eq(&self, other: &Self) -> bool {
        self.cluster == other.cluster
            && self.shard == other.shard
            && self.caller.user() == other.caller.user()
            && self.caller.groups() == other.caller.groups()
    }
}

impl Eq for PoolKey {}

impl Hash for PoolKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.cluster.hash(state);
        self.shard.hash(state);
        self.caller.user().hash(state);
        self.caller.groups().hash(state);
    }
}

/// The gateway and its pool of tunnel streams.
pub struct Gateway {
    registry: Arc<SessionRegistry>,
    pool: Arc<ConnPool<PoolKey>>,
}

/// Splits `/clusters/{name}/{rest}` into `(name, /{rest})`.
pub fn split_gateway_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/clusters/")?;
    match rest.find('/') {
        Some(i) => Some((&rest[..i], &rest[i..])),
        None => Some((rest, "/")),
    }
}

/// The member's path and query for a gateway request to `cluster`: `/clusters/{cluster}`
/// taken off the front (`/` if nothing is left of the path).
fn member_path(uri: &http::Uri, cluster: &str) -> Result<PathAndQuery, http::uri::InvalidUri> {
    let full = uri.path_and_query().map_or("/", |p| p.as_str());
    let rest = full
        .get("/clusters/".len() + cluster.len()..)
        .unwrap_or_default();
    if rest.starts_with('/') {
        PathAndQuery::try_from(rest)
    } else {
        PathAndQuery::try_from(format!("/{rest}"))
    }
}

impl Gateway {
    pub fn new(registry: Arc<SessionRegistry>) -> Arc<Self> {
        Arc::new(Gateway {
            registry,
            pool: ConnPool::new(IDLE_TIMEOUT, MAX_IDLE_PER_KEY),
        })
    }

    /// Serves one gateway request to `cluster` (its path starts `/clusters/{cluster}`) for an
    /// authenticated `caller`.
    pub async fn handle(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        caller: Caller,
        cluster: &str,
    ) -> Response<Body> {
        if let Err(e) = tether_proto::name::validate_cluster_name(cluster) {
            return status_response(StatusCode::NOT_FOUND, &e);
        }
        if !caller.may_reach(cluster) {
            self.registry
                .metrics()
                .caller_auth_failure("cluster_not_allowed");
            info!(%cluster, user = %caller.user(), "gateway request refused: cluster not covered");
            return status_response(
                StatusCode::FORBIDDEN,
                &format!(
                    "user {:?} may not reach cluster {cluster:?} through tether (allowed: {})",
                    caller.user(),
                    caller.clusters().join(",")
                ),
            );
        }
        let upgrade = is_upgrade(req.headers());
        let caller_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        // The request as the member will see it.
        let path = match member_path(req.uri(), cluster) {
            Ok(p) => p,
            Err(e) => return status_response(StatusCode::BAD_REQUEST, &format!("bad path: {e}")),
        };
        let (mut parts, body) = req.into_parts();
        parts.uri = path.into();
        parts.version = http::Version::HTTP_11;
        strip_caller_credentials(&mut parts.headers);
        remove_hop_by_hop(&mut parts.headers);
        if let Ok(host) = HeaderValue::from_str(cluster) {
            parts.headers.insert(header::HOST, host);
        }
        let request = Request::from_parts(parts, boxed(body));
        let key = PoolKey {
            cluster: cluster.to_string(),
            caller,
            shard: Shards::current(),
        };

        // An upgrade always gets a stream of its own.
        let sent = self
            .pool
            .send(&key, upgrade, request, || self.connect(&key))
            .await;
        let (sender, resp) = match sent {
            Ok(sent) => sent,
            Err(SendError::Connect(resp)) => return resp,
            Err(SendError::Http(e)) => {
                info!(%cluster, error = %e, "gateway request failed in the tunnel");
                return status_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("the tunnel to cluster {cluster:?} failed: {e}"),
                );
            }
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return tether_proto::http::finish_upgrade(caller_upgrade, resp);
        }
        self.pool.relay(key, sender, resp, !upgrade)
    }

    /// Opens a tunnel stream carrying the caller's identity and starts HTTP/1.1 on it.
    async fn connect(&self, key: &PoolKey) -> Result<SendRequest<Body>, Response<Body>> {
        let target = Target {
            target: Some(target::Target::KubeHttp(KubeHttp {
                user: key.caller.user().to_string(),
                groups: key.caller.groups().to_vec(),
            })),
        };
        let request_id = tether_proto::token::random_id();
        let tunnel = match self.registry.open(&key.cluster, target, &request_id).await {
            Ok(t) => t,
            Err(e) => {
                info!(cluster = %key.cluster, user = %key.caller.user(), %request_id, error = %e, "gateway could not open a tunnel stream");
                return Err(status_response(gateway_status(&e), &e.to_string()));
            }
        };
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(tunnel.into_io()))
            .await
            .map_err(|e| {
                status_response(
                    StatusCode::BAD_GATEWAY,
                    &format!("tunnel HTTP handshake: {e}"),
                )
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "gateway tunnel connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// The status for a failure to open a gateway stream: as for CONNECT, except that an agent
/// without API server credentials is a 502 (the agent cannot reach its API server as asked).
fn gateway_status(e: &OpenError) -> StatusCode {
    match e {
        OpenError::Rejected {
            code: StreamRejectCode::Unsupported,
            ..
        } => StatusCode::BAD_GATEWAY,
        other => open_error_status(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        assert_eq!(
            split_gateway_path("/clusters/a/api/v1"),
            Some(("a", "/api/v1"))
        );
        assert_eq!(split_gateway_path("/clusters/a"), Some(("a", "/")));
        assert_eq!(split_gateway_path("/clusters/a/"), Some(("a", "/")));
        assert_eq!(split_gateway_path("/api"), None);
    }

    #[test]
    fn member_paths() {
        let member = |uri: &str, cluster: &str| {
            member_path(&uri.parse().unwrap(), cluster)
                .unwrap()
                .to_string()
        };
        assert_eq!(member("/clusters/a/api/v1?watch=1", "a"), "/api/v1?watch=1");
        assert_eq!(member("/clusters/a", "a"), "/");
        assert_eq!(member("/clusters/a?x=1", "a"), "/?x=1");
        assert_eq!(member("/clusters/abc/", "abc"), "/");
    }
}
