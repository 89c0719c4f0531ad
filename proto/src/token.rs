//! Agent and client tokens, signed by the proxy's Ed25519 signing key.
//!
//! A token is a compact JWT (`header.claims.signature`, base64url without padding) with
//! `alg: EdDSA`, so standard tools can decode it. Claims say what kind of token it is:
//!
//! - an **agent token** is scoped to exactly one cluster name: a member holding it cannot pose
//!   as any other cluster;
//! - a **client token** names a user, its groups, and the cluster patterns it may reach
//!   (`*` matches any run of characters: `prod-*`, `*`).
//!
//! Every token has a unique id (`jti`) for revocation, an issue time, and an optional expiry.
//! Verification checks the signature first (Ed25519 verification does not branch on secret
//! data), then expiry, kind and revocation. The signing key file is PKCS#8 PEM, written 0600.
//!
//! Callers of the kube gateway send their token with every request, and an Ed25519
//! verification costs tens of microseconds, more than the rest of a request's work in the
//! proxy. So a [`TokenVerifier`] remembers the claims of tokens whose signature it has checked
//! ([`VERIFIED_CACHE`] of them at most, keyed by the token's SHA-256): a repeated token skips
//! only the signature check; expiry, kind and revocation are checked on every call.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::name::validate_cluster_name;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Most tokens whose verified claims a [`TokenVerifier`] keeps; when full, it starts over.
/// Only tokens with a good signature get in, so a flood of forged tokens cannot fill it.
pub const VERIFIED_CACHE: usize = 4096;

/// Which role a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenKind {
    Agent,
    Client,
}

/// The signed contents of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Always `tether`.
    pub iss: String,
    pub kind: TokenKind,
    /// Agent tokens: the cluster name. Client tokens: the user name.
    pub sub: String,
    /// Client tokens: the user's groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// Client tokens: cluster name patterns the token may reach.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch; `None` never expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Unique token id, for revocation.
    pub jti: String,
}

impl Claims {
    /// Claims for an agent token of `cluster`.
    pub fn agent(cluster: &str, ttl: Option<Duration>) -> Result<Self, TokenError> {
        validate_cluster_name(cluster).map_err(TokenError::InvalidClaims)?;
        Ok(Self::new(
            TokenKind::Agent,
            cluster,
            Vec::new(),
            Vec::new(),
            ttl,
        ))
    }

    /// Claims for a client token of `user` in `groups`, reaching clusters matching `clusters`.
    pub fn client(
        user: &str,
        groups: Vec<String>,
        clusters: Vec<String>,
        ttl: Option<Duration>,
    ) -> Result<Self, TokenError> {
        if user.is_empty() {
            return Err(TokenError::InvalidClaims(
                "a client token needs a user name".into(),
            ));
        }
        if clusters.is_empty() {
            return Err(TokenError::InvalidClaims(
                "a client token needs at least one cluster pattern (use '*' for all)".into(),
            ));
        }
        for p in &clusters {
            validate_pattern(p).map_err(TokenError::InvalidClaims)?;
        }
        Ok(Self::new(TokenKind::Client, user, groups, clusters, ttl))
    }

    fn new(
        kind: TokenKind,
        sub: &str,
        groups: Vec<String>,
        clusters: Vec<String>,
        ttl: Option<Duration>,
    ) -> Self {
        let now = unix_now();
        Claims {
            iss: "tether".into(),
            kind,
            sub: sub.into(),
            groups,
            clusters,
            iat: now,
            exp: ttl.map(|t| now + t.as_secs().max(1)),
            jti: random_id(),
        }
    }

    /// Whether a client token's patterns cover `cluster`.
    pub fn allows_cluster(&self, cluster: &str) -> bool {
        self.clusters.iter().any(|p| pattern_matches(p, cluster))
    }
}

/// Why a token was refused or could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed ({0}); mint a new one with `tether-proxy token`")]
    Malformed(&'static str),
    #[error("token signature does not verify: it was not signed by this proxy's signing key")]
    BadSignature,
    #[error(
        "token expired at {expired_at} (unix seconds); mint a new one with `tether-proxy token`"
    )]
    Expired { expired_at: u64 },
    #[error("token {jti} has been revoked")]
    Revoked { jti: String },
    #[error("this is a {found:?} token, but a {expected:?} token is needed here")]
    WrongKind {
        expected: TokenKind,
        found: TokenKind,
    },
    #[error("{0}")]
    InvalidClaims(String),
    #[error("signing key: {0}")]
    Key(String),
}

