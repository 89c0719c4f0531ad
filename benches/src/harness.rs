//! The system under test: a temporary state dir, `tether-proxy` and `tether-agent` as child
//! processes, readiness polling, and the processes' memory and CPU from `/proc`.
//!
//! Children are killed by PID when the [`Tunnel`] is dropped (also while unwinding from a
//! panic), and get `PR_SET_PDEATHSIG` so they also die if the bench is killed outright.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The cluster name the bench registers.
pub const CLUSTER: &str = "bench";
/// How long the proxy may take to become ready and the agent to connect, each.
const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// PIDs of the children alive now, for [`kill_children`].
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Kills every child this bench started and has not reaped yet (by PID); for the watchdog,
/// which exits the process without running destructors.
pub fn kill_children() {
    let pids = CHILDREN.lock().map(|g| g.clone()).unwrap_or_default();
    for pid in pids {
        // SAFETY: kill has no memory-safety preconditions; the PID is an unreaped child of ours.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGKILL);
        }
    }
}

/// One child process, killed by PID on drop.
pub struct Proc {
    pub name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if the process has exited, with the tail of its log.
    pub fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); log tail:\n{}",
                self.name,
                log_tail(&self.log)
            );
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.child.id();
        if let Ok(mut g) = CHILDREN.lock() {
            g.retain(|&p| p != pid);
        }
        // Child::kill signals exactly this PID, which stays ours until we reap it below.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// A temporary directory removed on drop, unless `keep`.
pub struct TempDir {
    pub path: PathBuf,
    pub keep: bool,
}

