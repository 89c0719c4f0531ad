//! Caller authentication on the front: who is asking, and may they reach this cluster.
//!
//! Callers present a client token minted by `tether-proxy token client`:
//! - on CONNECT, in `Proxy-Authorization` as `Bearer TOKEN`, or `Basic` with the token as
//!   the password (so a kubeconfig `proxy-url` of `https://user:TOKEN@host:port` works);
//! - on the gateway, in `Authorization: Bearer TOKEN`, or as a client certificate signed by
//!   the proxy's CA (CN = user, O = group, OU `clusters=PATTERNS`).
//!
//! The token's cluster patterns decide which clusters the caller may reach.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine;
use tether_proto::token::{Claims, TokenError, TokenKind, TokenVerifier};

/// A verified caller: a user, its groups, and the cluster patterns it may reach. Cheap to
/// clone: a token caller shares the verifier's cached claims, so a request copies nothing.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A client token's claims.
    Token(Arc<Claims>),
    /// A client certificate signed by the proxy's CA.
    Certificate(Arc<CertificateIdentity>),
}

/// The identity in a client certificate: CN = user, O = groups, OU `clusters=...`.
#[derive(Debug)]
pub struct CertificateIdentity {
    pub user: String,
    pub groups: Vec<String>,
    pub clusters: Vec<String>,
}

impl Caller {
    /// The caller's user name.
    pub fn user(&self) -> &str {
        match self {
            Caller::Token(c) => &c.sub,
            Caller::Certificate(c) => &c.user,
        }
    }

    /// The caller's groups.
    pub fn groups(&self) -> &[String] {
        match self {
            Caller::Token(c) => &c.groups,
            Caller::Certificate(c) => &c.groups,
        }
    }

    /// The cluster patterns the caller may reach.
    pub fn clusters(&self) -> &[String] {
        match self {
            Caller::Token(c) => &c.clusters,
            Caller::Certificate(c) => &c.clusters,
        }
    }

    /// The identity in a client certificate the front's TLS layer already verified against
    /// the proxy's CA: CN = user, O = groups, OU `clusters=...` = cluster patterns.
    pub fn from_certificate(der: &[u8]) -> Option<Self> {
        let info = tether_proto::tls::certificate_info(der).ok()?;
        let user = info.common_name.filter(|u| !u.is_empty())?;
        let clusters = info
            .organizational_units
            .iter()
            .filter_map(|ou| ou.strip_prefix(tether_proto::tls::CLUSTERS_OU_PREFIX))
            .flat_map(|list| list.split(','))
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        Some(Caller::Certificate(Arc::new(CertificateIdentity {
            user,
            groups: info.organizations,
            clusters,
        })))
    }

    pub fn may_reach(&self, cluster: &str) -> bool {
        self.clusters()
            .iter()
            .any(|p| tether_proto::token::pattern_matches(p, cluster))
    }
}

/// Why a caller was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum CallerAuthError {
    #[error("no credentials: send a client token (Bearer, or Basic with the token as password)")]
    Missing,
    #[error("unsupported authorization scheme: use Bearer or Basic")]
    Scheme,
    #[error("client token refused: {0}")]
    Token(#[from] TokenError),
}

impl CallerAuthError {
    pub fn label(&self) -> &'static str {
        match self {
            CallerAuthError::Missing => "missing",
            CallerAuthError::Scheme => "scheme",
            CallerAuthError::Token(e) => e.label(),
        }
    }
}

/// Extracts the token from an authorization header value (`Bearer T` or `Basic b64(user:T)`).
pub fn token_from_header(value: Option<&str>) -> Result<Cow<'_, str>, CallerAuthError> {
    let value = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(CallerAuthError::Missing)?;
    let (scheme, rest) = value.split_once(' ').ok_or(CallerAuthError::Scheme)?;
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Ok(Cow::Borrowed(rest));
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .map_err(|_| {
                CallerAuthError::Token(TokenError::Malformed("Basic credentials are not base64"))
            })?;
        let text = String::from_utf8(decoded).map_err(|_| {
            CallerAuthError::Token(TokenError::Malformed("Basic credentials are not UTF-8"))
        })?;
        // The password is the token; the user name is informational.
        let token = text.split_once(':').map(|(_, p)| p).unwrap_or(&text);
        return Ok(Cow::Owned(token.to_string()));
    }
    Err(CallerAuthError::Scheme)
}

/// Authenticates a caller from an authorization header value.
pub fn authenticate(
    verifier: &TokenVerifier,
    header: Option<&str>,
) -> Result<Caller, CallerAuthError> {
    let token = token_from_header(header)?;
    let claims = verifier.verify_shared(&token, TokenKind::Client)?;
    Ok(Caller::Token(claims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::token::SigningKey;

    #[test]
    fn bearer_and_basic() {
        let key = SigningKey::generate().unwrap();
        let t =
            key.mint(&Claims::client("alice", vec!["dev".into()], vec!["a".into()], None).unwrap());
        let v = key.verifier();
        let c = authenticate(&v, Some(&format!("Bearer {t}"))).unwrap();
        assert_eq!(c.user(), "alice");
        assert!(c.may_reach("a") && !c.may_reach("b"));
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("alice:{t}"));
        assert!(authenticate(&v, Some(&format!("Basic {basic}"))).is_ok());
        assert!(matches!(
            authenticate(&v, None),
            Err(CallerAuthError::Missing)
        ));
        assert!(matches!(
            authenticate(&v, Some("Digest x")),
            Err(CallerAuthError::Scheme)
        ));
        assert!(matches!(
            authenticate(&v, Some("Bearer nope")),
            Err(CallerAuthError::Token(_))
        ));
        // An agent token is not a client token.
        let agent = key.mint(&Claims::agent("a", None).unwrap());
        assert!(authenticate(&v, Some(&format!("Bearer {agent}"))).is_err());
    }
}
