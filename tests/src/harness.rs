//! Test harness: runs the real `tether-proxy` and `tether-agent` binaries on loopback, with a
//! temporary state dir, and gives tests what they need to talk to them.
//!
//! - [`Proxy`]: a proxy process with free ports, helpers to mint tokens and read status;
//! - [`Agent`]: an agent process for one cluster, dialing with the scheme
//!   [`ProxyOptions::agent_transport`] says; [`per_transport!`] runs a test body once per
//!   transport (TLS, QUIC);
//! - [`connect_via_front`]: a CONNECT through the front, as a caller would send it;
//! - upstreams that stand in for a member's API server: [`TlsEchoUpstream`] (TLS, banner then
//!   echo), [`TcpEchoUpstream`], [`TcpSourceUpstream`] (sends bytes until the client goes).
//!
//! Every process is killed, by its own PID, when its handle drops. Every wait is bounded.
//! The binaries are found next to the test executable's `target/<profile>/` dir; they are
//! built by `cargo test --workspace` (the proxy and agent packages have integration tests, so
//! cargo builds their binaries before any test runs).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;

/// Path of a workspace binary built for the same profile as this test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: run the tests with `cargo test --workspace`, which builds it",
        path.display()
    );
    path
}

/// A port that was free a moment ago on 127.0.0.1.
///
/// Picked below Linux's ephemeral range (32768 and up), where outgoing connections of other
/// tests cannot take it between now and the moment a child process binds it; both TCP and UDP
/// (QUIC shares the agent port number) are checked.
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = 10_000 + rand_below(22_000) as u16;
        let tcp = TcpListener::bind(("127.0.0.1", port));
        let udp = std::net::UdpSocket::bind(("127.0.0.1", port));
        if tcp.is_ok() && udp.is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// A pseudo-random number below `n`, without a dependency: hashed time and a counter.
fn rand_below(n: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish() % n
}

/// A child process killed (by its PID) when dropped; its stderr goes to a log file.
pub struct Process {
    child: std::process::Child,
    log: PathBuf,
}

impl Process {
    pub fn spawn(cmd: &mut Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).expect("creating a log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file handle"))
            .stderr(file)
            .env("TETHER_LOG", "info,tether_proto=debug")
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        Process { child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.log().contains(needle) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Sends a signal to this process (by PID).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status();
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// How agents dial the proxy: the scheme of their `--proxy`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `tls://`: TLS over TCP, yamux on top.
    #[default]
    Tls,
    /// `quic://`: QUIC over UDP.
    Quic,
    /// `auto://`: QUIC, falling back to TLS.
    Auto,
    /// `tls://` with HTTP/2 instead of tether's own multiplexer (`--mux h2`).
    TlsH2,
    /// `tls://` with yamux instead of tether's own multiplexer (`--mux yamux`).
    TlsYamux,
}

impl Transport {
    /// The scheme of the agent's `--proxy`.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Tls | Transport::TlsH2 | Transport::TlsYamux => "tls",
            Transport::Quic => "quic",
            Transport::Auto => "auto",
        }
    }

    /// The agent's `--mux` flag for this transport, if it needs one.
    pub fn mux_args(self) -> &'static [&'static str] {
        match self {
            Transport::TlsH2 => &["--mux", "h2"],
            Transport::TlsYamux => &["--mux", "yamux"],
            Transport::Tls | Transport::Quic | Transport::Auto => &[],
        }
    }

    /// A short name for file and namespace names: `tls`, `quic`, `auto`, `h2`, `yamux`.
    pub fn tag(self) -> &'static str {
        match self {
            Transport::TlsH2 => "h2",
            Transport::TlsYamux => "yamux",
            other => other.scheme(),
        }
    }

    /// What the proxy reports as the session's transport (`/api/v1/clusters`, metrics) when
    /// an agent dialed with this scheme (`auto://` here reports QUIC, what it prefers).
    pub fn session_name(self) -> &'static str {
        match self {
            Transport::Tls => "tls+tether",
            Transport::TlsH2 => "tls+h2",
            Transport::TlsYamux => "tls+yamux",
            Transport::Quic | Transport::Auto => "quic",
        }
    }
}