impl TempDir {
    pub fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        let path =
            std::env::temp_dir().join(format!("tether-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(TempDir { path, keep: false })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("kept state dir and logs in {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// The proxy and agent of one run, and their addresses. Field order matters: the agent is
/// killed before the proxy, and the state dir removed last.
pub struct Tunnel {
    pub agent: Proc,
    pub proxy: Proc,
    pub agent_addr: SocketAddr,
    pub front_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub expose_addr: SocketAddr,
    pub ca_pem: String,
    pub client_token: String,
    /// State dir and logs; removed on drop (after the children are gone) unless kept.
    pub dir: TempDir,
}

/// A free port on 127.0.0.1 (bound then released; the proxy binds it right after).
///
/// Taken below Linux's ephemeral range (32768 and up): a port the kernel hands out for `:0`
/// can be taken by any outgoing connection before the child process binds it, which once
/// failed a run with "address already in use".
pub fn free_port() -> Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919);
    for _ in 0..2000 {
        let port = 10_000 + (start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % 22_000);
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return Ok(l.local_addr()?);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Spawns `cmd` with its stdout and stderr in `log`, dying with this process.
pub fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Proc> {
    let out = std::fs::File::create(&log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .env(
            "TETHER_LOG",
            std::env::var("TETHER_LOG").unwrap_or_else(|_| "warn".into()),
        );
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent. The death
    // signal is tied to the spawning thread, which is the bench's main thread.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    if let Ok(mut g) = CHILDREN.lock() {
        g.push(child.id());
    }
    Ok(Proc { name, child, log })
}

/// Runs a `tether-proxy` subcommand to completion and returns its trimmed stdout.
fn run_output(bin: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(bin)
        .args(args)
        .env("TETHER_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {}", bin.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// How the agent reaches the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// `tls://` with the agent's default multiplexer (tether's own, ALPN `tether/2`).
    Tls,
    /// `tls://` with `--mux yamux`.
    Yamux,
    /// `tls://` with `--mux h2` (HTTP/2).
    H2,
    /// `quic://` (QUIC over UDP).
    Quic,
}

/// What to start.
pub struct Options<'a> {
    pub bin_dir: &'a Path,
    pub upstream: SocketAddr,
    /// The CA of the upstream's HTTPS mode. With it the agent gets `--upstream https://ADDR`,
    /// `--upstream-ca-file` and `--upstream-token-file` (a dummy token the upstream ignores),
    /// so it serves the kube gateway; raw streams still go to the same address.
    pub upstream_ca_pem: Option<&'a str>,
    pub transport: Transport,
    /// Extra arguments for `tether-proxy serve` and for `tether-agent`.
    pub proxy_args: &'a [String],
    pub agent_args: &'a [String],
}

impl Tunnel {
    /// Starts the proxy (exposing [`CLUSTER`]) and an agent whose upstream is `upstream`, and
    /// waits until the agent is connected.
    pub fn start(opts: &Options) -> Result<Tunnel> {
        let (bin_dir, upstream) = (opts.bin_dir, opts.upstream);
        let proxy_bin = bin_dir.join("tether-proxy");
        let agent_bin = bin_dir.join("tether-agent");
        for b in [&proxy_bin, &agent_bin] {
            if !b.is_file() {
                bail!(
                    "{} not found; build it with `cargo build --release -p tether-proxy -p tether-agent` \
                     or pass --bin-dir",
                    b.display()
                );
            }
        }
        let dir = TempDir::new()?;
        let state = dir.path.join("state");
        let state_s = state
            .to_str()
            .context("temp dir path is not UTF-8")?
            .to_string();
        let (agent_addr, front_addr, admin_addr, expose_addr) =
            (free_port()?, free_port()?, free_port()?, free_port()?);

        let mut cmd = Command::new(&proxy_bin);
        cmd.arg("serve")
            .args(["--state-dir", &state_s])
            .args(["--agent-addr", &agent_addr.to_string()])
            .args(["--front-addr", &front_addr.to_string()])
            .args(["--admin-addr", &admin_addr.to_string()])
            .args(["--expose", &format!("{CLUSTER}={expose_addr}")])
            .args(opts.proxy_args);
        let mut proxy = spawn("tether-proxy", cmd, dir.path.join("proxy.log"))?;

        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            proxy.check_alive()?;
            if matches!(http_get(admin_addr, "/readyz"), Ok((200, _))) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "proxy not ready after {READY_TIMEOUT:?}; log tail:\n{}",
                    proxy.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }

        let agent_token = run_output(
            &proxy_bin,
            &[
                "token",
                "agent",
                "--state-dir",
                &state_s,
                "--cluster",
                CLUSTER,
            ],
        )?;
        let client_token = run_output(
            &proxy_bin,
            &[
                "token",
                "client",
                "--state-dir",
                &state_s,
                "--user",
                "bench",
                "--clusters",
                CLUSTER,
            ],
        )?;
        let token_file = dir.path.join("agent.token");
        std::fs::write(&token_file, &agent_token)?;
        let ca_file = state.join("ca.crt");
        let ca_pem = std::fs::read_to_string(&ca_file).context("reading the proxy's ca.crt")?;

        let mut cmd = Command::new(&agent_bin);
        match opts.transport {
            Transport::Tls => cmd.args(["--proxy", &format!("tls://{agent_addr}")]),
            Transport::Yamux => {
                cmd.args(["--proxy", &format!("tls://{agent_addr}"), "--mux", "yamux"])
            }
            Transport::H2 => cmd.args(["--proxy", &format!("tls://{agent_addr}"), "--mux", "h2"]),
            Transport::Quic => cmd.args(["--proxy", &format!("quic://{agent_addr}")]),
        };
        cmd.args(["--cluster", CLUSTER])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--ca-file")
            .arg(&ca_file);
        match opts.upstream_ca_pem {
            Some(upstream_ca) => {
                let upstream_ca_file = dir.path.join("upstream-ca.pem");
                let upstream_token_file = dir.path.join("upstream.token");
                std::fs::write(&upstream_ca_file, upstream_ca)?;
                std::fs::write(&upstream_token_file, "bench-upstream-token\n")?;
                cmd.args(["--upstream", &format!("https://{upstream}")])
                    .arg("--upstream-ca-file")
                    .arg(&upstream_ca_file)
                    .arg("--upstream-token-file")
                    .arg(&upstream_token_file);
            }
            None => {
                cmd.args(["--upstream", &upstream.to_string()]);
            }
        }
        cmd.args(opts.agent_args);
        let agent = spawn("tether-agent", cmd, dir.path.join("agent.log"))?;

        let mut tunnel = Tunnel {
            agent,
            proxy,
            agent_addr,
            front_addr,
            admin_addr,
            expose_addr,
            ca_pem,
            client_token,
            dir,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            tunnel.proxy.check_alive()?;
            tunnel.agent.check_alive()?;
            if let Ok(Some(c)) = tunnel.cluster_status() {
                if c.get("connected").and_then(|v| v.as_bool()) == Some(true) {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "agent not connected after {READY_TIMEOUT:?}\nproxy log:\n{}\nagent log:\n{}",
                    tunnel.proxy.log_tail(),
                    tunnel.agent.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(tunnel)
    }

    /// This cluster's object from `/api/v1/clusters`, if listed.
    pub fn cluster_status(&self) -> Result<Option<serde_json::Value>> {
        let (code, body) = http_get(self.admin_addr, "/api/v1/clusters")?;
        if code != 200 {
            bail!("/api/v1/clusters answered {code}");
        }
        let v: serde_json::Value = serde_json::from_str(&body)?;
        Ok(v.as_array()
            .and_then(|a| {
                a.iter()
                    .find(|c| c.get("name").and_then(|n| n.as_str()) == Some(CLUSTER))
            })
            .cloned())
    }

    /// Fails if either child has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        self.proxy.check_alive()?;
        self.agent.check_alive()
    }

    /// Resident memory of proxy and agent, KiB.
    pub fn rss_kib(&self) -> Result<(u64, u64)> {
        Ok((rss_kib(self.proxy.pid())?, rss_kib(self.agent.pid())?))
    }

    /// CPU time (user + system) of proxy and agent so far.
    pub fn cpu(&self) -> Result<(Duration, Duration)> {
        Ok((cpu_time(self.proxy.pid())?, cpu_time(self.agent.pid())?))
    }
}

/// Busy and total jiffies of the whole host, from the first line of `/proc/stat`.
pub fn host_jiffies() -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Ok((total - idle, total))
}

/// VmRSS of a process, KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// utime + stime of a process, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').context("malformed /proc/PID/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11).context("no utime")?.parse::<u64>()?
        + fields.get(12).context("no stime")?.parse::<u64>()?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// A minimal blocking HTTP/1.1 GET with `Connection: close`; returns status and body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    tcp.take(16 * 1024 * 1024).read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status code")?;
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((code, body))
}

/// Decodes a chunked body (enough for the admin port's answers).
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}
