//! Per-cluster TCP listeners (`--expose NAME=HOST:PORT`): every connection is spliced, as raw
//! bytes, to that cluster's API server through the tunnel.
//!
//! This is the per-cluster endpoint that tower-based setups expect, for clients that cannot
//! use CONNECT. Streams open optimistically ([`SessionRegistry::open_early`]): the client's
//! first bytes cross with the `StreamOpen`, so a connection costs one tunnel round trip, not
//! two. No credential is added and TLS stays end to end with the member; whoever can reach
//! the port still needs the member's own credentials.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use tether_proto::messages::Target;
use tether_proto::reply::ReplyError;

use crate::registry::SessionRegistry;
use crate::shards::Shards;

/// A parsed `NAME=HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct Expose {
    pub cluster: String,
    pub addr: String,
}

impl std::str::FromStr for Expose {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (cluster, addr) = s
            .split_once('=')
            .ok_or_else(|| format!("--expose {s:?}: expected NAME=HOST:PORT"))?;
        tether_proto::name::validate_cluster_name(cluster)?;
        if !addr.contains(':') {
            return Err(format!("--expose {s:?}: expected NAME=HOST:PORT"));
        }
        Ok(Expose {
            cluster: cluster.into(),
            addr: addr.into(),
        })
    }
}

/// What an exposed listener's accept loop carries from shard to shard.
#[derive(Clone)]
pub struct Exposed {
    pub cluster: String,
    pub registry: Arc<SessionRegistry>,
    pub shards: Arc<Shards>,
    pub shutdown: CancellationToken,
}

/// Accepts on `listener` (on the current shard) and splices each connection to the
/// cluster's API server.
///
/// Each connection is spliced on the shard of the session it will go through, so the splice
/// and the session's multiplexer share a thread. When all of the cluster's sessions are on
/// one other shard, the listener moves there as well, and from then on connections are
/// accepted where they are served.
pub fn serve(listener: TcpListener, exposed: Exposed) {
    let shards = exposed.shards.clone();
    shards.run_with(Shards::current(), listener, |l| accept_loop(l, exposed));
}

/// The accept loop, boxed: it may start itself again on another shard.
fn accept_loop(
    listener: TcpListener,
    exposed: Exposed,
) -> Pin<Box<dyn Future<Output = ()> + Send>> {
    Box::pin(accept_on_this_shard(listener, exposed))
}

async fn accept_on_this_shard(listener: TcpListener, exposed: Exposed) {
    let here = Shards::current();
    let cluster = &exposed.cluster;
    loop {
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, %cluster, "accepting on exposed listener failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = exposed.shutdown.cancelled() => return,
        };
        let _ = tcp.set_nodelay(true);
        let placement = exposed.registry.placement(cluster);
        let shard = placement.map_or(here, |(shard, _)| shard);
        let (registry, cluster) = (exposed.registry.clone(), cluster.clone());
        exposed
            .shards
            .run_with(shard, tcp, move |tcp| splice(tcp, peer, cluster, registry));
        if let Some((home, true)) = placement {
            if home != here {
                info!(cluster = %exposed.cluster, from = here, to = home, "exposed listener follows its cluster's session to its event loop");
                let shards = exposed.shards.clone();
                shards.run_with(home, listener, |l| accept_loop(l, exposed));
                return;
            }
        }
    }
}

/// Splices one accepted connection to `cluster`'s API server.
async fn splice(tcp: TcpStream, peer: SocketAddr, cluster: String, registry: Arc<SessionRegistry>) {
    let request_id = tether_proto::token::random_id();
    // Optimistic open: the client's first bytes follow StreamOpen without waiting for
    // the agent's accept, which saves a tunnel round trip per connection.
    let result = match registry
        .open_early(&cluster, Target::api_server(), &request_id)
        .await
    {
        // A refusal ends the splice with the agent's reason; other errors (a reset by
        // either end) are how TCP connections end.
        Ok(tunnel) => match tunnel.splice_with(tcp).await {
            Err(e) if e.get_ref().is_some_and(|e| e.is::<ReplyError>()) => Err(e.to_string()),
            _ => Ok(()),
        },
        Err(e) => Err(e.to_string()),
    };
    // Bytes only: there is no protocol to put the reason in, so it goes to the log.
    if let Err(error) = result {
        info!(%peer, %cluster, request_id = %request_id, %error, "exposed connection closed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let e: Expose = "a=127.0.0.1:7000".parse().unwrap();
        assert_eq!(e.cluster, "a");
        assert_eq!(e.addr, "127.0.0.1:7000");
        assert!("a".parse::<Expose>().is_err());
        assert!("A=1:2".parse::<Expose>().is_err());
        assert!("a=nope".parse::<Expose>().is_err());
    }
}
