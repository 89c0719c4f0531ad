//! Peer tunnels measured in the same run as tether, as optional comparisons: rathole with TLS,
//! OpenSSH `-R`, ferrotunnel (the encrypted peers) and rathole without encryption (the
//! reference). Each is started with the topology of tether's `--expose`:
//!
//! ```text
//! bench client -> peer server's public port -> tunnel -> peer client -> the bench's upstream
//! ```
//!
//! and measured through [`Route::Peer`] with the same client code as the `expose` route. The
//! peers found installed run by default (`--peers` picks them); one that is missing is skipped
//! with a reason, one that fails to start or dies is reported and dropped, and neither stops
//! the tether measurement.
//!
//! tether's ratio targets then come from the peers of this run: `max(1.2 × the best encrypted
//! peer's share of direct, the unencrypted reference's share)` ([`apply_targets`]).

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::dial::{dial_echo, Route};
use crate::harness::{self, Proc, TempDir};
use crate::report::{num, Compare, Row, Target, Usage};
use crate::{bulk, connect, http, median_by, rtt, Case, Ctx, Profile};

/// Longest a peer may take from spawn to forwarding an echo exchange.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a peer's server may take to listen on its control port.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one readiness probe (dial + echo) may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Log level for the peers' own logging (rathole, ferrotunnel), as `TETHER_LOG` for tether.
const PEER_LOG: &str = "warn";

/// A peer tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    RatholeTls,
    Ssh,
    Ferrotunnel,
    Rathole,
}

impl PeerKind {
    /// In the order they run and are printed; the unencrypted reference last.
    pub const ALL: [PeerKind; 4] = [
        PeerKind::RatholeTls,
        PeerKind::Ssh,
        PeerKind::Ferrotunnel,
        PeerKind::Rathole,
    ];

    /// The name in `--peers`, tables and JSON (the rows' route).
    pub fn name(self) -> &'static str {
        match self {
            PeerKind::RatholeTls => "rathole-tls",
            PeerKind::Ssh => "ssh",
            PeerKind::Ferrotunnel => "ferrotunnel",
            PeerKind::Rathole => "rathole",
        }
    }

    /// Encrypted peers set the targets; the unencrypted one is the reference.
    pub fn encrypted(self) -> bool {
        self != PeerKind::Rathole
    }

    /// Its column heading in the comparison tables.
    fn column(self) -> String {
        if self.encrypted() {
            self.name().to_string()
        } else {
            format!("{} (no TLS)", self.name())
        }
    }

    /// The executables it needs.
    fn binaries(self) -> &'static [&'static str] {
        match self {
            PeerKind::RatholeTls => &["rathole", "openssl"],
            PeerKind::Rathole => &["rathole"],
            PeerKind::Ssh => &["sshd", "ssh", "ssh-keygen"],
            PeerKind::Ferrotunnel => &["ferrotunnel", "ferrotunnel-bench-server"],
        }
    }

    /// How to install what it needs.
    fn install_hint(self) -> &'static str {
        match self {
            PeerKind::RatholeTls => "cargo install rathole --version 0.5.0 (and the openssl CLI)",
            PeerKind::Rathole => "cargo install rathole --version 0.5.0",
            PeerKind::Ssh => "apt-get install openssh-server openssh-client",
            PeerKind::Ferrotunnel => {
                "cargo install ferrotunnel-cli --version 1.5.2 --locked && \
                 cargo install --locked --path benches/ferrotunnel-peer"
            }
        }
    }

    /// Its configuration, for the JSON and the README.
    fn config(self) -> &'static str {
        match self {
            PeerKind::RatholeTls => {
                "rathole 0.5 server + client, transport tls (native-tls/OpenSSL; PKCS#12 identity \
                 from a throwaway CA, client trusts the CA, hostname localhost), nodelay = true; \
                 one TLS data connection per tunneled connection"
            }
            PeerKind::Rathole => {
                "rathole 0.5 server + client, transport tcp (no encryption), nodelay = true; one \
                 TCP data connection per tunneled connection"
            }
            PeerKind::Ssh => {
                "OpenSSH: own sshd -D on 127.0.0.1 (generated ed25519 host key, authorized key, \
                 Ciphers aes256-gcm@openssh.com) and ssh -tt -R PUBLIC:127.0.0.1:UPSTREAM -c \
                 aes256-gcm@openssh.com USER@127.0.0.1 sleep 86400 (a tty session rather than -N, \
                 so that both ends set TCP_NODELAY); one SSH connection, a channel per tunneled \
                 connection"
            }
            PeerKind::Ferrotunnel => {
                "ferrotunnel 1.5.2: ferrotunnel-bench-server (the CLI's TunnelServer + TcpIngress \
                 with rate limits at u32::MAX and the ingress's connection cap/lifetime lifted) \
                 and the stock `ferrotunnel client --tls`; rustls, one muxed connection"
            }
        }
    }

    fn parse(s: &str) -> Result<PeerKind> {
        PeerKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .with_context(|| {
                format!("unknown peer {s:?} (known: rathole-tls, rathole, ssh, ferrotunnel, none)")
            })
    }
}

/// Whether `route` is a peer's name (its rows are peer rows).
pub fn is_peer_route(route: &str) -> bool {
    PeerKind::ALL.iter().any(|k| k.name() == route)
}