/// Generates, for an `async fn NAME(t: Transport)` test body, one test per transport:
/// `NAME::tls`, `NAME::quic` and `NAME::tls_h2`. The body stays an ordinary function next to it.
///
/// ```ignore
/// per_transport!(routes_streams);
/// async fn routes_streams(t: Transport) {
///     let proxy = Proxy::start(ProxyOptions::over(t)).await;
///     // ...
/// }
/// ```
#[macro_export]
macro_rules! per_transport {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tls() {
                super::$name($crate::harness::Transport::Tls).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn quic() {
                super::$name($crate::harness::Transport::Quic).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tls_h2() {
                super::$name($crate::harness::Transport::TlsH2).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn tls_yamux() {
                super::$name($crate::harness::Transport::TlsYamux).await
            }
        }
    };
}

/// Options for starting a proxy.
#[derive(Default, Clone)]
pub struct ProxyOptions {
    /// Clusters to expose as plain TCP listeners (`--expose NAME=127.0.0.1:PORT`).
    pub expose: Vec<String>,
    /// Further flags.
    pub args: Vec<String>,
    /// How agents started with [`Agent::start`] dial this proxy.
    pub agent_transport: Transport,
    /// The proxy's `--transports` (e.g. `"tls"`); `None` leaves the default (both).
    pub transports: Option<String>,
}

impl ProxyOptions {
    /// Default options, with agents dialing over `t`.
    pub fn over(t: Transport) -> ProxyOptions {
        ProxyOptions {
            agent_transport: t,
            ..Default::default()
        }
    }
}

/// A running `tether-proxy serve`.
pub struct Proxy {
    pub dir: tempfile::TempDir,
    pub state_dir: PathBuf,
    pub agent_port: u16,
    pub front_port: u16,
    pub admin_port: u16,
    pub exposed: Vec<(String, u16)>,
    opts: ProxyOptions,
    pub process: Option<Process>,
    starts: usize,
}

impl Proxy {
    pub async fn start(opts: ProxyOptions) -> Proxy {
        let dir = tempfile::tempdir().expect("temp dir");
        let state_dir = dir.path().join("state");
        let mut proxy = Proxy {
            state_dir,
            dir,
            agent_port: free_port(),
            front_port: free_port(),
            admin_port: free_port(),
            exposed: opts
                .expose
                .iter()
                .map(|c| (c.clone(), free_port()))
                .collect(),
            opts,
            process: None,
            starts: 0,
        };
        // A port taken between picking and binding: try again with other ports.
        for _ in 0..5 {
            if proxy.try_launch().await {
                return proxy;
            }
            proxy.agent_port = free_port();
            proxy.front_port = free_port();
            proxy.admin_port = free_port();
            for (_, port) in proxy.exposed.iter_mut() {
                *port = free_port();
            }
        }
        panic!("proxy could not bind its ports:\n{}", proxy.log());
    }

    /// Starts (or restarts) the process on the same ports and state dir, and waits for ready.
    pub async fn launch(&mut self) {
        // After a kill the old sockets may linger a moment: retry the same ports.
        for _ in 0..10 {
            if self.try_launch().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        panic!("proxy could not bind its ports:\n{}", self.log());
    }

    /// One start; `false` if a port was in use (the process exited saying so).
    async fn try_launch(&mut self) -> bool {
        self.starts += 1;
        let mut cmd = Command::new(bin("tether-proxy"));
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--agent-addr")
            .arg(format!("127.0.0.1:{}", self.agent_port))
            .arg("--front-addr")
            .arg(format!("127.0.0.1:{}", self.front_port))
            .arg("--admin-addr")
            .arg(format!("127.0.0.1:{}", self.admin_port))
            .arg("--publish-address")
            .arg(format!("tls://127.0.0.1:{}", self.agent_port));
        for (cluster, port) in &self.exposed {
            cmd.arg("--expose")
                .arg(format!("{cluster}=127.0.0.1:{port}"));
        }
        if let Some(t) = &self.opts.transports {
            cmd.arg("--transports").arg(t);
        }
        cmd.args(&self.opts.args);
        let log = self.dir.path().join(format!("proxy-{}.log", self.starts));
        let mut process = Process::spawn(&mut cmd, log);
        let start = Instant::now();
        loop {
            if let Ok((200, _)) = http_get(self.admin_port, "/readyz") {
                break;
            }
            if process.has_exited() && process.log().contains("Address already in use") {
                self.process = Some(process);
                return false;
            }
            assert!(
                !process.has_exited(),
                "proxy exited early:\n{}",
                process.log()
            );
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "proxy not ready:\n{}",
                process.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.process = Some(process);
        true
    }

    /// The options the next [`launch`](Self::launch) uses (e.g. other `--transports`).
    pub fn options_mut(&mut self) -> &mut ProxyOptions {
        &mut self.opts
    }

    pub fn process(&mut self) -> &mut Process {
        self.process.as_mut().expect("proxy running")
    }

    pub fn log(&self) -> String {
        self.process.as_ref().map(Process::log).unwrap_or_default()
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.state_dir.join("ca.crt")).expect("ca.crt")
    }

    pub fn ca_file(&self) -> PathBuf {
        self.state_dir.join("ca.crt")
    }

    /// Runs `tether-proxy token ...` and returns the token.
    pub fn token(&self, args: &[&str]) -> String {
        let out = Command::new(bin("tether-proxy"))
            .arg("token")
            .args(args)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .expect("running tether-proxy token");
        assert!(
            out.status.success(),
            "token {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_string()
    }

    pub fn agent_token(&self, cluster: &str) -> String {
        self.token(&["agent", "--cluster", cluster])
    }

    pub fn client_token(&self, user: &str, clusters: &str) -> String {
        self.token(&["client", "--user", user, "--clusters", clusters])
    }

    /// `GET /api/v1/clusters` parsed.
    pub fn clusters(&self) -> Vec<serde_json::Value> {
        let (status, body) =
            http_get(self.admin_port, "/api/v1/clusters").expect("admin reachable");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("clusters JSON")
    }

    pub fn cluster(&self, name: &str) -> Option<serde_json::Value> {
        self.clusters().into_iter().find(|c| c["name"] == name)
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin_port, "/metrics")
            .expect("admin reachable")
            .1
    }

    /// Waits until `cluster` has exactly `agents` connected agents.
    pub async fn wait_agents(&self, cluster: &str, agents: u64, timeout: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let n = self
                .cluster(cluster)
                .and_then(|c| c["agents"].as_u64())
                .unwrap_or(0);
            if n == agents {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub fn exposed_port(&self, cluster: &str) -> u16 {
        self.exposed
            .iter()
            .find(|(c, _)| c == cluster)
            .expect("exposed cluster")
            .1
    }
}

/// A running `tether-agent`.
pub struct Agent {
    pub process: Process,
    pub token_file: PathBuf,
}

impl Agent {
    /// Starts an agent for `cluster` with a fresh token from `proxy`, spliced to `upstream`.
    pub fn start(proxy: &Proxy, cluster: &str, upstream: &str, args: &[&str]) -> Agent {
        let token = proxy.agent_token(cluster);
        Self::start_with_token(proxy, cluster, upstream, &token, args)
    }

    pub fn start_with_token(
        proxy: &Proxy,
        cluster: &str,
        upstream: &str,
        token: &str,
        args: &[&str],
    ) -> Agent {
        let n = std::fs::read_dir(proxy.dir.path())
            .map(|d| d.count())
            .unwrap_or(0);
        let token_file = proxy.dir.path().join(format!("agent-{cluster}-{n}.token"));
        std::fs::write(&token_file, token).expect("writing token");
        let mut cmd = Command::new(bin("tether-agent"));
        cmd.args(proxy.opts.agent_transport.mux_args());
        cmd.arg("--proxy")
            .arg(format!(
                "{}://127.0.0.1:{}",
                proxy.opts.agent_transport.scheme(),
                proxy.agent_port
            ))
            .arg("--cluster")
            .arg(cluster)
            .arg("--token-file")
            .arg(&token_file)
            .arg("--ca-file")
            .arg(proxy.ca_file())
            .arg("--upstream")
            .arg(upstream)
            .arg("--agent-id")
            .arg(format!("{cluster}-{n}"))
            .args(args);
        let log = proxy.dir.path().join(format!("agent-{cluster}-{n}.log"));
        Agent {
            process: Process::spawn(&mut cmd, log),
            token_file,
        }
    }

    pub fn log(&self) -> String {
        self.process.log()
    }
}

/// A plain HTTP/1.0 GET to the admin port: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
    let mut buf = Vec::new();
    s.take(16 << 20).read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("malformed response"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The result of a CONNECT through the front.
pub enum ConnectOutcome {
    /// 200: the stream now carries raw bytes to the cluster's API server.
    Tunnel(Box<TlsStream<tokio::net::TcpStream>>),
    /// Anything else: status and the response body (the reason).
    Refused(u16, String),
}

impl ConnectOutcome {
    pub fn tunnel(self) -> TlsStream<tokio::net::TcpStream> {
        match self {
            ConnectOutcome::Tunnel(t) => *t,
            ConnectOutcome::Refused(code, body) => panic!("CONNECT refused: {code} {body}"),
        }
    }

    pub fn refused(self) -> (u16, String) {
        match self {
            ConnectOutcome::Tunnel(_) => panic!("CONNECT unexpectedly succeeded"),
            ConnectOutcome::Refused(code, body) => (code, body),
        }
    }
}

/// Where a proxy's front listens and the CA it is signed by: enough to reach it from a task
/// that cannot borrow the [`Proxy`].
#[derive(Debug, Clone)]
pub struct Front {
    pub port: u16,
    pub ca_pem: String,
}

impl Proxy {
    pub fn front(&self) -> Front {
        Front {
            port: self.front_port,
            ca_pem: self.ca_pem(),
        }
    }
}

impl Front {
    /// A TLS connection to the front, verifying it as `localhost` against the proxy's CA.
    pub async fn tls(&self) -> TlsStream<tokio::net::TcpStream> {
        let config = tether_proto::tls::client_config(&self.ca_pem, &[b"http/1.1"], None)
            .expect("client config");
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("front reachable");
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into().expect("name"), tcp)
            .await
            .expect("front TLS")
    }

    /// One HTTP/1.1 `GET path` with extra `headers` on a new connection: (status, body).
    /// Bounded by a minute.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> (u16, bytes::Bytes) {
        use http_body_util::BodyExt;
        let exchange = async {
            let io = hyper_util::rt::TokioIo::new(self.tls().await);
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("HTTP handshake");
            tokio::spawn(conn);
            let mut req = http::Request::get(path).header("host", "localhost");
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            let body = http_body_util::Empty::<bytes::Bytes>::new();
            let resp = sender
                .send_request(req.body(body).expect("request"))
                .await
                .expect("response");
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, body)
        };
        tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .expect("front answered within a minute")
    }
}

/// Sends `CONNECT {cluster}:443` to the proxy's front with an optional `Proxy-Authorization`.
pub async fn connect_via_front(proxy: &Proxy, cluster: &str, auth: Option<&str>) -> ConnectOutcome {
    let mut tls = proxy.front().tls().await;
    let mut req = format!("CONNECT {cluster}:443 HTTP/1.1\r\nHost: {cluster}:443\r\n");
    if let Some(a) = auth {
        req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes())
        .await
        .expect("writing CONNECT");
    let head = tokio::time::timeout(Duration::from_secs(20), read_head(&mut tls))
        .await
        .expect("CONNECT answered in time");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("malformed CONNECT response: {head:?}"));
    if status == 200 {
        return ConnectOutcome::Tunnel(Box::new(tls));
    }
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(1 << 20)];
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_exact(&mut body)).await;
    ConnectOutcome::Refused(status, String::from_utf8_lossy(&body).to_string())
}

