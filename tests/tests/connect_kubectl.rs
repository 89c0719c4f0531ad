//! Stock kubectl through the CONNECT front (`proxy-url` in the kubeconfig), and several agent
//! replicas serving one cluster.

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use tether_tests::fixture::{Fixture, FixtureOptions};
use tether_tests::harness::*;

const WAIT: Duration = Duration::from_secs(15);

/// The kubeconfig a user writes for CONNECT: the member's address is the cluster name on 443,
/// `tls-server-name` is a name in the member's certificate, and the CA bundle holds both the
/// proxy's CA (client-go checks the https proxy against it) and the member's.
fn connect_kubeconfig(proxy: &Proxy, fixture: &Fixture, cluster: &str, token: &str) -> String {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let bundle = format!("{}{}", proxy.ca_pem(), fixture.ca_pem());
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: https://{cluster}:443\n    \
         tls-server-name: localhost\n    certificate-authority-data: {ca}\n    \
         proxy-url: https://caller:{token}@127.0.0.1:{port}\nusers:\n- name: member\n  user:\n    token: member-credential\n\
         contexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: member\ncurrent-context: {cluster}\n",
        ca = b64(&bundle),
        port = proxy.front_port,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_kubectl_reaches_the_member_through_connect() {
    let fixture = Fixture::start(FixtureOptions::default()).await.unwrap();
    let proxy = Proxy::start(ProxyOptions::default()).await;
    let _agent = Agent::start(&proxy, "member", &fixture.url(), &[]);
    assert!(proxy.wait_agents("member", 1, WAIT).await);
    let token = proxy.client_token("caller", "member");
    let path = proxy.dir.path().join("connect.kubeconfig");
    std::fs::write(
        &path,
        connect_kubeconfig(&proxy, &fixture, "member", &token),
    )
    .unwrap();

    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&path)
        .args(["get", "ns", "--request-timeout=20s"])
        .output()
        .expect("kubectl must be installed");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success() && stdout.contains("kube-system"),
        "{stdout}{stderr}"
    );
    // TLS ran end to end: the member saw kubectl's own credential, not tether's token.
    let seen = fixture.requests();
    assert!(!seen.is_empty());
    assert!(seen
        .iter()
        .all(|r| r.header("authorization") == Some("Bearer member-credential")));
    assert!(seen.iter().all(|r| r.header("impersonate-user").is_none()));
    let opens = proxy.metrics();
    assert!(
        opens.contains("tether_stream_opens_total{result=\"ok\"}"),
        "{opens}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_a_cluster_and_survive_each_other() {
    let up = TlsEchoUpstream::start("replicated").await;
    let proxy = Proxy::start(ProxyOptions::default()).await;
    let token = proxy.agent_token("a");
    let mut one = Agent::start_with_token(
        &proxy,
        "a",
        &up.addr.to_string(),
        &token,
        &["--cluster-uid", "uid-a"],
    );
    let _two = Agent::start_with_token(
        &proxy,
        "a",
        &up.addr.to_string(),
        &token,
        &["--cluster-uid", "uid-a"],
    );
    assert!(proxy.wait_agents("a", 2, WAIT).await, "{}", proxy.log());

    // Streams are spread across both replicas.
    let auth = format!("Bearer {}", proxy.client_token("alice", "a"));
    let mut held = Vec::new();
    for _ in 0..4 {
        let t = connect_via_front(&proxy, "a", Some(&auth)).await.tunnel();
        held.push(up.client(t).await.1);
    }
    let status = proxy.cluster("a").unwrap();
    let per_agent: Vec<u64> = status["agentDetails"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["openStreams"].as_u64().unwrap())
        .collect();
    assert_eq!(per_agent, vec![2, 2], "{status}");

    // One replica goes; the cluster stays connected through the other.
    one.process.kill();
    assert!(proxy.wait_agents("a", 1, WAIT).await);
    let t = connect_via_front(&proxy, "a", Some(&auth)).await.tunnel();
    assert_eq!(up.client(t).await.0, "replicated");

    // A different cluster UID under the same name is a second cluster: refused.
    let imposter = Agent::start_with_token(
        &proxy,
        "a",
        &up.addr.to_string(),
        &token,
        &["--cluster-uid", "uid-b"],
    );
    assert!(
        imposter
            .process
            .wait_for_log("already belongs to the cluster with UID uid-a", WAIT)
            .await,
        "{}",
        imposter.log()
    );
    assert_eq!(proxy.cluster("a").unwrap()["agents"], 1);
}