/// An executable named `name` in PATH, `$CARGO_HOME/bin`, `~/.cargo/bin` or the sbin dirs.
fn find_bin(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(c) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(c).join("bin"));
    }
    if let Some(h) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(h).join(".cargo/bin"));
    }
    dirs.extend(
        [
            "/usr/local/sbin",
            "/usr/sbin",
            "/sbin",
            "/usr/local/bin",
            "/usr/bin",
        ]
        .map(PathBuf::from),
    );
    dirs.into_iter().map(|d| d.join(name)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The peers to run: those asked for (or all found), with their executables.
pub struct Selection {
    chosen: Vec<(PeerKind, Vec<PathBuf>)>,
    /// Not run, and why.
    skipped: Vec<(PeerKind, String)>,
    /// Asked for explicitly but missing: reported as errors.
    missing_asked: Vec<(PeerKind, String)>,
}

/// Parses `--peers` (`None`: every peer found) and looks up the executables; prints what was
/// found and what was skipped.
pub fn select(spec: Option<&str>) -> Result<Selection> {
    let asked: Option<Vec<PeerKind>> = match spec.map(str::trim) {
        None | Some("") | Some("all") => None,
        Some("none") => Some(Vec::new()),
        Some(list) => Some(
            list.split(',')
                .map(|s| PeerKind::parse(s.trim()))
                .collect::<Result<_>>()?,
        ),
    };
    let mut sel = Selection {
        chosen: Vec::new(),
        skipped: Vec::new(),
        missing_asked: Vec::new(),
    };
    for kind in PeerKind::ALL {
        if asked.as_ref().is_some_and(|a| !a.contains(&kind)) {
            sel.skipped.push((kind, "not in --peers".into()));
            continue;
        }
        let mut bins = Vec::new();
        let mut missing = Vec::new();
        for b in kind.binaries() {
            match find_bin(b) {
                Some(p) => bins.push(p),
                None => missing.push(*b),
            }
        }
        if missing.is_empty() {
            sel.chosen.push((kind, bins));
        } else {
            let why = format!(
                "{} not found in PATH or ~/.cargo/bin (install: {})",
                missing.join(", "),
                kind.install_hint()
            );
            if asked.is_some() {
                sel.missing_asked.push((kind, why));
            } else {
                sel.skipped.push((kind, why));
            }
        }
    }
    let names = |v: &[(PeerKind, Vec<PathBuf>)]| {
        v.iter()
            .map(|(k, _)| k.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if spec.map(str::trim) == Some("none") {
        eprintln!("peers: none (--peers none)");
    } else if sel.chosen.is_empty() && sel.missing_asked.is_empty() {
        eprintln!(
            "peers: none found, skipping the comparison (install hints: tether-bench README)"
        );
    } else {
        eprintln!("peers: running {}", names(&sel.chosen));
        for (k, why) in sel.skipped.iter().filter(|(_, w)| w != "not in --peers") {
            eprintln!("peers: skipping {}: {why}", k.name());
        }
        for (k, why) in &sel.missing_asked {
            eprintln!("peers: cannot run {}: {why}", k.name());
        }
    }
    Ok(sel)
}

/// Extra seconds the watchdog allows for the peers' runs.
pub fn watchdog_extra(sel: &Selection, quick: bool) -> u64 {
    sel.chosen.len() as u64 * if quick { 60 } else { 240 }
}

/// One running peer: its server (public port `addr`) and client, killed by PID on drop
/// (client first).
pub struct Peer {
    pub kind: PeerKind,
    pub route: Route,
    client: Proc,
    server: Proc,
    /// Count the server's child processes too (sshd forks one per connection).
    server_tree: bool,
    start_secs: f64,
}

impl Peer {
    fn check_alive(&mut self) -> Result<()> {
        self.server.check_alive()?;
        self.client.check_alive()
    }

    /// CPU time of the server side (with its children for sshd) and the client side.
    fn cpu(&self) -> Result<(Duration, Duration)> {
        let server = if self.server_tree {
            tree_cpu(self.server.pid())?
        } else {
            harness::cpu_time(self.server.pid())?
        };
        Ok((server, harness::cpu_time(self.client.pid())?))
    }

    /// Waits until the public port forwards an echo exchange to the upstream.
    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            if let Ok(Ok(_io)) = tokio::time::timeout(PROBE_TIMEOUT, dial_echo(&self.route)).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "not forwarding after {READY_TIMEOUT:?}\nserver log:\n{}\nclient log:\n{}",
                    self.server.log_tail(),
                    self.client.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// CPU time of `root` and all its descendants alive now.
fn tree_cpu(root: u32) -> Result<Duration> {
    let mut procs: Vec<(u32, u32)> = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The parent PID is the second field after the parenthesized command name.
        if let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok())
        {
            procs.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() && tree.len() <= procs.len() + 1 {
        let parent = tree[i];
        tree.extend(
            procs
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    let mut total = harness::cpu_time(root)?;
    for pid in &tree[1..] {
        // A child may exit between the scan and now.
        total += harness::cpu_time(*pid).unwrap_or_default();
    }
    Ok(total)
}

/// The peers of this run, what happened to each, and their state dir.
pub struct Peers {
    /// Field order: the processes go before the dir is removed.
    running: Vec<Peer>,
    /// Per peer: found or not, started or not, why, its configuration.
    status: Vec<Value>,
    /// Start failures, case failures and deaths, as `{peer, case?, error}`.
    pub errors: Vec<Value>,
    _dir: Option<TempDir>,
}

impl Peers {
    fn error(&mut self, peer: PeerKind, case: Option<&str>, e: &anyhow::Error) {
        eprintln!(
            "peers: {}{} failed: {e:#}",
            peer.name(),
            case.map(|c| format!(" {c}")).unwrap_or_default()
        );
        self.errors
            .push(json!({ "peer": peer.name(), "case": case, "error": format!("{e:#}") }));
    }

    /// The JSON summary of the peers: each one's state and configuration, and the sizes.
    pub fn json(&self, profile: &Profile) -> Value {
        json!({ "status": self.status, "profile": PeerProfile::from(profile) })
    }
}

/// Starts the selected peers, each forwarding to `upstream`. Failures are recorded, not
/// returned. Must run on the thread that spawned the tunnel (see `harness::spawn`).
pub async fn start(sel: Selection, upstream: SocketAddr, keep_logs: bool) -> Peers {
    let mut peers = Peers {
        running: Vec::new(),
        status: Vec::new(),
        errors: Vec::new(),
        _dir: None,
    };
    for (kind, why) in &sel.skipped {
        peers
            .status
            .push(json!({ "peer": kind.name(), "started": false, "skipped": why }));
    }
    for (kind, why) in &sel.missing_asked {
        peers
            .status
            .push(json!({ "peer": kind.name(), "started": false, "skipped": why }));
        peers.error(*kind, None, &anyhow::anyhow!("{why}"));
    }
    if sel.chosen.is_empty() {
        return peers;
    }
    let dir = match TempDir::new().and_then(|d| {
        std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(0o700))?;
        Ok(d)
    }) {
        Ok(mut d) => {
            d.keep = keep_logs;
            d
        }
        Err(e) => {
            for (kind, _) in &sel.chosen {
                peers.error(*kind, None, &e);
            }
            return peers;
        }
    };
    let mut tls: Option<Result<TlsFiles>> = None;
    for (kind, bins) in sel.chosen {
        let t0 = Instant::now();
        let mut result = Err(anyhow::anyhow!("not started"));
        // Twice at most: a port picked free may be taken before the peer binds it.
        for attempt in 1..=2 {
            let pdir = dir.path.join(format!("{}-{attempt}", kind.name()));
            result = start_one(kind, &bins, &pdir, &dir.path, &mut tls, upstream).await;
            match &result {
                Err(e) if attempt == 1 => {
                    eprintln!(
                        "peers: {} did not start ({e:#}); retrying once",
                        kind.name()
                    )
                }
                _ => break,
            }
        }
        let result = result.map(|mut peer| {
            peer.start_secs = t0.elapsed().as_secs_f64();
            peer
        });
        match result {
            Ok(peer) => {
                eprintln!(
                    "peers: {} forwarding on {} after {:.1}s",
                    kind.name(),
                    match &peer.route {
                        Route::Peer(_, a) => a.to_string(),
                        _ => String::new(),
                    },
                    peer.start_secs
                );
                peers.status.push(json!({
                    "peer": kind.name(),
                    "started": true,
                    "encrypted": kind.encrypted(),
                    "binaries": bins,
                    "config": kind.config(),
                    "startSecs": peer.start_secs,
                }));
                peers.running.push(peer);
            }
            Err(e) => {
                peers.status.push(json!({
                    "peer": kind.name(),
                    "started": false,
                    "encrypted": kind.encrypted(),
                    "binaries": bins,
                    "config": kind.config(),
                    "error": format!("{e:#}"),
                }));
                peers.error(kind, None, &e);
            }
        }
    }
    peers._dir = Some(dir);
    peers
}

/// One attempt at starting `kind` in `pdir`, up to forwarding an echo exchange.
async fn start_one(
    kind: PeerKind,
    bins: &[PathBuf],
    pdir: &Path,
    dir: &Path,
    tls: &mut Option<Result<TlsFiles>>,
    upstream: SocketAddr,
) -> Result<Peer> {
    std::fs::create_dir_all(pdir)?;
    let tls = if matches!(kind, PeerKind::RatholeTls | PeerKind::Ferrotunnel) {
        let files = tls.get_or_insert_with(|| TlsFiles::generate(dir));
        Some(
            files
                .as_ref()
                .map_err(|e| anyhow::anyhow!("{e:#}"))?
                .clone(),
        )
    } else {
        None
    };
    let mut peer = match kind {
        PeerKind::RatholeTls | PeerKind::Rathole => {
            start_rathole(kind, bins, pdir, upstream, tls.as_ref())?
        }
        PeerKind::Ssh => start_ssh(bins, pdir, upstream)?,
        PeerKind::Ferrotunnel => start_ferrotunnel(bins, pdir, upstream, tls.as_ref())?,
    };
    peer.wait_ready().await?;
    Ok(peer)
}

/// A throwaway CA and a server certificate for `localhost` and `127.0.0.1`, as files.
#[derive(Clone)]
struct TlsFiles {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl TlsFiles {
    fn generate(dir: &Path) -> Result<TlsFiles> {
        let ca = tether_proto::tls::CertificateAuthority::generate("tether-bench peers CA")?;
        let leaf = ca.issue_server(
            &["localhost".into(), "127.0.0.1".into()],
            Duration::from_secs(24 * 3600),
        )?;
        let files = TlsFiles {
            ca: dir.join("peers-ca.pem"),
            cert: dir.join("peers-server.pem"),
            key: dir.join("peers-server.key"),
        };
        std::fs::write(&files.ca, ca.cert_pem())?;
        // The chain: leaf then CA.
        std::fs::write(&files.cert, format!("{}{}", leaf.cert_pem, ca.cert_pem()))?;
        tether_proto::tls::write_private_file(&files.key, leaf.key_pem.as_bytes())?;
        Ok(files)
    }
}

/// A random hex token (16 bytes from /dev/urandom).
fn random_token() -> Result<String> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Writes `text` readable by the owner only.
fn write_private(path: &Path, text: &str) -> Result<()> {
    tether_proto::tls::write_private_file(path, text.as_bytes())?;
    Ok(())
}

/// Whether something listens on TCP 127.0.0.1:`port` (from /proc/net/tcp; no connection, so
/// no failed handshake in the peer's log).
fn is_listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines().skip(1).any(|l| {
                let mut it = l.split_whitespace();
                let local = it.nth(1).unwrap_or("");
                let state = it.nth(1).unwrap_or("");
                local.ends_with(&want) && state == "0A"
            })
        })
    })
}

/// Waits until `proc` listens on `port`.
fn wait_listening(proc: &mut Proc, port: u16) -> Result<()> {
    let deadline = Instant::now() + LISTEN_TIMEOUT;
    while !is_listening(port) {
        proc.check_alive()?;
        if Instant::now() > deadline {
            bail!(
                "{} not listening on {port} after {LISTEN_TIMEOUT:?}; log tail:\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("temp dir path is not UTF-8")
}

fn start_rathole(
    kind: PeerKind,
    bins: &[PathBuf],
    dir: &Path,
    upstream: SocketAddr,
    tls: Option<&TlsFiles>,
) -> Result<Peer> {
    let (ctrl, public) = (harness::free_port()?, harness::free_port()?);
    let token = random_token()?;
    let (server_tls, client_tls) = match tls {
        Some(t) => {
            let pfx = dir.join("identity.pfx");
            let password = random_token()?;
            let pass_file = dir.join("pfx.pass");
            write_private(&pass_file, &password)?;
            let out = Command::new(&bins[1])
                .args(["pkcs12", "-export", "-in"])
                .arg(&t.cert)
                .arg("-inkey")
                .arg(&t.key)
                .arg("-out")
                .arg(&pfx)
                .arg("-passout")
                .arg(format!("file:{}", path_str(&pass_file)?))
                .stdin(Stdio::null())
                .output()
                .context("running openssl pkcs12")?;
            if !out.status.success() {
                bail!(
                    "openssl pkcs12 -export failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::fs::set_permissions(&pfx, std::fs::Permissions::from_mode(0o600))?;
            (
                format!(
                    "type = \"tls\"\n[server.transport.tcp]\nnodelay = true\n\
                     [server.transport.tls]\npkcs12 = \"{}\"\npkcs12_password = \"{password}\"\n",
                    path_str(&pfx)?
                ),
                format!(
                    "type = \"tls\"\n[client.transport.tcp]\nnodelay = true\n\
                     [client.transport.tls]\ntrusted_root = \"{}\"\nhostname = \"localhost\"\n",
                    path_str(&t.ca)?
                ),
            )
        }
        None => (
            "type = \"tcp\"\n[server.transport.tcp]\nnodelay = true\n".to_string(),
            "type = \"tcp\"\n[client.transport.tcp]\nnodelay = true\n".to_string(),
        ),
    };
    let server_toml = dir.join("server.toml");
    let client_toml = dir.join("client.toml");
    write_private(
        &server_toml,
        &format!(
            "[server]\nbind_addr = \"{ctrl}\"\ndefault_token = \"{token}\"\n\
             [server.transport]\n{server_tls}\
             [server.services.bench]\nbind_addr = \"{public}\"\nnodelay = true\n"
        ),
    )?;
    write_private(
        &client_toml,
        &format!(
            "[client]\nremote_addr = \"{ctrl}\"\ndefault_token = \"{token}\"\n\
             [client.transport]\n{client_tls}\
             [client.services.bench]\nlocal_addr = \"{upstream}\"\nnodelay = true\n"
        ),
    )?;
    let (sname, cname) = match kind {
        PeerKind::RatholeTls => ("rathole-tls server", "rathole-tls client"),
        _ => ("rathole server", "rathole client"),
    };
    let mut cmd = Command::new(&bins[0]);
    cmd.arg("--server")
        .arg(&server_toml)
        .env("RUST_LOG", PEER_LOG);
    let mut server = harness::spawn(sname, cmd, dir.join("server.log"))?;
    wait_listening(&mut server, ctrl.port())?;
    let mut cmd = Command::new(&bins[0]);
    cmd.arg("--client")
        .arg(&client_toml)
        .env("RUST_LOG", PEER_LOG);
    let client = harness::spawn(cname, cmd, dir.join("client.log"))?;
    Ok(Peer {
        kind,
        route: Route::Peer(kind.name(), public),
        client,
        server,
        server_tree: false,
        start_secs: 0.0,
    })
}

/// The name of the user this process runs as (for `ssh USER@127.0.0.1`).
fn user_name() -> Result<String> {
    let uid = std::fs::metadata("/proc/self")?.uid();
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
        })
        .or_else(|| std::env::var("USER").ok())
        .with_context(|| format!("no user name for uid {uid}"))
}

fn ssh_keygen(bin: &Path, path: &Path) -> Result<()> {
    let out = Command::new(bin)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "tether-bench", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen")?;
    if !out.status.success() {
        bail!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn start_ssh(bins: &[PathBuf], dir: &Path, upstream: SocketAddr) -> Result<Peer> {
    let (sshd_bin, ssh_bin, keygen) = (&bins[0], &bins[1], &bins[2]);
    let (sshd_addr, public) = (harness::free_port()?, harness::free_port()?);
    let host_key = dir.join("host_key");
    let client_key = dir.join("client_key");
    ssh_keygen(keygen, &host_key)?;
    ssh_keygen(keygen, &client_key)?;
    let authorized = dir.join("authorized_keys");
    write_private(
        &authorized,
        &std::fs::read_to_string(client_key.with_extension("pub"))?,
    )?;
    let config = dir.join("sshd_config");
    write_private(
        &config,
        &format!(
            "ListenAddress {sshd_addr}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile none\n\
             UsePAM no\nStrictModes no\nPubkeyAuthentication yes\nPasswordAuthentication no\n\
             KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
             AllowTcpForwarding yes\nGatewayPorts no\nX11Forwarding no\nPermitTTY yes\n\
             Ciphers aes256-gcm@openssh.com\nUseDNS no\nClientAliveInterval 0\nLogLevel ERROR\n",
            path_str(&host_key)?,
            path_str(&authorized)?
        ),
    )?;
    let spawn_sshd = || {
        let mut cmd = Command::new(sshd_bin);
        cmd.args(["-D", "-e", "-f"]).arg(&config);
        harness::spawn("sshd", cmd, dir.join("sshd.log"))
    };
    let mut sshd = spawn_sshd()?;
    if let Err(e) = wait_listening(&mut sshd, sshd_addr.port()) {
        // As root, sshd needs its privilege separation dir, which the distribution's service
        // unit usually creates at boot (e.g. /run/sshd). Create it (empty, 0755) and retry once.
        let log = std::fs::read_to_string(dir.join("sshd.log")).unwrap_or_default();
        let missing = log
            .lines()
            .find_map(|l| l.split("Missing privilege separation directory: ").nth(1))
            .map(|p| PathBuf::from(p.trim()));
        let is_root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        match missing {
            Some(p) if is_root && p.is_absolute() && !p.exists() => {
                eprintln!(
                    "peers: creating sshd's privilege separation dir {}",
                    p.display()
                );
                std::fs::create_dir_all(&p)?;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
                drop(sshd);
                sshd = spawn_sshd()?;
                wait_listening(&mut sshd, sshd_addr.port())?;
            }
            _ => return Err(e),
        }
    }
    let user = user_name()?;
    // Not `-N`: without a session OpenSSH leaves Nagle on the SSH connection (it sets
    // TCP_NODELAY only for interactive sessions, i.e. with a tty), and every new tunneled
    // connection then waits ~40 ms for a delayed ACK (25 conn/s instead of ~2000 here). A
    // session with a tty that runs `sleep` makes both ends set TCP_NODELAY: ssh at its best.
    let mut cmd = Command::new(ssh_bin);
    cmd.args(["-tt", "-e", "none", "-F", "/dev/null", "-i"])
        .arg(&client_key)
        .args(["-p", &sshd_addr.port().to_string()])
        .args(["-c", "aes256-gcm@openssh.com"])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(["-R", &format!("127.0.0.1:{}:{upstream}", public.port())])
        .arg(format!("{user}@127.0.0.1"))
        .args(["sleep", "86400"]);
    let client = harness::spawn("ssh -R", cmd, dir.join("ssh.log"))?;
    Ok(Peer {
        kind: PeerKind::Ssh,
        route: Route::Peer(PeerKind::Ssh.name(), public),
        client,
        server: sshd,
        server_tree: true,
        start_secs: 0.0,
    })
}

fn start_ferrotunnel(
    bins: &[PathBuf],
    dir: &Path,
    upstream: SocketAddr,
    tls: Option<&TlsFiles>,
) -> Result<Peer> {
    let tls = tls.context("ferrotunnel needs the TLS files")?;
    let (ctrl, public) = (harness::free_port()?, harness::free_port()?);
    let token = random_token()?;
    let mut cmd = Command::new(&bins[1]);
    cmd.arg(ctrl.to_string())
        .arg(public.to_string())
        .arg(&tls.cert)
        .arg(&tls.key)
        .env("FERROTUNNEL_TOKEN", &token)
        .env("RUST_LOG", PEER_LOG);
    let mut server = harness::spawn("ferrotunnel server", cmd, dir.join("server.log"))?;
    wait_listening(&mut server, ctrl.port())?;
    let mut cmd = Command::new(&bins[0]);
    cmd.arg("client")
        .args(["--server", &ctrl.to_string()])
        .args(["--local-addr", &upstream.to_string()])
        .arg("--no-dashboard")
        .arg("--tls")
        .arg("--tls-ca")
        .arg(&tls.ca)
        .args(["--tls-server-name", "localhost"])
        .env("FERROTUNNEL_TOKEN", &token)
        .env("RUST_LOG", PEER_LOG);
    let client = harness::spawn("ferrotunnel client", cmd, dir.join("client.log"))?;
    Ok(Peer {
        kind: PeerKind::Ferrotunnel,
        route: Route::Peer(PeerKind::Ferrotunnel.name(), public),
        client,
        server,
        server_tree: false,
        start_secs: 0.0,
    })
}

/// Runs `f`, returning its result and the CPU that the two processes `cpu` reports (proxy and
/// agent, or a peer's server and client), this process and the host used meanwhile.
pub async fn usage_of<T>(
    cpu: impl Fn() -> Result<(Duration, Duration)>,
    f: impl Future<Output = Result<T>>,
) -> Result<(T, Option<Usage>)> {
    let sample = || -> Result<_> {
        Ok((
            Instant::now(),
            cpu()?,
            harness::cpu_time(std::process::id())?,
            harness::host_jiffies()?,
        ))
    };
    let before = sample().ok();
    let out = f.await?;
    let usage = match (before, sample().ok()) {
        (Some((t0, (p0, a0), b0, (busy0, tot0))), Some((t1, (p1, a1), b1, (busy1, tot1)))) => {
            let wall = (t1 - t0).as_secs_f64().max(1e-9);
            let cpus = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            let host_busy = (busy1 - busy0) as f64 / (tot1 - tot0).max(1) as f64;
            let proxy_cores = (p1.saturating_sub(p0)).as_secs_f64() / wall;
            let agent_cores = (a1.saturating_sub(a0)).as_secs_f64() / wall;
            let bench_cores = (b1 - b0).as_secs_f64() / wall;
            Some(Usage {
                wall_s: wall,
                proxy_cores,
                agent_cores,
                bench_cores,
                host_busy_pct: 100.0 * host_busy,
                rest_cores: (host_busy * cpus as f64 - proxy_cores - agent_cores - bench_cores)
                    .max(0.0),
            })
        }
        _ => None,
    };
    Ok((out, usage))
}

/// Sizes of the peers' runs: those of the profile, but a quarter of the bulk bytes (at least
/// 64 MiB), half the HTTP time (at least 1 s) and time caps of 5 s on the RTT and connect runs,
/// so that four peers fit in a few minutes (ssh's sequential connections are slow). Rates and
/// medians do not depend on the size; the direct figures are tether's of the same case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerProfile {
    bulk_bytes: u64,
    bulk_cap_s: u64,
    bulk_rounds: usize,
    rtt_count: usize,
    rtt_cap_s: u64,
    conn_count: usize,
    conn_concurrency: usize,
    conn_cap_s: u64,
    http_secs: f64,
    http_1m_secs: f64,
    http_conns: usize,
}

impl PeerProfile {
    pub fn from(p: &Profile) -> PeerProfile {
        PeerProfile {
            bulk_bytes: (p.bulk_bytes / 4).max(64 << 20).min(p.bulk_bytes),
            bulk_cap_s: p.bulk_cap_s,
            bulk_rounds: p.bulk_rounds,
            rtt_count: p.rtt_count,
            rtt_cap_s: p.rtt_cap_s.min(5),
            conn_count: p.conn_count,
            conn_concurrency: p.conn_concurrency,
            conn_cap_s: p.conn_cap_s.min(5),
            http_secs: (p.http_secs / 2.0).max(p.http_secs.min(1.0)),
            http_1m_secs: (p.http_1m_secs / 2.0).max(p.http_1m_secs.min(1.0)),
            http_conns: p.http_conns,
        }
    }
}

/// The direct figure of the tether row `case` (measured in the same case just before).
fn direct_of(rows: &[Row], case: &str) -> Option<f64> {
    rows.iter()
        .rev()
        .find(|r| r.case == case && r.route == "expose")
        .and_then(|r| r.direct)
}

/// rathole-TLS, when it runs: the kube gateway's yardstick. The gateway case measures its
/// plain-L4 rate in rounds interleaved with the gateway's own, so that the host speeding up
/// or slowing down between cases does not move the ratio.
pub fn gateway_yardstick(peers: &Peers) -> Option<&Peer> {
    peers
        .running
        .iter()
        .find(|p| p.kind == PeerKind::RatholeTls)
}

impl Peer {
    /// GETs of `object` over `conns` keep-alive connections through this peer for `dur`,
    /// with the CPU its two ends used.
    pub async fn http_rate(
        &self,
        object: http::Object,
        conns: usize,
        dur: Duration,
    ) -> Result<(http::Http, Option<Usage>)> {
        usage_of(|| self.cpu(), http::run(&self.route, object, conns, dur)).await
    }
}

/// Runs `case` through every running peer, after tether's run of it, and returns the peer rows
/// (route = peer name, no target; usage = the peer's server as "proxy", its client as
/// "agent"). `rows` holds tether's rows so far: the direct figures come from them.
pub async fn run_case(case: Case, ctx: &Ctx, peers: &mut Peers, rows: &[Row]) -> (Vec<Row>, Value) {
    if peers.running.is_empty()
        || !matches!(case, Case::Bulk | Case::Rtt | Case::Connect | Case::Http)
    {
        return (Vec::new(), Value::Null);
    }
    let name = format!("{case:?}").to_lowercase();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut details = Vec::new();
    if case == Case::Bulk {
        // Rounds interleave the peers, as tether's rounds interleave its routes.
        let (r, d) = bulk_rows(ctx, peers, rows).await;
        out.extend(r);
        if let Value::Array(runs) = d {
            details = runs;
        }
    } else {
        for i in 0..peers.running.len() {
            let p = &peers.running[i];
            let result = match case {
                Case::Rtt => rtt_rows(ctx, p, rows).await,
                Case::Connect => connect_rows(ctx, p, rows).await,
                Case::Http => http_rows(ctx, p, rows).await,
                _ => Ok((Vec::new(), Value::Null)),
            };
            match result {
                Ok((r, d)) => {
                    out.extend(r);
                    details.push(json!({ "peer": p.kind.name(), "runs": d }));
                }
                Err(e) => {
                    let kind = p.kind;
                    peers.error(kind, Some(&name), &e);
                }
            }
        }
    }
    drop_dead(peers);
    eprintln!("   peers' {name} took {:.1}s", t0.elapsed().as_secs_f64());
    (out, Value::Array(details))
}

/// Drops (and reports) the peers whose processes have exited.
fn drop_dead(peers: &mut Peers) {
    let mut i = 0;
    while i < peers.running.len() {
        if let Err(e) = peers.running[i].check_alive() {
            let kind = peers.running[i].kind;
            peers.error(kind, None, &e.context("peer process died; dropped"));
            peers.running.remove(i);
        } else {
            i += 1;
        }
    }
}

async fn rtt_rows(ctx: &Ctx, p: &Peer, rows: &[Row]) -> Result<(Vec<Row>, Value)> {
    let prof = &PeerProfile::from(&ctx.profile);
    let (n, cap) = (prof.rtt_count, Duration::from_secs(prof.rtt_cap_s));
    let (t, usage) = usage_of(|| p.cpu(), rtt::run(&p.route, n, cap)).await?;
    let l = &t.latency;
    let name = p.kind.name();
    let mk = |case: &str, v: f64| {
        Row::new(
            case,
            name,
            "us",
            direct_of(rows, case),
            v,
            Compare::Added,
            None,
        )
    };
    let out = vec![
        mk("rtt 64 B p50", l.p50_us).with_usage(usage),
        mk("rtt 64 B p99", l.p99_us),
        mk("rtt 64 B p999", l.p999_us),
    ];
    Ok((out, serde_json::to_value(t)?))
}

async fn connect_rows(ctx: &Ctx, p: &Peer, rows: &[Row]) -> Result<(Vec<Row>, Value)> {
    let prof = &PeerProfile::from(&ctx.profile);
    let cap = Duration::from_secs(prof.conn_cap_s);
    let name = p.kind.name();
    let mut out = Vec::new();
    let mut runs = Vec::new();
    for conc in [1, prof.conn_concurrency] {
        let (t, usage) = usage_of(
            || p.cpu(),
            connect::run(&p.route, prof.conn_count, conc, cap),
        )
        .await?;
        let label = if conc == 1 {
            "new conn, sequential".to_string()
        } else {
            format!("new conn, {conc} in flight")
        };
        let rate = format!("{label}, rate");
        let (p50, p99) = (format!("{label}, p50"), format!("{label}, p99"));
        out.push(
            Row::new(
                rate.clone(),
                name,
                "conn/s",
                direct_of(rows, &rate),
                t.per_sec,
                Compare::Ratio,
                None,
            )
            .with_usage(usage),
        );
        for (case, v) in [(p50, t.latency.p50_us), (p99, t.latency.p99_us)] {
            let d = direct_of(rows, &case);
            out.push(Row::new(case, name, "us", d, v, Compare::Added, None));
        }
        if t.errors > 0 {
            eprintln!("   connect errors via {name}: {}", t.errors);
        }
        runs.push(t);
    }
    Ok((out, serde_json::to_value(runs)?))
}

async fn http_rows(ctx: &Ctx, p: &Peer, rows: &[Row]) -> Result<(Vec<Row>, Value)> {
    let prof = &PeerProfile::from(&ctx.profile);
    let dur = Duration::from_secs_f64(prof.http_secs);
    let (t, usage) = usage_of(
        || p.cpu(),
        http::run(&p.route, http::OBJECT_1K, prof.http_conns, dur),
    )
    .await?;
    let c = prof.http_conns;
    let name = p.kind.name();
    let rate = format!("http GET 1 KiB, {c} conns, rate");
    let mut out = vec![Row::new(
        rate.clone(),
        name,
        "req/s",
        direct_of(rows, &rate),
        t.req_per_s,
        Compare::Ratio,
        None,
    )
    .with_usage(usage)];
    for (q, v) in [("p50", t.latency.p50_us), ("p99", t.latency.p99_us)] {
        let case = format!("http GET 1 KiB, {c} conns, {q}");
        let d = direct_of(rows, &case);
        out.push(Row::new(case, name, "us", d, v, Compare::Added, None));
    }
    // The 1 MiB object: throughput, held against tether's row of the same name.
    let dur_1m = Duration::from_secs_f64(prof.http_1m_secs);
    let (t1m, usage_1m) = usage_of(
        || p.cpu(),
        http::run(&p.route, http::OBJECT_1M, prof.http_conns, dur_1m),
    )
    .await?;
    let tput = format!("http GET 1 MiB, {c} conns, throughput");
    out.push(
        Row::new(
            tput.clone(),
            name,
            "MB/s",
            direct_of(rows, &tput),
            t1m.mb_per_s,
            Compare::Ratio,
            None,
        )
        .with_usage(usage_1m),
    );
    if t.errors > 0 || t1m.errors > 0 {
        eprintln!(
            "   http errors via {name}: {} (1 KiB), {} (1 MiB)",
            t.errors, t1m.errors
        );
    }
    Ok((out, serde_json::to_value([t, t1m])?))
}

/// Bulk through every peer, 1 and 8 streams, rounds interleaving the peers; median per peer.
/// A peer that fails a round is reported and left out of the rest of the case.
async fn bulk_rows(ctx: &Ctx, peers: &mut Peers, rows: &[Row]) -> (Vec<Row>, Value) {
    let prof = &PeerProfile::from(&ctx.profile);
    let cap = Duration::from_secs(prof.bulk_cap_s);
    let mut out = Vec::new();
    let mut failed: Vec<PeerKind> = Vec::new();
    let mut errors: Vec<(PeerKind, anyhow::Error)> = Vec::new();
    let mut runs = Vec::new();
    for streams in [1usize, 8] {
        let mut results: Vec<Vec<(bulk::Bulk, Option<Usage>)>> =
            vec![Vec::new(); peers.running.len()];
        for round in 0..prof.bulk_rounds {
            let mut line = format!("   {streams} stream(s), round {}:", round + 1);
            for (i, p) in peers.running.iter().enumerate() {
                if failed.contains(&p.kind) {
                    continue;
                }
                match usage_of(
                    || p.cpu(),
                    bulk::run(&p.route, streams, prof.bulk_bytes, cap),
                )
                .await
                {
                    Ok((b, u)) => {
                        line += &format!(
                            " {} {:.0}{}",
                            p.kind.name(),
                            b.mb_per_s,
                            if b.capped { " (time cap hit)" } else { "" }
                        );
                        runs.push(json!({ "peer": p.kind.name(), "run": b, "usage": u }));
                        results[i].push((b, u));
                    }
                    Err(e) => {
                        failed.push(p.kind);
                        line += &format!(" {} failed", p.kind.name());
                        errors.push((p.kind, e));
                    }
                }
            }
            eprintln!("{line} MB/s");
        }
        let label = if streams == 1 {
            "bulk, 1 stream".to_string()
        } else {
            format!("bulk, {streams} streams")
        };
        let direct = direct_of(rows, &label);
        for (p, res) in peers.running.iter().zip(&results) {
            if res.is_empty() || failed.contains(&p.kind) {
                continue;
            }
            let (b, u) = median_by(res, |(b, _)| b.mb_per_s);
            out.push(
                Row::new(
                    label.clone(),
                    p.kind.name(),
                    "MB/s",
                    direct,
                    b.mb_per_s,
                    Compare::Ratio,
                    None,
                )
                .with_usage(*u),
            );
        }
    }
    for (kind, e) in errors {
        peers.error(kind, Some("bulk"), &e);
    }
    (out, Value::Array(runs))
}

/// What [`apply_targets`] decided, for the JSON and the printed summary.
pub struct Targets {
    /// `peers in this run`, `issue constants and the unencrypted reference` or `issue
    /// constants`.
    pub source: &'static str,
    /// Per compared figure: tether, each peer, the best encrypted one, the target.
    pub comparison: Vec<Value>,
    /// The printed summary (empty when no peer ran).
    pub text: String,
}

/// Sets tether's `expose` ratio targets from the peers' rows of this run: for every `expose`
/// row held to a [`Target::RatioAtLeast`] that peers measured too, the target becomes
/// `max(factor × best encrypted peer's ratio, unencrypted reference's ratio)`. Without an
/// encrypted peer the issue's constant stays (raised to the reference when that ran).
pub fn apply_targets(rows: &mut [Row], factor: f64) -> Targets {
    let mut from_peers = false;
    let mut from_reference = false;
    let mut comparison = Vec::new();
    let mut lines: Vec<Vec<String>> = Vec::new();
    let peer_cols: Vec<PeerKind> = PeerKind::ALL
        .into_iter()
        .filter(|k| rows.iter().any(|r| r.route == k.name()))
        .collect();
    for i in 0..rows.len() {
        let r = &rows[i];
        let latency_row = r.compare == Compare::Added
            && r.case.starts_with("rtt 64 B p")
            && !r.case.ends_with("p999");
        if r.route != "expose" || !(r.compare == Compare::Ratio || latency_row) {
            continue;
        }
        let peer_rows = peer_rows_of(rows, &peer_cols, &r.case);
        if peer_rows.is_empty() {
            continue;
        }
        // Best encrypted: highest share of direct, or least added latency.
        let better = |a: f64, b: f64| {
            if r.compare == Compare::Ratio {
                a > b
            } else {
                a < b
            }
        };
        let mut best: Option<(PeerKind, f64)> = None;
        for (k, p) in &peer_rows {
            if let (true, Some(d)) = (k.encrypted(), p.delta) {
                if best.is_none_or(|(_, b)| better(d, b)) {
                    best = Some((*k, d));
                }
            }
        }
        let reference = peer_rows
            .iter()
            .find(|(k, _)| !k.encrypted())
            .and_then(|(_, p)| p.delta);
        let mut new_target = r.target;
        let mut source = "issue constants";
        if let Some(Target::RatioAtLeast(old)) = r.target {
            match (best, reference) {
                (Some((_, b)), refr) => {
                    new_target = Some(Target::RatioAtLeast((factor * b).max(refr.unwrap_or(0.0))));
                    source = "peers in this run";
                    from_peers = true;
                }
                (None, Some(refr)) => {
                    new_target = Some(Target::RatioAtLeast(old.max(refr)));
                    source = "issue constants and the unencrypted reference";
                    from_reference = true;
                }
                (None, None) => {}
            }
        }
        let tether_over_best = match (best, r.delta, r.compare) {
            (Some((_, b)), Some(t), Compare::Ratio) if b > 0.0 => Some(t / b),
            _ => None,
        };
        comparison.push(json!({
            "case": r.case,
            "unit": r.unit,
            "compare": r.compare,
            "direct": r.direct,
            "tether": r.tunnel,
            "tetherDelta": r.delta,
            "peers": peer_rows.iter().map(|(k, p)| json!({
                "peer": k.name(), "encrypted": k.encrypted(), "value": p.tunnel, "delta": p.delta,
            })).collect::<Vec<_>>(),
            "bestEncrypted": best.map(|(k, d)| json!({ "peer": k.name(), "delta": d })),
            "reference": reference,
            "tetherOverBestEncrypted": tether_over_best,
            "tetherMinusBestEncryptedAdded": match (best, r.delta, r.compare) {
                (Some((_, b)), Some(t), Compare::Added) => Some(t - b),
                _ => None,
            },
            "target": new_target,
            "targetSource": source,
        }));
        // The printed line.
        let cell = |v: f64, d: Option<f64>| match (r.compare, d) {
            (Compare::Ratio, Some(p)) => format!("{} ({p:.0}%)", num(v)),
            (Compare::Added, Some(a)) => format!("{}{}", if a >= 0.0 { "+" } else { "" }, num(a)),
            _ => num(v),
        };
        let mut line = vec![
            r.case.clone(),
            r.unit.to_string(),
            r.direct.map(num).unwrap_or_else(|| "-".into()),
            cell(r.tunnel, r.delta),
        ];
        for k in &peer_cols {
            line.push(
                peer_rows
                    .iter()
                    .find(|(pk, _)| pk == k)
                    .map(|(_, p)| cell(p.tunnel, p.delta))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        line.push(match (best, r.delta, r.compare) {
            (Some((k, b)), Some(t), Compare::Ratio) if b > 0.0 => {
                format!("{:.2}x {}", t / b, k.name())
            }
            (Some((k, b)), Some(t), Compare::Added) => {
                format!(
                    "{}{} us vs {}",
                    if t - b >= 0.0 { "+" } else { "" },
                    num(t - b),
                    k.name()
                )
            }
            _ => "-".into(),
        });
        let r = &mut rows[i];
        if new_target != r.target {
            let usage = r.usage;
            *r = Row::new(
                r.case.clone(),
                r.route,
                r.unit,
                r.direct,
                r.tunnel,
                r.compare,
                new_target,
            )
            .with_usage(usage);
        }
        line.push(match (r.target, r.meets) {
            (Some(Target::RatioAtLeast(p)), Some(m)) => {
                format!(">= {p:.1}% {}", if m { "yes" } else { "NO" })
            }
            (Some(Target::AddedAtMost(v)), Some(m)) => {
                format!("<= +{v:.0} {}", if m { "yes" } else { "NO" })
            }
            _ => "-".into(),
        });
        lines.push(line);
    }
    // The kube gateway: at least the req/s rathole-TLS manages at plain L4 (1 KiB) in this run,
    // written as a share of the gateway's own (HTTPS) direct figure. The figure measured in
    // rounds interleaved with the gateway's (the gateway case's rathole-tls row) is preferred
    // to the HTTP case's, which was taken minutes earlier.
    let l4_of = |case: &str| {
        rows.iter()
            .find(|p| {
                p.route == PeerKind::RatholeTls.name()
                    && p.case.starts_with(case)
                    && p.case.ends_with(", rate")
            })
            .map(|p| p.tunnel)
    };
    let l4 = match l4_of("kube gateway GET 1 KiB,") {
        Some(v) => Some((
            v,
            "1.0x rathole-tls req/s at L4 (1 KiB), in rounds interleaved with the gateway's",
        )),
        None => l4_of("http GET 1 KiB,")
            .map(|v| (v, "1.0x rathole-tls req/s at L4 (http 1 KiB) in this run")),
    };
    if let Some((rathole_tls, l4_source)) = l4 {
        for r in rows.iter_mut() {
            if r.route == "gateway"
                && r.case.starts_with("kube gateway GET 1 KiB,")
                && r.case.ends_with(", rate")
            {
                if let Some(direct) = r.direct.filter(|d| *d > 0.0) {
                    let target = Some(Target::RatioAtLeast(100.0 * rathole_tls / direct));
                    let usage = r.usage;
                    *r = Row::new(
                        r.case.clone(),
                        r.route,
                        r.unit,
                        r.direct,
                        r.tunnel,
                        r.compare,
                        target,
                    )
                    .with_usage(usage);
                    comparison.push(json!({
                        "case": r.case,
                        "unit": r.unit,
                        "compare": r.compare,
                        "direct": r.direct,
                        "tether": r.tunnel,
                        "ratholeTlsL4": rathole_tls,
                        "tetherOverRatholeTlsL4": r.tunnel / rathole_tls,
                        "target": target,
                        "targetSource": l4_source,
                    }));
                    lines.push(
                        vec![
                            r.case.clone(),
                            r.unit.to_string(),
                            num(direct),
                            format!("{} ({:.0}%)", num(r.tunnel), r.delta.unwrap_or(0.0)),
                        ]
                        .into_iter()
                        .chain(peer_cols.iter().map(|k| {
                            if *k == PeerKind::RatholeTls {
                                format!("{} at L4", num(rathole_tls))
                            } else {
                                "-".into()
                            }
                        }))
                        .chain([
                            format!("{:.2}x rathole-tls L4", r.tunnel / rathole_tls),
                            format!(
                                ">= {:.1}% {}",
                                100.0 * rathole_tls / direct,
                                if r.meets == Some(true) { "yes" } else { "NO" }
                            ),
                        ])
                        .collect(),
                    );
                }
            }
        }
    }
    let source = if from_peers {
        "peers in this run"
    } else if from_reference {
        "issue constants and the unencrypted reference"
    } else {
        "issue constants"
    };
    let text = if lines.is_empty() {
        String::new()
    } else {
        let mut header: Vec<String> = ["case", "unit", "direct", "tether"]
            .map(String::from)
            .to_vec();
        header.extend(peer_cols.iter().map(|k| k.column()));
        header.push("tether vs best encrypted".into());
        header.push("tether target, met".into());
        text_table(header, lines)
    };
    Targets {
        source,
        comparison,
        text,
    }
}

/// Runs shorter than this get a `*` in the CPU table: CPU times count in 10 ms ticks, so one
/// tick is then more than 2% of a core (the quick profile's connect and bulk runs).
pub const SHORT_RUN_S: f64 = 0.5;

/// What [`cpu_table`] found: CPU per unit of work of tether and the peers.
pub struct CpuComparison {
    /// Per rate or throughput figure: tether, each peer, the best encrypted one.
    pub comparison: Vec<Value>,
    /// The printed table (empty when no `expose` row has a CPU per unit).
    pub text: String,
}

/// The rows of case `case` measured through each peer of `peer_cols` that has one.
fn peer_rows_of<'a>(
    rows: &'a [Row],
    peer_cols: &[PeerKind],
    case: &str,
) -> Vec<(PeerKind, &'a Row)> {
    peer_cols
        .iter()
        .filter_map(|k| {
            rows.iter()
                .find(|p| p.route == k.name() && p.case == case)
                .map(|p| (*k, p))
        })
        .collect()
}

/// CPU per unit of work of both tunnel ends, for every `expose` rate or throughput row with
/// usage, next to the peers' rows of the same case, and tether ÷ the best (cheapest)
/// encrypted peer. A cell is the tunnel's CPU per unit, then the bench process' CPU per unit
/// and how busy the host was, and `*` for a run shorter than [`SHORT_RUN_S`].
pub fn cpu_table(rows: &[Row]) -> CpuComparison {
    let peer_cols: Vec<PeerKind> = PeerKind::ALL
        .into_iter()
        .filter(|k| rows.iter().any(|r| r.route == k.name()))
        .collect();
    let cell = |r: &Row| match (r.cpu_per_unit(), r.usage) {
        (Some(c), Some(u)) => format!(
            "{} (bench {}, {:.0}%){}",
            num(c.tunnel),
            num(c.bench),
            u.host_busy_pct,
            if u.wall_s < SHORT_RUN_S { " *" } else { "" }
        ),
        _ => "-".into(),
    };
    let figures = |r: &Row| {
        r.cpu_per_unit().map(|c| {
            json!({
                "tunnel": c.tunnel,
                "bench": c.bench,
                "hostBusyPct": r.usage.map(|u| u.host_busy_pct),
            })
        })
    };
    let mut comparison = Vec::new();
    let mut lines: Vec<Vec<String>> = Vec::new();
    for r in rows.iter().filter(|r| r.route == "expose") {
        let Some(c) = r.cpu_per_unit() else {
            continue;
        };
        let peer_rows = peer_rows_of(rows, &peer_cols, &r.case);
        let mut best: Option<(PeerKind, f64)> = None;
        for (k, p) in &peer_rows {
            if let (true, Some(pc)) = (k.encrypted(), p.cpu_per_unit()) {
                if best.is_none_or(|(_, b)| pc.tunnel < b) {
                    best = Some((*k, pc.tunnel));
                }
            }
        }
        let over_best = best
            .filter(|(_, b)| *b > 0.0)
            .map(|(k, b)| (k, c.tunnel / b));
        comparison.push(json!({
            "case": r.case,
            "unit": c.unit,
            "tether": figures(r),
            "peers": peer_rows.iter().map(|(k, p)| json!({
                "peer": k.name(), "encrypted": k.encrypted(), "cpu": figures(p),
            })).collect::<Vec<_>>(),
            "bestEncrypted": best.map(|(k, b)| json!({ "peer": k.name(), "tunnel": b })),
            "tetherOverBestEncrypted": over_best.map(|(_, x)| x),
        }));
        let mut line = vec![r.case.clone(), c.unit.to_string(), cell(r)];
        for k in &peer_cols {
            line.push(
                peer_rows
                    .iter()
                    .find(|(pk, _)| pk == k)
                    .map(|(_, p)| cell(p))
                    .unwrap_or_else(|| "-".into()),
            );
        }
        line.push(
            over_best
                .map(|(k, x)| format!("{x:.2}x {}", k.name()))
                .unwrap_or_else(|| "-".into()),
        );
        lines.push(line);
    }
    let text = if lines.is_empty() {
        String::new()
    } else {
        let mut header: Vec<String> = ["case", "CPU per", "tether"].map(String::from).to_vec();
        header.extend(peer_cols.iter().map(|k| k.column()));
        header.push("tether vs best encrypted".into());
        text_table(header, lines)
    };
    CpuComparison { comparison, text }
}

/// A fixed-width Markdown table; the first two columns left-aligned.
fn text_table(header: Vec<String>, lines: Vec<Vec<String>>) -> String {
    let mut cells = vec![header];
    cells.extend(lines);
    crate::report::markdown_table(cells, 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ratio(case: &str, route: &'static str, v: f64, target: Option<f64>) -> Row {
        Row::new(
            case,
            route,
            "MB/s",
            Some(1000.0),
            v,
            Compare::Ratio,
            target.map(Target::RatioAtLeast),
        )
    }

    #[test]
    fn targets_from_peers() {
        let mut rows = vec![
            ratio("bulk, 1 stream", "expose", 400.0, Some(30.0)),
            ratio("bulk, 1 stream", "rathole-tls", 250.0, None),
            ratio("bulk, 1 stream", "ssh", 300.0, None),
            ratio("bulk, 1 stream", "rathole", 380.0, None),
            ratio("bulk, 8 streams", "expose", 400.0, Some(30.0)),
            ratio("bulk, 8 streams", "rathole", 450.0, None),
            ratio("new conn", "expose", 400.0, Some(42.0)),
        ];
        let t = apply_targets(&mut rows, 1.2);
        assert_eq!(t.source, "peers in this run");
        // max(1.2 × 30%, 38%) = 38%.
        assert_eq!(rows[0].target, Some(Target::RatioAtLeast(38.0)));
        assert_eq!(rows[0].meets, Some(true));
        // Only the reference: the constant raised to it.
        assert_eq!(rows[4].target, Some(Target::RatioAtLeast(45.0)));
        assert_eq!(rows[4].meets, Some(false));
        // No peer measured it: unchanged.
        assert_eq!(rows[6].target, Some(Target::RatioAtLeast(42.0)));
        assert_eq!(t.comparison.len(), 2);
        assert!(t.text.contains("1.33x ssh"), "{}", t.text);
        assert!(is_peer_route("ssh") && !is_peer_route("expose"));
    }

    #[test]
    fn cpu_per_unit_table() {
        let usage = |tunnel_cores: f64| Usage {
            wall_s: 1.0,
            proxy_cores: tunnel_cores / 2.0,
            agent_cores: tunnel_cores / 2.0,
            bench_cores: 0.5,
            host_busy_pct: 95.0,
            rest_cores: 0.0,
        };
        let rate = |route: &'static str, v: f64, cores: f64| {
            Row::new(
                "http rate",
                route,
                "req/s",
                Some(40_000.0),
                v,
                Compare::Ratio,
                None,
            )
            .with_usage(Some(usage(cores)))
        };
        let rows = vec![
            rate("expose", 10_000.0, 1.0),     // 100 us/req
            rate("rathole-tls", 5_000.0, 1.0), // 200 us/req
            rate("ssh", 8_000.0, 1.2),         // 150 us/req, the cheapest encrypted
            rate("rathole", 20_000.0, 1.0),    // 50 us/req, unencrypted: not "best"
            Row::new("rtt", "expose", "us", None, 60.0, Compare::Added, None)
                .with_usage(Some(usage(1.0))),
        ];
        let t = cpu_table(&rows);
        assert_eq!(t.comparison.len(), 1);
        let x = t.comparison[0]["tetherOverBestEncrypted"].as_f64().unwrap();
        assert!((x - 100.0 / 150.0).abs() < 1e-9, "{x}");
        assert_eq!(t.comparison[0]["bestEncrypted"]["peer"], "ssh");
        assert!(t.text.contains("0.67x ssh"), "{}", t.text);
        assert!(t.text.contains("100 (bench 50.0, 95%)"), "{}", t.text);
        assert_eq!(t.text.lines().count(), 3);
    }

    #[test]
    fn gateway_held_to_rathole_tls_at_l4_measured_beside_it() {
        let gateway = |v: f64| {
            Row::new(
                "kube gateway GET 1 KiB, 64 conns, rate",
                "gateway",
                "req/s",
                Some(100_000.0),
                v,
                Compare::Ratio,
                Some(Target::RatioAtLeast(32.0)),
            )
        };
        let l4 = |case: &str, v: f64| {
            Row::new(case, "rathole-tls", "req/s", None, v, Compare::Ratio, None)
        };
        let http_case = l4("http GET 1 KiB, 64 conns, rate", 50_000.0);
        let beside = l4("kube gateway GET 1 KiB, 64 conns, rate", 40_000.0);

        // Only the HTTP case's figure: 45k against 50k misses.
        let mut rows = vec![gateway(45_000.0), http_case.clone()];
        let t = apply_targets(&mut rows, 1.2);
        assert_eq!(rows[0].target, Some(Target::RatioAtLeast(50.0)));
        assert_eq!(rows[0].meets, Some(false));
        let c = &t.comparison[0];
        assert_eq!(c["ratholeTlsL4"], 50_000.0);
        assert!(c["targetSource"].as_str().unwrap().contains("http 1 KiB"));

        // The figure measured in the gateway's rounds wins over the HTTP case's.
        let mut rows = vec![gateway(45_000.0), http_case, beside];
        let t = apply_targets(&mut rows, 1.2);
        assert_eq!(rows[0].target, Some(Target::RatioAtLeast(40.0)));
        assert_eq!(rows[0].meets, Some(true));
        let c = &t.comparison[0];
        assert_eq!(c["ratholeTlsL4"], 40_000.0);
        assert_eq!(c["tetherOverRatholeTlsL4"], 1.125);
        assert!(c["targetSource"].as_str().unwrap().contains("interleaved"));
        assert!(t.text.contains("1.12x rathole-tls L4"), "{}", t.text);
    }

    #[test]
    fn no_peers_keeps_constants() {
        let mut rows = vec![ratio("bulk, 1 stream", "expose", 400.0, Some(30.0))];
        let t = apply_targets(&mut rows, 1.2);
        assert_eq!(t.source, "issue constants");
        assert!(t.text.is_empty() && t.comparison.is_empty());
        assert_eq!(rows[0].target, Some(Target::RatioAtLeast(30.0)));
    }

    #[test]
    fn peer_list() {
        assert!(PeerKind::parse("bogus").is_err());
        assert_eq!(
            PeerKind::parse("rathole-tls").unwrap(),
            PeerKind::RatholeTls
        );
        assert!(select(Some("none")).unwrap().chosen.is_empty());
    }
}