impl TokenError {
    /// A short stable label for metrics (`bad_signature`, `expired`, ...).
    pub fn label(&self) -> &'static str {
        match self {
            TokenError::Malformed(_) => "malformed",
            TokenError::BadSignature => "bad_signature",
            TokenError::Expired { .. } => "expired",
            TokenError::Revoked { .. } => "revoked",
            TokenError::WrongKind { .. } => "wrong_kind",
            TokenError::InvalidClaims(_) => "invalid_claims",
            TokenError::Key(_) => "key",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

/// The proxy's signing key: mints tokens and verifies them.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
    kid: String,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Generates a fresh key.
    pub fn generate() -> Result<Self, TokenError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| TokenError::Key("could not generate an Ed25519 key".into()))?;
        Self::from_pkcs8(doc.as_ref())
    }

    /// Loads a key from PKCS#8 DER.
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, TokenError> {
        let pair = Ed25519KeyPair::from_pkcs8(der)
            .map_err(|e| TokenError::Key(format!("not an Ed25519 PKCS#8 key: {e}")))?;
        let digest =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pair.public_key().as_ref());
        let kid = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(SigningKey {
            pair,
            pkcs8: der.to_vec(),
            kid,
        })
    }

    /// Loads a key from a PEM `PRIVATE KEY` block.
    pub fn from_pem(pem: &str) -> Result<Self, TokenError> {
        use rustls_pki_types::pem::PemObject;
        let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| TokenError::Key(format!("signing key is not PKCS#8 PEM: {e}")))?;
        Self::from_pkcs8(der.secret_pkcs8_der())
    }

    /// The key as a PEM `PRIVATE KEY` block, for writing to the state dir (0600).
    pub fn to_pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(&self.pkcs8);
        let mut out = String::from("-----BEGIN PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(chunk).expect("base64 is ascii"));
            out.push('\n');
        }
        out.push_str("-----END PRIVATE KEY-----\n");
        out
    }

    /// Key id carried in token headers.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Signs `claims` into a token string.
    pub fn mint(&self, claims: &Claims) -> String {
        let header = Header {
            alg: "EdDSA".into(),
            typ: "JWT".into(),
            kid: self.kid.clone(),
        };
        let mut token = B64.encode(serde_json::to_vec(&header).expect("header serializes"));
        token.push('.');
        token.push_str(&B64.encode(serde_json::to_vec(claims).expect("claims serialize")));
        let sig = self.pair.sign(token.as_bytes());
        token.push('.');
        token.push_str(&B64.encode(sig.as_ref()));
        token
    }

    /// A verifier for tokens signed by this key.
    pub fn verifier(&self) -> TokenVerifier {
        TokenVerifier {
            public_key: self.pair.public_key().as_ref().to_vec(),
            revoked: HashSet::new(),
            verified: Default::default(),
        }
    }
}

/// Verifies tokens against the proxy's public key and a revocation list.
///
/// Clones share one cache of verified signatures (see the [module docs](self)).
#[derive(Debug, Clone)]
pub struct TokenVerifier {
    public_key: Vec<u8>,
    revoked: HashSet<String>,
    /// SHA-256 of a token whose signature verified → its claims.
    verified: Arc<Mutex<HashMap<[u8; 32], Arc<Claims>>>>,
}

impl TokenVerifier {
    /// Replaces the set of revoked token ids.
    pub fn set_revoked(&mut self, revoked: HashSet<String>) {
        self.revoked = revoked;
    }

    /// Verifies `token` and returns its claims if it is a valid token of `kind`.
    pub fn verify(&self, token: &str, kind: TokenKind) -> Result<Claims, TokenError> {
        self.verify_at(token, kind, unix_now())
    }

    /// As [`verify`](Self::verify), at a given time (for tests).
    pub fn verify_at(&self, token: &str, kind: TokenKind, now: u64) -> Result<Claims, TokenError> {
        self.verify_shared_at(token, kind, now)
            .map(|c| Claims::clone(&c))
    }

    /// As [`verify`](Self::verify), returning the cached claims themselves: no copy per call,
    /// for paths that verify a token on every request (the kube gateway).
    pub fn verify_shared(&self, token: &str, kind: TokenKind) -> Result<Arc<Claims>, TokenError> {
        self.verify_shared_at(token, kind, unix_now())
    }

