//! tether-agent: the member-side end of the tunnel.
//!
//! - [`settings`]: flags, and what they resolve to (proxy address, upstream, allowlist);
//! - [`dialer`]: connecting to the proxy with backoff, `Hello`, and the control stream;
//! - [`streams`]: serving the data streams the proxy opens (allowlist, dial, splice);
//! - [`kube`]: the kube gateway's handler (credentials, impersonation, streaming, upgrades);
//! - [`incluster`]: facts read from the member cluster when running in a pod.

pub mod dialer;
pub mod incluster;
pub mod kube;
pub mod settings;
pub mod streams;
