//! Serving the data streams the proxy opens: read `StreamOpen`, check the target against what
//! this agent allows, dial it, answer `StreamAccept` or `StreamReject`, then splice bytes.
//!
//! The agent dials only its API server and the `--allow` list; the proxy cannot widen that.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use tether_proto::frame::{read_message, write_message, DEFAULT_MAX_FRAME};
use tether_proto::messages::{target, StreamOpen, StreamRejectCode, StreamReply};
use tether_proto::transport::{Incoming, MuxStream};

/// Time the proxy has to send `StreamOpen` on a new stream.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to connect to a target.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a stream handler needs.
pub struct StreamContext {
    pub upstream: String,
    pub allow: Vec<String>,
    /// Cancelled on SIGTERM: new streams are refused with `DRAINING`, and idle gateway
    /// connections close once their current request is done.
    pub draining: CancellationToken,
    /// The kube gateway handler, when the agent has credentials for its API server.
    pub kube: Option<Arc<crate::kube::KubeUpstream>>,
}

/// Where an accepted stream goes.
enum Route {
    /// Raw bytes to `host:port`.
    Dial(String),
    /// HTTP served by the kube handler, on behalf of this caller.
    Kube(
        Arc<crate::kube::KubeUpstream>,
        tether_proto::messages::KubeHttp,
    ),
}

impl StreamContext {
    /// Where a target goes, or why it is refused.
    fn route(&self, open: &StreamOpen) -> Result<Route, (StreamRejectCode, String)> {
        match open.target.as_ref().and_then(|t| t.target.as_ref()) {
            Some(target::Target::KubeHttp(who)) => match &self.kube {
                Some(k) => Ok(Route::Kube(k.clone(), who.clone())),
                None => Err((
                    StreamRejectCode::Unsupported,
                    "this agent has no credentials for its API server, so it cannot serve the \
                     kube gateway: run it in a pod, or set --upstream-ca-file and \
                     --upstream-token-file (or --upstream-client-cert/--upstream-client-key)"
                        .into(),
                )),
            },
            _ => self.resolve(open).map(Route::Dial),
        }
    }

    /// The `host:port` a raw target resolves to, or why it is refused.
    fn resolve(&self, open: &StreamOpen) -> Result<String, (StreamRejectCode, String)> {
        match open.target.as_ref().and_then(|t| t.target.as_ref()) {
            Some(target::Target::ApiServer(_)) => Ok(self.upstream.clone()),
            Some(target::Target::Address(addr)) => {
                let wanted = addr.to_ascii_lowercase();
                if wanted == self.upstream.to_ascii_lowercase() || self.allow.contains(&wanted) {
                    Ok(wanted)
                } else {
                    Err((
                        StreamRejectCode::NotAllowed,
                        format!("target {addr} is not on this agent's allowlist (add it with --allow on the agent)"),
                    ))
                }
            }
            Some(target::Target::KubeHttp(_)) => Err((
                StreamRejectCode::Unsupported,
                "this agent does not serve the kube gateway".into(),
            )),
            None => Err((
                StreamRejectCode::ProtocolError,
                "StreamOpen has no target".into(),
            )),
        }
    }
}

/// Serves streams until the session ends, each in a task tracked by `tracker`.
///
/// The session's driver starts each stream's task itself ([`Incoming::serve`]), so a new
/// stream costs one task wakeup, not two.
pub async fn serve(incoming: Incoming, ctx: Arc<StreamContext>, tracker: TaskTracker) {
    incoming
        .serve(move |stream| {
            tracker.spawn(handle(stream, ctx.clone()));
        })
        .await
}

async fn handle(mut stream: MuxStream, ctx: Arc<StreamContext>) {
    let open: StreamOpen = match tokio::time::timeout(
        OPEN_TIMEOUT,
        read_message(&mut stream, DEFAULT_MAX_FRAME),
    )
    .await
    {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            debug!(error = %e, "stream without a valid StreamOpen");
            return refuse(stream, StreamRejectCode::ProtocolError, e.to_string()).await;
        }
        Err(_) => return,
    };
    let request_id = open.request_id.clone();
    if ctx.draining.is_cancelled() {
        return refuse(
            stream,
            StreamRejectCode::Draining,
            "agent is shutting down".into(),
        )
        .await;
    }
    let addr = match ctx.route(&open) {
        Ok(Route::Dial(a)) => a,
        Ok(Route::Kube(kube, who)) => {
            if write_message(&mut stream, &StreamReply::accept())
                .await
                .is_ok()
            {
                kube.serve(stream, who, ctx.draining.clone()).await;
            }
            return;
        }
        Err((code, reason)) => {
            info!(request_id = %request_id, target = %open.target.as_ref().map(|t| t.describe()).unwrap_or_default(), %reason, "stream refused");
            return refuse(stream, code, reason).await;
        }
    };
    let upstream = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return unreachable(stream, &request_id, &addr, &e.to_string()).await,
        Err(_) => return unreachable(stream, &request_id, &addr, "timed out").await,
    };
    let _ = upstream.set_nodelay(true);
    if write_message(&mut stream, &StreamReply::accept())
        .await
        .is_err()
    {
        return;
    }
    let result = tether_proto::splice::splice_chunks(upstream, stream).await;
    debug!(request_id = %request_id, %addr, ?result, "stream ended");
}

async fn unreachable(stream: MuxStream, request_id: &str, addr: &str, why: &str) {
    let reason = format!("agent could not connect to {addr}: {why}");
    info!(request_id = %request_id, %reason, "stream refused");
    refuse(stream, StreamRejectCode::Unreachable, reason).await;
}

/// Sends `StreamReject` and half-closes, so the reply arrives whatever the transport does
/// with a stream dropped while open (HTTP/2 discards data in flight on a reset).
async fn refuse(mut stream: MuxStream, code: StreamRejectCode, reason: String) {
    let _ = write_message(&mut stream, &StreamReply::reject(code, reason)).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut stream).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::messages::Target;

    fn ctx() -> StreamContext {
        StreamContext {
            upstream: "10.0.0.1:443".into(),
            allow: vec!["db.local:5432".into()],
            draining: CancellationToken::new(),
            kube: None,
        }
    }

    fn open(t: Target) -> StreamOpen {
        StreamOpen {
            target: Some(t),
            request_id: "r".into(),
        }
    }

    #[test]
    fn allowlist() {
        let c = ctx();
        assert_eq!(
            c.resolve(&open(Target::api_server())).unwrap(),
            "10.0.0.1:443"
        );
        assert_eq!(
            c.resolve(&open(Target::address("DB.local:5432"))).unwrap(),
            "db.local:5432"
        );
        let (code, reason) = c.resolve(&open(Target::address("evil:22"))).unwrap_err();
        assert_eq!(code, StreamRejectCode::NotAllowed);
        assert!(reason.contains("--allow"));
        assert!(c.resolve(&StreamOpen::default()).is_err());
    }
}