    fn verify_shared_at(
        &self,
        token: &str,
        kind: TokenKind,
        now: u64,
    ) -> Result<Arc<Claims>, TokenError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("longer than 8 KiB"));
        }
        let key: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .expect("SHA-256 is 32 bytes");
        let cached = self.cache().get(&key).cloned();
        let claims = match cached {
            Some(claims) => claims,
            None => {
                let claims = Arc::new(self.verify_signature(token)?);
                let mut cache = self.cache();
                if cache.len() >= VERIFIED_CACHE {
                    cache.clear();
                }
                cache.insert(key, claims.clone());
                claims
            }
        };
        if let Some(exp) = claims.exp {
            if now >= exp {
                return Err(TokenError::Expired { expired_at: exp });
            }
        }
        if claims.kind != kind {
            return Err(TokenError::WrongKind {
                expected: kind,
                found: claims.kind,
            });
        }
        if self.revoked.contains(&claims.jti) {
            return Err(TokenError::Revoked {
                jti: claims.jti.clone(),
            });
        }
        Ok(claims)
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<Claims>>> {
        // The map is valid whatever a panicking holder was doing: take it anyway.
        self.verified.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parses `token` and checks its signature; returns its claims, not yet checked.
    fn verify_signature(&self, token: &str) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        let header: Header = serde_json::from_slice(
            &B64.decode(h)
                .map_err(|_| TokenError::Malformed("header is not base64url"))?,
        )
        .map_err(|_| TokenError::Malformed("header is not JSON"))?;
        if header.alg != "EdDSA" {
            return Err(TokenError::Malformed("algorithm is not EdDSA"));
        }
        let sig = B64
            .decode(s)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        let signed = &token[..h.len() + 1 + c.len()];
        UnparsedPublicKey::new(&ED25519, &self.public_key)
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        serde_json::from_slice(
            &B64.decode(c)
                .map_err(|_| TokenError::Malformed("claims are not base64url"))?,
        )
        .map_err(|_| TokenError::Malformed("claims are not the expected JSON"))
    }
}

/// Checks a cluster pattern: a cluster name in which `*` may stand for any run of characters.
pub fn validate_pattern(p: &str) -> Result<(), String> {
    let ok = !p.is_empty()
        && p.len() <= 253
        && p.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'*'
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid cluster pattern {p:?}: use cluster names, with '*' for any run of characters"
        ))
    }
}