/// Reads an HTTP response head byte by byte (so nothing after it is consumed), bounded.
async fn read_head<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        match r.read_u8().await {
            Ok(b) => head.push(b),
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&head).to_string()
}

/// A TLS server standing in for an API server: sends `banner\n`, then echoes.
pub struct TlsEchoUpstream {
    pub addr: SocketAddr,
    pub ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl TlsEchoUpstream {
    pub async fn start(banner: &str) -> TlsEchoUpstream {
        let ca = tether_proto::tls::CertificateAuthority::generate("upstream CA").expect("CA");
        let leaf = ca
            .issue_server(
                &["localhost".into(), "127.0.0.1".into()],
                Duration::from_secs(3600),
            )
            .expect("leaf");
        let config =
            tether_proto::tls::server_config(&leaf.cert_pem, &leaf.key_pem, &[b"http/1.1"], None)
                .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let banner = format!("{banner}\n");
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, banner) = (acceptor.clone(), banner.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let (mut r, mut w) = tokio::io::split(tls);
                    if w.write_all(banner.as_bytes()).await.is_err() {
                        return;
                    }
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        TlsEchoUpstream {
            addr,
            ca_pem: ca.cert_pem().to_string(),
            task,
        }
    }

    /// Opens TLS (trusting this upstream's CA, as a caller holding member credentials would)
    /// over `io`, reads the banner, and returns the stream.
    pub async fn client<IO>(&self, io: IO) -> (String, tokio_rustls::client::TlsStream<IO>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let config =
            tether_proto::tls::client_config(&self.ca_pem, &[b"http/1.1"], None).expect("config");
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into().expect("name"), io)
            .await
            .expect("end-to-end TLS with the upstream");
        let mut banner = Vec::new();
        while !banner.ends_with(b"\n") && banner.len() < 1024 {
            banner.push(tls.read_u8().await.expect("banner"));
        }
        (String::from_utf8_lossy(&banner).trim().to_string(), tls)
    }

