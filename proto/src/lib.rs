//! tether-proto: what the proxy and the agent share.
//!
//! - [`messages`]: the wire messages of protocol v1 (generated from `proto/tether.proto`).
//! - [`frame`]: length-delimited message framing with a maximum frame size.
//! - [`name`]: the Kubernetes rule for cluster names.
//! - [`token`]: agent and client tokens signed by the proxy's Ed25519 key.
//! - [`tls`]: TLS 1.3 configurations, certificate generation and PEM files.
//! - [`transport`]: the Session/Transport layer: one multiplexed session between agent and
//!   proxy, whatever carries it.
//! - [`http`]: what both ends of the kube gateway share: `Status` errors, header hygiene.
//! - [`pool`]: idle HTTP/1.1 client connections, parked again when a response body ends.
//! - [`process`]: logging set-up and shutdown signals, the same in both binaries.
//! - [`reply`]: optimistic stream open: bytes follow `StreamOpen` before the agent's reply.
//! - [`splice`]: copying bytes both ways between two streams, with counters.

pub mod frame;
pub mod http;
pub mod messages;
pub mod name;
pub mod pool;
pub mod process;
pub mod reply;
pub mod splice;
pub mod tls;
pub mod token;
pub mod transport;

/// Major version of the wire protocol this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN protocol id for agent sessions, over TLS and QUIC alike.
pub const ALPN: &[u8] = b"tether/1";
