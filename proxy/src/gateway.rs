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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tracing::{debug, info};

use tether_proto::http::{
    boxed, is_upgrade, remove_hop_by_hop, status_response, strip_caller_credentials, Body,
};
use tether_proto::messages::{target, KubeHttp, StreamRejectCode, Target};

use crate::callers::Caller;
use crate::front::open_error_status;
use crate::registry::{OpenError, SessionRegistry};

/// How long an idle tunnel stream stays in the pool.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most idle tunnel streams kept per (cluster, identity).
pub const MAX_IDLE_PER_KEY: usize = 64;

/// Which pooled connections a request may use: the agent fixed the identity per stream.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    cluster: String,
    user: String,
    groups: Vec<String>,
}

/// Idle HTTP/1.1 connections on tunnel streams, with when each was parked.
type IdlePool = HashMap<PoolKey, Vec<(SendRequest<Body>, Instant)>>;

/// The gateway and its pool of tunnel streams.
pub struct Gateway {
    registry: Arc<SessionRegistry>,
    idle: Mutex<IdlePool>,
}

/// Splits `/clusters/{name}/{rest}` into `(name, /{rest})`.
pub fn split_gateway_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/clusters/")?;
    match rest.find('/') {
        Some(i) => Some((&rest[..i], &rest[i..])),
        None => Some((rest, "/")),
    }
}

impl Gateway {
    pub fn new(registry: Arc<SessionRegistry>) -> Arc<Self> {
        let gw = Arc::new(Gateway {
            registry,
            idle: Mutex::new(HashMap::new()),
        });
        // Sweep idle streams so they do not hold agent resources forever.
        let weak = Arc::downgrade(&gw);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TIMEOUT / 2);
            loop {
                tick.tick().await;
                let Some(gw) = weak.upgrade() else { return };
                let mut idle = gw.idle.lock().expect("pool lock");
                for conns in idle.values_mut() {
                    conns.retain(|(s, at)| !s.is_closed() && at.elapsed() < IDLE_TIMEOUT);
                }
                idle.retain(|_, conns| !conns.is_empty());
            }
        });
        gw
    }

    /// Serves one gateway request for an authenticated `caller`.
    pub async fn handle(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        caller: Caller,
        cluster: &str,
        path: &str,
    ) -> Response<Body> {
        if let Err(e) = tether_proto::name::validate_cluster_name(cluster) {
            return status_response(StatusCode::NOT_FOUND, &e);
        }
        if !caller.may_reach(cluster) {
            self.registry
                .metrics()
                .caller_auth_failure("cluster_not_allowed");
            info!(%cluster, user = %caller.user, "gateway request refused: cluster not covered");
            return status_response(
                StatusCode::FORBIDDEN,
                &format!(
                    "user {:?} may not reach cluster {cluster:?} through tether (allowed: {})",
                    caller.user,
                    caller.clusters.join(",")
                ),
            );
        }
        let key = PoolKey {
            cluster: cluster.to_string(),
            user: caller.user.clone(),
            groups: caller.groups.clone(),
        };
        let upgrade = is_upgrade(req.headers());
        let caller_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

        // The request as the member will see it.
        let query = req
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let (mut parts, body) = req.into_parts();
        parts.uri = match format!("{path}{query}").parse() {
            Ok(u) => u,
            Err(e) => return status_response(StatusCode::BAD_REQUEST, &format!("bad path: {e}")),
        };
        parts.version = http::Version::HTTP_11;
        strip_caller_credentials(&mut parts.headers);
        remove_hop_by_hop(&mut parts.headers);
        if let Ok(host) = HeaderValue::from_str(cluster) {
            parts.headers.insert(header::HOST, host);
        }
        let mut request = Request::from_parts(parts, boxed(body));

        // A pooled stream may have died since it was parked: hyper hands the request back
        // when it was not sent, and we try once more on a fresh stream.
        let mut fresh = upgrade;
        let (mut sender, resp) = loop {
            let mut sender = match if fresh { None } else { self.checkout(&key) } {
                Some(s) => s,
                None => match self.connect(&key).await {
                    Ok(s) => s,
                    Err(resp) => return resp,
                },
            };
            match sender.try_send_request(request).await {
                Ok(resp) => break (sender, resp),
                Err(mut e) => match e.take_message() {
                    Some(req) if !fresh => {
                        request = req;
                        fresh = true;
                    }
                    _ => {
                        info!(%cluster, error = %e.error(), "gateway request failed in the tunnel");
                        return status_response(
                            StatusCode::BAD_GATEWAY,
                            &format!("the tunnel to cluster {cluster:?} failed: {}", e.error()),
                        );
                    }
                },
            }
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            return tether_proto::http::finish_upgrade(caller_upgrade, resp);
        }
        if !upgrade {
            // Park the stream again once this response's body is done.
            let (gw, key) = (self.clone(), key);
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    gw.checkin(key, sender);
                }
            });
        }
        let (mut parts, body) = resp.into_parts();
        remove_hop_by_hop(&mut parts.headers);
        Response::from_parts(parts, boxed(body))
    }

    fn checkout(&self, key: &PoolKey) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().expect("pool lock");
        let conns = idle.get_mut(key)?;
        while let Some((s, at)) = conns.pop() {
            if s.is_ready() && at.elapsed() < IDLE_TIMEOUT {
                return Some(s);
            }
        }
        None
    }

    fn checkin(&self, key: PoolKey, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().expect("pool lock");
        let conns = idle.entry(key).or_default();
        if conns.len() < MAX_IDLE_PER_KEY {
            conns.push((sender, Instant::now()));
        }
    }

    /// Opens a tunnel stream carrying the caller's identity and starts HTTP/1.1 on it.
    async fn connect(&self, key: &PoolKey) -> Result<SendRequest<Body>, Response<Body>> {
        let target = Target {
            target: Some(target::Target::KubeHttp(KubeHttp {
                user: key.user.clone(),
                groups: key.groups.clone(),
            })),
        };
        let request_id = tether_proto::token::random_id();
        let tunnel = match self.registry.open(&key.cluster, target, &request_id).await {
            Ok(t) => t,
            Err(e) => {
                info!(cluster = %key.cluster, user = %key.user, %request_id, error = %e, "gateway could not open a tunnel stream");
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
}
