//! tether-proxy: the host-side end of the tunnel.
//!
//! - [`agents`]: the agent listener (Hello, Welcome/Reject, heartbeats);
//! - [`registry`]: connected agents per cluster, and opening streams through them;
//! - [`front`]: the HTTPS port for callers (CONNECT, and routing to the gateway);
//! - [`gateway`]: the kube gateway, `/clusters/{name}/...` with impersonation;
//! - [`callers`]: caller authentication and per-cluster authorization;
//! - [`expose`]: per-cluster plain TCP listeners;
//! - [`admin`]: health, readiness, status, metrics;
//! - [`state`]: the state dir (CA, certificates, signing key, cluster UIDs);
//! - [`settings`]: flags, environment and config file;
//! - [`serve`]: wiring it together, and graceful shutdown;
//! - [`shards`]: the event loops, one thread per core, each session pinned to one;
//! - [`publish`]: the publish address, and `--publish-address auto` from a LoadBalancer;
//! - [`manifest`]: the agent manifest `tether-proxy manifest` prints;
//! - [`check`]: the connectivity check through the tunnel (`tether-proxy check`).

pub mod admin;
pub mod agents;
pub mod callers;
pub mod check;
pub mod expose;
pub mod front;
pub mod gateway;
pub mod manifest;
pub mod metrics;
pub mod publish;
pub mod registry;
pub mod serve;
pub mod settings;
pub mod shards;
pub mod state;
