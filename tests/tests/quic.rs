//! QUIC end to end through the real binaries: agents over QUIC and TLS side by side and what
//! the proxy reports about each, `--transports` turning a listener off, `auto://` falling
//! back to TLS and returning to QUIC, and every transport over a slow, lossy link between two
//! network namespaces. (The CONNECT suite of `tunnel.rs` runs once per transport itself.)

use std::time::{Duration, Instant};

use serde_json::json;
use tether_tests::harness::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

/// Sends `msg` through a CONNECT to `cluster` (an echo upstream) and checks it comes back.
async fn echo_through(proxy: &Proxy, cluster: &str, token: &str, msg: &[u8]) {
    let mut t = connect_via_front(proxy, cluster, Some(&format!("Bearer {token}")))
        .await
        .tunnel();
    t.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(buf, msg);
}

/// Waits until `/api/v1/clusters` lists exactly `want` as the cluster's transports.
async fn wait_transports(proxy: &Proxy, cluster: &str, want: &[&str], timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Some(c) = proxy.cluster(cluster) {
            if c["transports"] == json!(want) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_over_tls_and_quic_side_by_side_are_reported_per_transport() {
    let up = TcpEchoUpstream::start().await;
    let mut proxy = Proxy::start(ProxyOptions::over(Transport::Tls)).await;
    let _over_tls = Agent::start(&proxy, "a", &up.addr.to_string(), &[]);
    proxy.options_mut().agent_transport = Transport::Quic;
    let over_quic = Agent::start(&proxy, "a", &up.addr.to_string(), &[]);
    assert!(proxy.wait_agents("a", 2, WAIT).await, "{}", proxy.log());

    let a = proxy.cluster("a").unwrap();
    assert_eq!(a["transports"], json!(["quic", "tls+tether"]), "{a}");
    let mut each: Vec<&str> = a["agentDetails"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["transport"].as_str().unwrap())
        .collect();
    each.sort();
    assert_eq!(each, ["quic", "tls+tether"]);
    let metrics = proxy.metrics();
    for t in ["quic", "tls+tether"] {
        let line = format!("tether_agents_connected{{cluster=\"a\",transport=\"{t}\"}} 1");
        assert!(metrics.contains(&line), "{metrics}");
    }
    assert!(
        over_quic.log().contains("transport=\"quic\"")
            || over_quic.log().contains("transport=quic"),
        "the agent logs which transport it uses:\n{}",
        over_quic.log()
    );

    // Streams are served whichever agent the proxy picks.
    let token = proxy.client_token("alice", "a");
    for i in 0..6u8 {
        echo_through(&proxy, "a", &token, &[b'x', i]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transports_flag_turns_the_tls_listener_off() {
    let up = TcpEchoUpstream::start().await;
    let mut proxy = Proxy::start(ProxyOptions {
        transports: Some("quic".into()),
        ..ProxyOptions::over(Transport::Quic)
    })
    .await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", proxy.agent_port)).is_err(),
        "no TCP listener with --transports quic"
    );
    let _a = Agent::start(&proxy, "a", &up.addr.to_string(), &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await, "{}", proxy.log());
    let token = proxy.client_token("alice", "*");
    echo_through(&proxy, "a", &token, b"over quic only").await;

    // A tls:// agent cannot get in, and says so.
    proxy.options_mut().agent_transport = Transport::Tls;
    let b = Agent::start(&proxy, "b", &up.addr.to_string(), &[]);
    assert!(
        b.process.wait_for_log("cannot reach the proxy", WAIT).await,
        "{}",
        b.log()
    );
    assert!(proxy.cluster("b").is_none_or(|c| c["connected"] == false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_falls_back_to_tls_when_quic_is_off_and_returns_to_quic_when_it_is_back() {
    let up = TcpEchoUpstream::start().await;
    let mut proxy = Proxy::start(ProxyOptions {
        transports: Some("tls".into()),
        ..ProxyOptions::over(Transport::Auto)
    })
    .await;
    let started = Instant::now();
    let a = Agent::start(&proxy, "a", &up.addr.to_string(), &[]);
    assert!(proxy.wait_agents("a", 1, WAIT).await, "{}", a.log());
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "auto:// took {took:?} to come up over TLS"
    );
    assert_eq!(
        proxy.cluster("a").unwrap()["transports"],
        json!(["tls+tether"])
    );
    assert!(a.log().contains("QUIC did not come up"), "{}", a.log());
    let token = proxy.client_token("alice", "a");
    echo_through(&proxy, "a", &token, b"over the fallback").await;

    // QUIC comes back: the proxy restarts with both transports. The agent's TLS session
    // ends, its next TLS dial fails while the proxy is down, and from then on it tries QUIC
    // first again.
    let failures = a.log().matches("cannot reach the proxy").count();
    proxy.process().kill();
    let deadline = Instant::now() + WAIT;
    while a.log().matches("cannot reach the proxy").count() == failures {
        assert!(
            Instant::now() < deadline,
            "agent did not notice:\n{}",
            a.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.options_mut().transports = None;
    proxy.launch().await;
    assert!(
        wait_transports(&proxy, "a", &["quic"], WAIT).await,
        "the agent should be back over QUIC:\n{}",
        a.log()
    );
    echo_through(&proxy, "a", &token, b"over quic again").await;
}

/// Every transport and multiplexer (TLS with tether's, HTTP/2's and yamux's, with TCP on BBR
/// and on CUBIC, and QUIC with its default congestion controller and with
/// `--quic-congestion-control bbr` on both ends) over a link with 20 ms delay and 1% loss
/// each way, between two network namespaces this test makes: a bulk stream and a small
/// request/response stream at once, on one session.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transport_over_a_lossy_link_bulk_and_request_response_at_once() {
    use lossy::*;
    if let Err(why) = can_run() {
        println!("SKIPPED lossy-link test: {why}");
        return;
    }
    let mut rows = Vec::new();
    // (transport, QUIC congestion controller if not the default, TCP congestion control)
    for (t, congestion, tcp) in [
        (Transport::Tls, None, "bbr"),
        (Transport::TlsH2, None, "bbr"),
        (Transport::TlsYamux, None, "bbr"),
        (Transport::Quic, None, "bbr"),
        (Transport::Quic, Some("bbr"), "bbr"),
        // TCP as most Linux hosts run it: backs off on every loss, so bulk crawls and what
        // queues behind it waits long. Reported (a run has only 12–30 round trips, too few
        // to compare rows by); tether_mux's unit test
        // `on_a_slow_link_a_small_message_waits_behind_little_of_a_flood` checks the queue.
        (Transport::Tls, None, "cubic"),
        (Transport::TlsH2, None, "cubic"),
        (Transport::TlsYamux, None, "cubic"),
    ] {
        match run_over_lossy_link(t, congestion, tcp).await {
            Ok(row) => rows.push(row),
            Err(Setup(why)) => {
                println!("SKIPPED lossy-link test: {why}");
                return;
            }
        }
    }
    let report = render(&rows);
    println!("{report}");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("lossy-link.md");
    let _ = std::fs::write(&path, &report);
    println!("(written to {})", path.display());
    for r in &rows {
        // Both streams made progress at the same time: the small exchanges were not starved
        // by the bulk stream, and the bulk stream moved data despite the losses (CUBIC's
        // ~0.4 MiB/s included).
        assert!(r.bulk_bytes >= 256 << 10, "{report}");
        let least = if r.tcp == "cubic" { 5 } else { 10 };
        assert!(r.round_trips.len() >= least, "{report}");
    }
    // At 0.4–0.5 MiB/s, tether's multiplexer on the agent's side finds the link slow (its
    // outbox shrinks within about two seconds), says so in its heartbeat answers, and the
    // proxy's status shows it.
    let tether_cubic = rows
        .iter()
        .find(|r| r.transport == Transport::Tls.session_name() && r.tcp == "cubic")
        .expect("the tls+tether CUBIC row");
    assert!(
        tether_cubic.slow_link.iter().any(|&s| s),
        "the proxy never showed the slow link: {:?}\n{report}",
        tether_cubic.slow_link
    );
    assert!(
        tether_cubic.slow_link_metric.iter().any(|&s| s),
        "the proxy's metrics never counted the slow link: {:?}\n{report}",
        tether_cubic.slow_link_metric
    );
}

/// A userspace link between two network namespaces, and a proxy and an agent on each side.
///
/// The link is a pair of TUN devices whose packets this test forwards, each way after a
/// fixed delay and dropping a random share: what `tc netem delay 20ms loss 1%` on both ends
/// of a veth pair would do, without needing the kernel's netem module (which the kernels of
/// some sandboxes, this project's CI among them, do not have).
#[cfg(target_os = "linux")]
mod lossy {
    use std::fs::File;
    use std::io::{self, Read, Write};
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use tether_tests::harness::{bin, http_get, Process, Transport};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One-way delay and loss of the link.
    pub const DELAY: Duration = Duration::from_millis(20);
    pub const LOSS: f64 = 0.01;
    /// How long the two streams run together.
    pub const WINDOW: Duration = Duration::from_secs(10);

    const PROXY_IP: &str = "198.18.0.1";
    const AGENT_IP: &str = "198.18.0.2";
    const AGENT_PORT: u16 = 8443;
    const FRONT_PORT: u16 = 9443;
    const ADMIN_PORT: u16 = 9090;
    const TUN: &str = "tqwire";

    /// The environment cannot host the test; the reason is printed and the test skipped.
    pub struct Setup(pub String);

    /// Root, `ip` with network namespaces, and `/dev/net/tun`.
    pub fn can_run() -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root, to create network namespaces".into());
        }
        if File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .is_err()
        {
            return Err("/dev/net/tun is not available".into());
        }
        let probe = format!("tq-probe-{}", std::process::id());
        ip(&["netns", "add", &probe]).map_err(|e| {
            format!("cannot create network namespaces ({e}); install iproute2 and run as root")
        })?;
        let _ = ip(&["netns", "del", &probe]);
        Ok(())
    }

    /// Runs `ip ARGS`, returning its stderr as the error.
    fn ip(args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("running ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Runs `f` on a thread that entered network namespace `ns`: sockets and devices it
    /// makes belong to `ns`.
    fn in_netns<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let path = format!("/var/run/netns/{ns}");
        std::thread::spawn(move || {
            let handle = File::open(&path)?;
            // SAFETY: a valid namespace fd; setns changes only this thread's namespace.
            if unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(f())
        })
        .join()
        .expect("namespace thread")
    }

    /// Creates TUN device `name` (no packet info header) in the calling thread's namespace.
    fn open_tun(name: &str) -> io::Result<File> {
        #[repr(C)]
        struct IfReq {
            name: [u8; libc::IFNAMSIZ],
            flags: libc::c_short,
            _pad: [u8; 22],
        }
        let file = File::options()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF as _, &mut req) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(file)
    }

    /// Two namespaces joined by the delaying, dropping link; removed on drop.
    struct LinkedNamespaces {
        proxy_ns: String,
        agent_ns: String,
        stop: Arc<AtomicBool>,
        threads: Vec<JoinHandle<()>>,
    }

    impl LinkedNamespaces {
        fn create(tag: &str, tcp: &'static str) -> Result<Self, Setup> {
            let pid = std::process::id();
            let mut link = LinkedNamespaces {
                proxy_ns: format!("tq-p-{tag}-{pid}"),
                agent_ns: format!("tq-a-{tag}-{pid}"),
                stop: Arc::new(AtomicBool::new(false)),
                threads: Vec::new(),
            };
            let setup = |r: Result<(), String>| r.map_err(Setup);
            setup(ip(&["netns", "add", &link.proxy_ns]))?;
            setup(ip(&["netns", "add", &link.agent_ns]))?;
            let mut tuns = Vec::new();
            for (ns, local, peer) in [
                (&link.proxy_ns, PROXY_IP, AGENT_IP),
                (&link.agent_ns, AGENT_IP, PROXY_IP),
            ] {
                setup(ip(&["-n", ns, "link", "set", "lo", "up"]))?;
                // TCP's pacing on this link decides the TLS rows: set, not inherited from the
                // host (see `TCP_CONGESTION_SYSCTL`).
                in_netns(ns, move || std::fs::write(TCP_CONGESTION_SYSCTL, tcp))
                    .and_then(|r| r)
                    .map_err(|e| {
                        Setup(format!("setting TCP congestion control {tcp} in {ns}: {e}"))
                    })?;
                let tun = in_netns(ns, || open_tun(TUN))
                    .and_then(|r| r)
                    .map_err(|e| Setup(format!("creating a TUN device in {ns}: {e}")))?;
                setup(ip(&[
                    "-n", ns, "addr", "add", local, "peer", peer, "dev", TUN,
                ]))?;
                setup(ip(&["-n", ns, "link", "set", TUN, "up"]))?;
                tuns.push(Arc::new(tun));
            }
            let seed = u64::from(pid) ^ 0x9e37_79b9_7f4a_7c15;
            for (i, (from, to)) in [(0, 1), (1, 0)].into_iter().enumerate() {
                link.threads.extend(forward(
                    tuns[from].clone(),
                    tuns[to].clone(),
                    link.stop.clone(),
                    seed.wrapping_add(i as u64),
                ));
            }
            Ok(link)
        }
    }

    impl Drop for LinkedNamespaces {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
            let _ = ip(&["netns", "del", &self.proxy_ns]);
            let _ = ip(&["netns", "del", &self.agent_ns]);
        }
    }

    /// Forwards packets from one TUN device to the other after [`DELAY`], dropping [`LOSS`]
    /// of them at random. Returns the reader and writer threads.
    fn forward(
        from: Arc<File>,
        to: Arc<File>,
        stop: Arc<AtomicBool>,
        seed: u64,
    ) -> [JoinHandle<()>; 2] {
        let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
        let reader = std::thread::spawn(move || {
            let mut rng = seed | 1;
            let mut buf = vec![0u8; 65536];
            while !stop.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: from.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                    continue;
                }
                let Ok(n) = (&*from).read(&mut buf) else {
                    return;
                };
                // xorshift64: plenty for choosing which packets to drop.
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                if (rng as f64 / u64::MAX as f64) < LOSS {
                    continue;
                }
                if tx
                    .send((Instant::now() + DELAY, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        });
        let writer = std::thread::spawn(move || {
            // The delay is the same for every packet, so they leave in arrival order.
            while let Ok((due, packet)) = rx.recv() {
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let _ = (&*to).write(&packet);
            }
        });
        [reader, writer]
    }

    /// Where a namespace's TCP congestion control is set. With BBR, TCP keeps its rate under
    /// random loss (the three TLS multiplexers moved 33–35 MiB/s here); with CUBIC, the usual
    /// Linux default, it backs off on every loss, as QUIC's default does (0.4 MiB/s), and
    /// small exchanges wait behind what the bulk stream has queued (`benches/RESULTS.md`).
    /// Each row says which it ran with, so that the figures do not depend on the host.
    const TCP_CONGESTION_SYSCTL: &str = "/proc/sys/net/ipv4/tcp_congestion_control";

    /// What one transport did over the link.
    pub struct Row {
        pub transport: String,
        /// The TCP congestion control of the namespaces.
        pub tcp: &'static str,
        pub bulk_bytes: usize,
        pub round_trips: Vec<Duration>,
        /// The proxy's `slowLink` for the cluster, sampled once a second.
        pub slow_link: Vec<bool>,
        /// Whether the proxy's metrics counted the session as on a slow link, sampled with
        /// `slow_link`.
        pub slow_link_metric: Vec<bool>,
    }

    /// The rows as a Markdown table.
    pub fn render(rows: &[Row]) -> String {
        let mut out = format!(
            "Lossy link: {} ms each way, {:.0}% loss each way (userspace netem), {} s with a \
             bulk stream and a 64-byte request/response stream at once\n\n\
             | transport | TCP | bulk MiB/s | round trips | p50 ms | p99 ms | max ms | slow link |\n\
             |---|---|---|---|---|---|---|---|\n",
            DELAY.as_millis(),
            LOSS * 100.0,
            WINDOW.as_secs()
        );
        for r in rows {
            let mut lat = r.round_trips.clone();
            lat.sort();
            let pick = |q: f64| {
                lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
                    .map(|d| d.as_secs_f64() * 1e3)
                    .unwrap_or(f64::NAN)
            };
            out.push_str(&format!(
                "| {} | {} | {:.2} | {} | {:.1} | {:.1} | {:.1} | {} of {} |\n",
                r.transport,
                r.tcp,
                r.bulk_bytes as f64 / WINDOW.as_secs_f64() / (1 << 20) as f64,
                lat.len(),
                pick(0.5),
                pick(0.99),
                lat.last()
                    .map(|d| d.as_secs_f64() * 1e3)
                    .unwrap_or(f64::NAN),
                r.slow_link.iter().filter(|&&s| s).count(),
                r.slow_link.len(),
            ));
        }
        out
    }

    /// The upstream in the agent's namespace: a first byte `B` gets bytes until the client
    /// goes, `E` gets everything after it echoed.
    async fn upstream(agent_ns: &str) -> Result<(u16, tokio::task::JoinHandle<()>), Setup> {
        let std_listener = in_netns(agent_ns, || std::net::TcpListener::bind("127.0.0.1:0"))
            .and_then(|r| r)
            .map_err(|e| Setup(format!("binding the upstream in {agent_ns}: {e}")))?;
        std_listener.set_nonblocking(true).expect("nonblocking");
        let port = std_listener.local_addr().expect("addr").port();
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mode) = tcp.read_u8().await else {
                        return;
                    };
                    if mode == b'B' {
                        let chunk = vec![0xa5u8; 64 * 1024];
                        while tcp.write_all(&chunk).await.is_ok() {}
                    } else {
                        let (mut r, mut w) = tcp.into_split();
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
            }
        });
        Ok((port, task))
    }

    /// A blocking HTTP GET to the proxy's admin port inside `ns`.
    fn admin_get(ns: &str, path: &'static str) -> Option<(u16, String)> {
        in_netns(ns, move || http_get(ADMIN_PORT, path).ok())
            .ok()
            .flatten()
    }

    /// A CONNECT through the proxy's front inside `ns`: the raw stream to the upstream.
    async fn tunnel(
        ns: &str,
        ca_pem: &str,
        token: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let tcp = in_netns(ns, || {
            std::net::TcpStream::connect(("127.0.0.1", FRONT_PORT))
        })
        .and_then(|r| r)
        .expect("front reachable");
        tcp.set_nonblocking(true).expect("nonblocking");
        let tcp = tokio::net::TcpStream::from_std(tcp).expect("tokio stream");
        let config =
            tether_proto::tls::client_config(ca_pem, &[b"http/1.1"], None).expect("config");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into().expect("name"), tcp)
            .await
            .expect("front TLS");
        let req = format!(
            "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nProxy-Authorization: Bearer {token}\r\n\r\n"
        );
        tls.write_all(req.as_bytes()).await.expect("CONNECT");
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
            let b = tokio::time::timeout(Duration::from_secs(20), tls.read_u8())
                .await
                .expect("CONNECT answered in time")
                .expect("CONNECT answer");
            head.push(b);
        }
        let head = String::from_utf8_lossy(&head);
        assert!(head.starts_with("HTTP/1.1 200"), "CONNECT refused: {head}");
        tls
    }

    /// Runs `tether-proxy` and `tether-agent` on the two sides of a fresh link, with the
    /// agent dialing over `t`, and measures a bulk stream and a request/response stream.
    /// One transport over the link; `congestion` is the QUIC congestion controller both
    /// ends use, if not the default, and `tcp` the namespaces' TCP congestion control.
    pub async fn run_over_lossy_link(
        t: Transport,
        congestion: Option<&'static str>,
        tcp: &'static str,
    ) -> Result<Row, Setup> {
        let cc_args: Vec<&str> = match congestion {
            Some(cc) => vec!["--quic-congestion-control", cc],
            None => vec![],
        };
        let tag = format!("{}{}{tcp}", t.tag(), congestion.unwrap_or(""));
        let link = LinkedNamespaces::create(&tag, tcp)?;
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("state");
        let log = |name: &str| -> PathBuf { dir.path().join(name) };

        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &link.proxy_ns])
            .arg(bin("tether-proxy"))
            .arg("serve")
            .arg("--state-dir")
            .arg(&state)
            .args(["--agent-addr", &format!("0.0.0.0:{AGENT_PORT}")])
            .args(["--front-addr", &format!("127.0.0.1:{FRONT_PORT}")])
            .args(["--admin-addr", &format!("127.0.0.1:{ADMIN_PORT}")])
            .args([
                "--publish-address",
                &format!("tls://{PROXY_IP}:{AGENT_PORT}"),
            ])
            // Heartbeat answers carry the agent's view of the link (`slowLink`): often
            // enough to sample it within the window, rarely enough not to load the link.
            .args(["--heartbeat-interval", "2s"])
            .args(&cc_args);
        let proxy = Process::spawn(&mut cmd, log("proxy.log"));
        let start = Instant::now();
        while !matches!(admin_get(&link.proxy_ns, "/readyz"), Some((200, _))) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "proxy not ready:\n{}",
                proxy.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let token = |args: &[&str]| -> String {
            let out = Command::new(bin("tether-proxy"))
                .arg("token")
                .args(args)
                .arg("--state-dir")
                .arg(&state)
                .output()
                .expect("tether-proxy token");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let token_file = dir.path().join("agent.token");
        std::fs::write(&token_file, token(&["agent", "--cluster", "a"])).expect("token file");
        let client_token = token(&["client", "--user", "bench", "--clusters", "a"]);
        let ca_pem = std::fs::read_to_string(state.join("ca.crt")).expect("ca.crt");

        let (up_port, up_task) = upstream(&link.agent_ns).await?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &link.agent_ns])
            .arg(bin("tether-agent"))
            .args(t.mux_args())
            .args(&cc_args)
            .args([
                "--proxy",
                &format!("{}://{PROXY_IP}:{AGENT_PORT}", t.scheme()),
            ])
            .args(["--cluster", "a", "--agent-id", "a-lossy"])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--ca-file")
            .arg(state.join("ca.crt"))
            .args(["--upstream", &format!("127.0.0.1:{up_port}")]);
        let agent = Process::spawn(&mut cmd, log("agent.log"));
        let start = Instant::now();
        loop {
            if let Some((200, body)) = admin_get(&link.proxy_ns, "/api/v1/clusters") {
                let clusters: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                let a = clusters
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["name"] == "a"));
                if let Some(a) = a.filter(|a| a["agents"] == 1) {
                    assert_eq!(a["transports"][0], t.session_name(), "{a}");
                    break;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "agent did not connect over the lossy link:\n{}\n{}",
                agent.log(),
                proxy.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let mut bulk = tunnel(&link.proxy_ns, &ca_pem, &client_token).await;
        bulk.write_all(b"B").await.expect("bulk request");
        let mut rr = tunnel(&link.proxy_ns, &ca_pem, &client_token).await;
        rr.write_all(b"E").await.expect("echo request");

        let deadline = tokio::time::Instant::now() + WINDOW;
        let bulk_side = async {
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, bulk.read(&mut buf)).await {
                assert!(n > 0, "bulk stream ended early");
                total += n;
            }
            total
        };
        let rr_side = async {
            let mut round_trips = Vec::new();
            let msg = [0x42u8; 64];
            let mut back = [0u8; 64];
            while tokio::time::Instant::now() < deadline {
                let t0 = Instant::now();
                rr.write_all(&msg).await.expect("request");
                tokio::time::timeout(Duration::from_secs(10), rr.read_exact(&mut back))
                    .await
                    .expect("response within 10 s")
                    .expect("response");
                round_trips.push(t0.elapsed());
            }
            round_trips
        };
        // What the proxy's status and metrics say of the link, once a second.
        let status_side = async {
            let mut seen = Vec::new();
            let mut counted = Vec::new();
            while tokio::time::Instant::now() + Duration::from_secs(1) < deadline {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let ns = link.proxy_ns.clone();
                let (status, metrics) = tokio::task::spawn_blocking(move || {
                    (
                        admin_get(&ns, "/api/v1/clusters"),
                        admin_get(&ns, "/metrics"),
                    )
                })
                .await
                .expect("status sampler");
                if let Some((200, body)) = status {
                    let clusters: serde_json::Value = serde_json::from_str(&body).expect("JSON");
                    let slow = clusters
                        .as_array()
                        .and_then(|c| c.iter().find(|c| c["name"] == "a"))
                        .map(|a| a["slowLink"] == true);
                    seen.extend(slow);
                }
                if let Some((200, body)) = metrics {
                    counted.push(body.contains("tether_agent_sessions_slow_link{cluster=\"a\"} 1"));
                }
            }
            (seen, counted)
        };
        let (bulk_bytes, round_trips, (slow_link, slow_link_metric)) =
            tokio::join!(bulk_side, rr_side, status_side);
        up_task.abort();
        drop((agent, proxy));
        Ok(Row {
            transport: match congestion {
                Some(cc) => format!("{} ({cc})", t.session_name()),
                None => t.session_name().to_string(),
            },
            tcp,
            bulk_bytes,
            round_trips,
            slow_link,
            slow_link_metric,
        })
    }
}
