//! What both ends of the kube gateway share: Kubernetes `Status` error bodies, and header
//! hygiene for requests forwarded on behalf of a caller.
//!
//! The caller's own credentials (`Authorization`, `Proxy-Authorization`) and any
//! `Impersonate-*` header it sent are never forwarded: the proxy strips them, and the agent
//! strips them again before adding its own credentials and the verified identity. Hop-by-hop
//! headers are dropped, except that an upgrade request keeps `Connection: Upgrade` and
//! `Upgrade` so exec, attach and port-forward work.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// The body type of gateway responses: a stream of bytes that may fail.
pub type Body = BoxBody<Bytes, BoxError>;
/// Error type inside [`Body`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Wraps any body into a [`Body`].
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed()
}

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    boxed(Full::new(bytes.into()))
}

/// The Kubernetes `reason` for an HTTP status.
pub fn status_reason(code: StatusCode) -> &'static str {
    match code.as_u16() {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        409 => "AlreadyExists",
        429 => "TooManyRequests",
        500 => "InternalError",
        502 | 503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Unknown",
    }
}

/// A Kubernetes `Status` object (`kind: Status`, `status: Failure`) as JSON.
pub fn status_json(code: StatusCode, message: &str) -> String {
    serde_json::json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": status_reason(code),
        "code": code.as_u16(),
    })
    .to_string()
}

/// A response carrying a Kubernetes `Status`, so kubectl prints `message`.
pub fn status_response(code: StatusCode, message: &str) -> Response<Body> {
    let mut resp = Response::new(full(status_json(code, message)));
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Whether a request asks for a protocol upgrade (exec, attach, port-forward: SPDY or
/// WebSocket).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// `Proxy-Connection`: legacy, but still sent by some clients.
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// `Keep-Alive`.
const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Removes hop-by-hop headers (RFC 9110 §7.6.1: `Connection` and those it names,
/// `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, and the legacy
/// `Proxy-Connection`). For an upgrade, keeps `Connection: Upgrade` and `Upgrade`.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let upgrade = is_upgrade(headers);
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .filter(|n| !(upgrade && n == header::UPGRADE))
            .collect();
        for n in named {
            headers.remove(n);
        }
        headers.remove(header::CONNECTION);
    }
    let kept_upgrade = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    for h in [
        PROXY_CONNECTION,
        KEEP_ALIVE,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(h);
    }
    if let Some(u) = kept_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, u);
    }
}

/// Completes an upgrade that the far side accepted with `101 Switching Protocols`: once both
/// the caller's and the far side's connections have switched, bytes are spliced both ways
/// (in a task of their own) until either side closes. Returns the `101` to send the caller.
pub fn finish_upgrade(
    caller: Option<hyper::upgrade::OnUpgrade>,
    mut switched: Response<hyper::body::Incoming>,
) -> Response<Body> {
    if let Some(caller) = caller {
        let far = hyper::upgrade::on(&mut switched);
        tokio::spawn(async move {
            match tokio::try_join!(caller, far) {
                Ok((c, f)) => {
                    let r =
                        crate::splice::splice(TokioIo::new(c), TokioIo::new(f), None, None).await;
                    tracing::debug!(?r, "upgraded stream ended");
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    let (parts, _) = switched.into_parts();
    Response::from_parts(parts, full(Bytes::new()))
}

/// Why a one-shot [`api_get`] failed (before any HTTP status).
#[derive(Debug, thiserror::Error)]
pub enum ApiGetError {
    #[error("{0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("invalid server name {0:?}")]
    ServerName(String),
    #[error("connecting: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("timed out after {0:?}")]
    Timeout(std::time::Duration),
}

/// One bounded HTTPS `GET path` to a Kubernetes API server at `addr` (verified as
/// `server_name` against `ca_pem`) with a bearer token: status and body (at most 1 MiB).
pub async fn api_get(
    addr: &str,
    server_name: &str,
    ca_pem: &str,
    token: &str,
    path: &str,
    timeout: std::time::Duration,
) -> Result<(StatusCode, Bytes), ApiGetError> {
    let config = crate::tls::client_config(ca_pem, &[b"http/1.1"], None)?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(|_| ApiGetError::ServerName(server_name.into()))?;
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await?;
        let http_err = |e: &dyn std::fmt::Display| ApiGetError::Http(e.to_string());
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| http_err(&e))?;
        let driver = tokio::spawn(conn);
        let mut auth =
            HeaderValue::from_str(&format!("Bearer {}", token.trim())).map_err(|e| http_err(&e))?;
        auth.set_sensitive(true);
        let req = http::Request::get(path)
            .header(header::HOST, server_name)
            .header(header::AUTHORIZATION, auth)
            .header(header::ACCEPT, "application/json")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| http_err(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| http_err(&e))?;
        let status = resp.status();
        let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| http_err(&e))?
            .to_bytes();
        driver.abort();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ApiGetError::Timeout(timeout))?
}

/// Removes the caller's credentials and any impersonation it asked for.
pub fn strip_caller_credentials(headers: &mut HeaderMap) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(header::PROXY_AUTHORIZATION);
    let impersonation: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for k in impersonation {
        headers.remove(k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_kubernetes_shaped() {
        let v: serde_json::Value =
            serde_json::from_str(&status_json(StatusCode::FORBIDDEN, "no")).unwrap();
        assert_eq!(v["kind"], "Status");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "Forbidden");
        assert_eq!(v["code"], 403);
        assert_eq!(v["message"], "no");
    }

    #[test]
    fn strips_credentials_and_impersonation() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer x".parse().unwrap());
        h.insert("impersonate-user", "admin".parse().unwrap());
        h.insert("impersonate-group", "system:masters".parse().unwrap());
        h.insert("impersonate-extra-scopes", "x".parse().unwrap());
        h.insert("accept", "application/json".parse().unwrap());
        strip_caller_credentials(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }

    #[test]
    fn hop_by_hop_but_upgrade_kept() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("accept", "*/*".parse().unwrap());
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);

        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert("upgrade", "SPDY/3.1".parse().unwrap());
        assert!(is_upgrade(&h));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.get("upgrade").unwrap(), "SPDY/3.1");
        assert_eq!(h.get("connection").unwrap(), "Upgrade");
    }
}