    /// [`client`](Self::client) over `io`, then checks that `msg` comes back; returns the
    /// banner.
    pub async fn echo<IO>(&self, io: IO, msg: &[u8]) -> String
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (banner, mut tls) = self.client(io).await;
        tls.write_all(msg).await.expect("write through the tunnel");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("echo");
        assert_eq!(back, msg);
        banner
    }
}

impl Drop for TlsEchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plain TCP echo server.
pub struct TcpEchoUpstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TcpEchoUpstream {
    pub async fn start() -> TcpEchoUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        TcpEchoUpstream { addr, task }
    }
}

impl Drop for TcpEchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A plain TCP server that sends `limit` bytes on every connection (then closes).
pub struct TcpSourceUpstream {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TcpSourceUpstream {
    pub async fn start(limit: usize) -> TcpSourceUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let chunk = vec![0xabu8; 64 * 1024];
                    let mut sent = 0;
                    while sent < limit {
                        let n = chunk.len().min(limit - sent);
                        if tcp.write_all(&chunk[..n]).await.is_err() {
                            return;
                        }
                        sent += n;
                    }
                    let _ = tcp.shutdown().await;
                });
            }
        });
        TcpSourceUpstream { addr, task }
    }
}

impl Drop for TcpSourceUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads until end of stream or `timeout`, returning how many bytes arrived and whether the
/// stream ended (rather than timing out).
pub async fn drain<R: tokio::io::AsyncRead + Unpin>(r: &mut R, timeout: Duration) -> (usize, bool) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (total, true),
            Ok(Ok(n)) => total += n,
            Err(_) => return (total, false),
        }
    }
}