/// Whether `name` matches `pattern`, where `*` stands for any run of characters.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    // Iterative glob with backtracking to the last star: linear in practice, no recursion.
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if pi < p.len() && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// A random 128-bit id, hex encoded.
pub fn random_id() -> String {
    use std::fmt::Write;
    let bytes: [u8; 16] = rand::random();
    let mut id = String::with_capacity(32);
    for b in bytes {
        let _ = write!(id, "{b:02x}");
    }
    id
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_token_round_trip_and_scope() {
        let key = SigningKey::generate().unwrap();
        let token = key.mint(&Claims::agent("prod-1", None).unwrap());
        let claims = key.verifier().verify(&token, TokenKind::Agent).unwrap();
        assert_eq!(claims.sub, "prod-1");
        assert_eq!(
            key.verifier()
                .verify(&token, TokenKind::Client)
                .unwrap_err()
                .label(),
            "wrong_kind"
        );
    }

    #[test]
    fn other_key_and_tampering_fail_signature() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let token = other.mint(&Claims::agent("a", None).unwrap());
        assert_eq!(
            key.verifier().verify(&token, TokenKind::Agent),
            Err(TokenError::BadSignature)
        );

        // Swap in claims for another cluster, keeping the original signature.
        let good = key.mint(&Claims::agent("a", None).unwrap());
        let forged_claims =
            B64.encode(serde_json::to_vec(&Claims::agent("b", None).unwrap()).unwrap());
        let parts: Vec<&str> = good.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert_eq!(
            key.verifier().verify(&forged, TokenKind::Agent),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn expiry_and_revocation() {
        let key = SigningKey::generate().unwrap();
        let claims = Claims::agent("a", Some(Duration::from_secs(60))).unwrap();
        let token = key.mint(&claims);
        let v = key.verifier();
        assert!(v
            .verify_at(&token, TokenKind::Agent, claims.iat + 59)
            .is_ok());
        assert!(matches!(
            v.verify_at(&token, TokenKind::Agent, claims.iat + 60),
            Err(TokenError::Expired { .. })
        ));
        let mut v = key.verifier();
        v.set_revoked([claims.jti.clone()].into());
        assert!(matches!(
            v.verify(&token, TokenKind::Agent),
            Err(TokenError::Revoked { .. })
        ));
    }

    #[test]
    fn a_remembered_token_is_still_checked_for_expiry_kind_and_revocation() {
        let key = SigningKey::generate().unwrap();
        let claims =
            Claims::client("u", vec![], vec!["*".into()], Some(Duration::from_secs(60))).unwrap();
        let token = key.mint(&claims);
        let v = key.verifier();
        // First call verifies the signature and remembers it; the rest hit the cache.
        for _ in 0..2 {
            assert_eq!(
                v.verify_at(&token, TokenKind::Client, claims.iat),
                Ok(claims.clone())
            );
        }
        assert_eq!(v.cache().len(), 1);
        assert!(matches!(
            v.verify_at(&token, TokenKind::Client, claims.iat + 60),
            Err(TokenError::Expired { .. })
        ));
        assert!(matches!(
            v.verify_at(&token, TokenKind::Agent, claims.iat),
            Err(TokenError::WrongKind { .. })
        ));
        // A clone shares the cache, and its revocation list still applies.
        let mut revoking = v.clone();
        revoking.set_revoked([claims.jti.clone()].into());
        assert!(matches!(
            revoking.verify_at(&token, TokenKind::Client, claims.iat),
            Err(TokenError::Revoked { .. })
        ));
        // A forged token is never remembered, however often it comes.
        let parts: Vec<&str> = token.split('.').collect();
        let forged_claims = B64.encode(
            serde_json::to_vec(&Claims::client("root", vec![], vec!["*".into()], None).unwrap())
                .unwrap(),
        );
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        for _ in 0..2 {
            assert_eq!(
                v.verify(&forged, TokenKind::Client),
                Err(TokenError::BadSignature)
            );
        }
        assert_eq!(v.cache().len(), 1);
    }

    #[test]
    fn the_cache_stays_bounded() {
        let key = SigningKey::generate().unwrap();
        let v = key.verifier();
        for _ in 0..VERIFIED_CACHE + 10 {
            let token = key.mint(&Claims::agent("a", None).unwrap());
            assert!(v.verify(&token, TokenKind::Agent).is_ok());
        }
        assert!(v.cache().len() <= VERIFIED_CACHE);
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let v = SigningKey::generate().unwrap().verifier();
        for t in [
            "",
            "a",
            "a.b",
            "a.b.c",
            "a.b.c.d",
            "....",
            "eyJ.eyJ.x",
            &"x".repeat(9000),
        ] {
            let e = v.verify(t, TokenKind::Agent).unwrap_err();
            assert!(
                matches!(e, TokenError::Malformed(_) | TokenError::BadSignature),
                "{t}: {e}"
            );
        }
    }

    #[test]
    fn pem_round_trip() {
        let key = SigningKey::generate().unwrap();
        let again = SigningKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(again.kid(), key.kid());
        let token = key.mint(&Claims::agent("a", None).unwrap());
        assert!(again.verifier().verify(&token, TokenKind::Agent).is_ok());
    }

    #[test]
    fn bad_names_and_patterns_refused_at_minting() {
        assert!(Claims::agent("Bad_Name", None).is_err());
        assert!(Claims::client("u", vec![], vec![], None).is_err());
        assert!(Claims::client("u", vec![], vec!["A".into()], None).is_err());
        assert!(Claims::client("", vec![], vec!["*".into()], None).is_err());
    }

    #[test]
    fn patterns() {
        for (p, n, want) in [
            ("*", "anything", true),
            ("prod-*", "prod-eu", true),
            ("prod-*", "dev-eu", false),
            ("a", "a", true),
            ("a", "ab", false),
            ("*-eu-*", "prod-eu-1", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ] {
            assert_eq!(pattern_matches(p, n), want, "{p} {n}");
        }
        let c = Claims::client("u", vec![], vec!["a".into(), "prod-*".into()], None).unwrap();
        assert!(c.allows_cluster("a"));
        assert!(c.allows_cluster("prod-x"));
        assert!(!c.allows_cluster("b"));
    }
}
