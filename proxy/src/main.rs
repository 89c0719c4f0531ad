//! The `tether-proxy` command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use tether_proto::token::Claims;
use tether_proxy::serve::{self, REVOKED};
use tether_proxy::settings::{ServeArgs, DEFAULT_ADMIN_ADDR, DEFAULT_STATE_DIR};

/// The front's URL when none is given: the default front port on this machine.
const DEFAULT_FRONT_URL: &str = "https://localhost:9443";
use tether_proxy::state::StateDir;

/// tether-proxy: the host side of tether, a reverse tunnel to member clusters' API servers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(long, env = "TETHER_LOG_FORMAT", default_value = "text", global = true)]
    log_format: String,
    /// Event loops (threads) serving agents and callers, each agent session pinned to one
    /// [default: one per CPU]. See the `shards` module.
    #[arg(long, env = "TETHER_WORKER_THREADS", global = true)]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy.
    Serve(ServeArgs),
    /// Create the state dir (CA, serving certificate, signing key) without serving.
    Init {
        #[arg(long, env = "TETHER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Extra names for the serving certificate (the publish address host).
        #[arg(long = "name")]
        names: Vec<String>,
        /// Print a Kubernetes Secret holding the state (CA, signing key, revocations) for the
        /// proxy's Deployment, instead of a message: `... --output-secret | kubectl apply -f -`.
        #[arg(long)]
        output_secret: bool,
        /// Name of that Secret.
        #[arg(long, default_value = "tether-proxy-state")]
        secret_name: String,
        /// Namespace of that Secret.
        #[arg(long, default_value = "tether-system")]
        namespace: String,
        /// First copy the state files found in this directory (a mounted Secret) into
        /// --state-dir: how the proxy's pod gets a writable state dir.
        #[arg(long)]
        from: Option<PathBuf>,
    },
    /// Print a complete, ready-to-apply agent manifest for a member cluster (Namespace,
    /// ServiceAccount, RBAC, Secret with a fresh agent token and the CA, Deployment).
    Manifest(ManifestArgs),
    /// Check a member cluster through the tunnel, step by step: agent connected, API server
    /// reachable, /version, listing namespaces. Exits 0 only when every step passed.
    Check {
        #[arg(long, env = "TETHER_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
        admin_addr: String,
        #[arg(long)]
        cluster: String,
        /// List pods in this namespace instead of listing namespaces.
        #[arg(long)]
        namespace: Option<String>,
        /// Skip the listing step (for agents whose identity may not list).
        #[arg(long)]
        skip_namespace_check: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Mint or revoke tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print a kubeconfig for the kube gateway (`https://FRONT/clusters/NAME`), with the
    /// proxy's CA embedded and a freshly minted client token.
    Kubeconfig {
        #[arg(long, env = "TETHER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// The member cluster the kubeconfig points at.
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        user: String,
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Cluster patterns the token may reach [default: just --cluster].
        #[arg(long, value_delimiter = ',')]
        clusters: Vec<String>,
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// The front's URL as callers reach it.
        #[arg(long, env = "TETHER_FRONT_URL", default_value = DEFAULT_FRONT_URL)]
        server: String,
    },
    /// Client certificates for the kube gateway.
    #[command(subcommand)]
    Cert(CertCommand),
    /// Show every cluster's status from a running proxy.
    Clusters {
        #[arg(long, env = "TETHER_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
        admin_addr: String,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Flags of `tether-proxy manifest`.
#[derive(Debug, clap::Args)]
struct ManifestArgs {
    #[arg(long, env = "TETHER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// The member cluster's name (the agent token is valid for it only).
    #[arg(long)]
    cluster: String,
    /// Namespace of the agent in the member cluster.
    #[arg(long, default_value = tether_proxy::manifest::DEFAULT_NAMESPACE)]
    namespace: String,
    /// How the agent dials: auto (QUIC, falling back to TLS), tls or quic [default: auto].
    #[arg(long, value_parser = ["auto", "tls", "quic"])]
    transport: Option<String>,
    /// Agent replicas (spread over nodes when more than one).
    #[arg(long, default_value_t = 1)]
    replicas: u32,
    /// Labels the agent reports to the proxy, k=v,... (repeatable).
    #[arg(long)]
    labels: Vec<String>,
    /// The tether image (it holds tether-agent).
    #[arg(long, env = "TETHER_AGENT_IMAGE", default_value = tether_proxy::manifest::DEFAULT_IMAGE)]
    image: String,
    /// The address agents dial [default: asked from the running proxy at --admin-addr].
    #[arg(long, env = "TETHER_PUBLISH_ADDRESS")]
    publish_address: Option<String>,
    /// The running proxy's admin address, asked for the publish address.
    #[arg(long, env = "TETHER_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    admin_addr: String,
    /// Lifetime of the agent token, e.g. 8760h [default: no expiry].
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// The agent's drain on SIGTERM; the pod's grace period is this plus 10s.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    drain_timeout: Duration,
}

#[derive(Debug, Subcommand)]
enum CertCommand {
    /// Write a client certificate and key (CN = user, O = group, OU = cluster patterns),
    /// signed by the proxy's CA, and a ready kubeconfig using them.
    Client {
        #[arg(long, env = "TETHER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long)]
        user: String,
        /// The user's group (at most one in a certificate; use a token for more).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Cluster patterns the certificate may reach, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        clusters: Vec<String>,
        /// The cluster the kubeconfig's context points at [default: the first pattern].
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long, default_value = "8760h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Directory for USER.crt, USER.key and USER.kubeconfig.
        #[arg(long, default_value = ".")]
        out_dir: PathBuf,
        #[arg(long, env = "TETHER_FRONT_URL", default_value = DEFAULT_FRONT_URL)]
        server: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Print an agent token for one cluster.
    Agent {
        #[arg(long, env = "TETHER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long)]
        cluster: String,
        /// Lifetime, e.g. 720h; no expiry when omitted.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Print a client token for callers on the front.
    Client {
        #[arg(long, env = "TETHER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[arg(long)]
        user: String,
        #[arg(long = "group")]
        groups: Vec<String>,
        /// Cluster name patterns the token may reach, comma-separated; `*` matches any run.
        #[arg(long, value_delimiter = ',', required = true)]
        clusters: Vec<String>,
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    /// Revoke a token by its id (the `jti` claim); a running proxy picks it up on SIGHUP.
    Revoke {
        #[arg(long, env = "TETHER_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        id: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tether_proto::process::init_logging(&cli.log_format);
    match cli.command {
        Command::Serve(args) => {
            let settings = args.resolve()?;
            // Shard 0 is this thread's single-threaded runtime; `serve::run` starts the rest.
            let loops = cli
                .worker_threads
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            tether_proto::process::runtime(Some(1))?.block_on(serve::run(settings, loops))
        }
        Command::Init {
            state_dir,
            mut names,
            output_secret,
            secret_name,
            namespace,
            from,
        } => {
            if let Some(from) = &from {
                copy_state(from, &state_dir)?;
            }
            names.extend(["localhost".into(), "127.0.0.1".into(), "::1".into()]);
            StateDir::open(&state_dir, &names)?;
            if output_secret {
                print!("{}", state_secret(&state_dir, &secret_name, &namespace)?);
            } else {
                println!("state dir {} is ready", state_dir.display());
            }
            Ok(())
        }
        Command::Manifest(args) => manifest(args),
        Command::Check {
            admin_addr,
            cluster,
            namespace,
            skip_namespace_check,
            json,
        } => {
            let opts = tether_proxy::check::CheckOptions {
                namespace,
                skip_namespace_check,
            };
            if !tether_proxy::check::cli(&admin_addr, &cluster, &opts, json)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Token(TokenCommand::Agent {
            state_dir,
            cluster,
            ttl,
        }) => {
            let key = StateDir::signing_key(&state_dir)?;
            println!("{}", key.mint(&Claims::agent(&cluster, ttl)?));
            Ok(())
        }
        Command::Token(TokenCommand::Client {
            state_dir,
            user,
            groups,
            clusters,
            ttl,
        }) => {
            let key = StateDir::signing_key(&state_dir)?;
            println!(
                "{}",
                key.mint(&Claims::client(&user, groups, clusters, ttl)?)
            );
            Ok(())
        }
        Command::Token(TokenCommand::Revoke { state_dir, id }) => {
            let path = state_dir.join(REVOKED);
            let mut set = serve::load_revoked(&state_dir)?;
            set.insert(id.clone());
            let mut ids: Vec<_> = set.into_iter().collect();
            ids.sort();
            tether_proto::tls::write_private_file(&path, (ids.join("\n") + "\n").as_bytes())?;
            println!("revoked {id}; send SIGHUP to running proxies (or restart them) to apply it");
            Ok(())
        }
        Command::Clusters { admin_addr, json } => clusters(&admin_addr, json),
        Command::Kubeconfig {
            state_dir,
            cluster,
            user,
            groups,
            mut clusters,
            ttl,
            server,
        } => {
            tether_proto::name::validate_cluster_name(&cluster).map_err(anyhow::Error::msg)?;
            if clusters.is_empty() {
                clusters.push(cluster.clone());
            }
            let key = StateDir::signing_key(&state_dir)?;
            let token = key.mint(&Claims::client(&user, groups, clusters, ttl)?);
            let ca = StateDir::ca_cert(&state_dir)?;
            print!(
                "{}",
                kubeconfig(&server, &cluster, &user, &ca, Credential::Token(&token))
            );
            Ok(())
        }
        Command::Cert(CertCommand::Client {
            state_dir,
            user,
            groups,
            clusters,
            cluster,
            ttl,
            out_dir,
            server,
        }) => {
            for p in &clusters {
                tether_proto::token::validate_pattern(p).map_err(anyhow::Error::msg)?;
            }
            let cluster = cluster.unwrap_or_else(|| clusters[0].clone());
            tether_proto::name::validate_cluster_name(&cluster)
                .map_err(|e| anyhow::anyhow!("{e} (name one with --cluster)"))?;
            let state = StateDir::open(&state_dir, &["localhost".into()])?;
            let leaf = state.ca.issue_client(&user, &groups, &clusters, ttl)?;
            std::fs::create_dir_all(&out_dir)?;
            let write = |ext: &str, data: &str| -> Result<PathBuf> {
                let path = out_dir.join(format!("{user}.{ext}"));
                tether_proto::tls::write_private_file(&path, data.as_bytes())?;
                Ok(path)
            };
            let cert = write("crt", &leaf.cert_pem)?;
            let key = write("key", &leaf.key_pem)?;
            let config = kubeconfig(
                &server,
                &cluster,
                &user,
                state.ca.cert_pem(),
                Credential::Certificate(&leaf.cert_pem, &leaf.key_pem),
            );
            let kc = write("kubeconfig", &config)?;
            println!(
                "wrote {}, {} and {}",
                cert.display(),
                key.display(),
                kc.display()
            );
            Ok(())
        }
    }
}

/// State files a Secret carries (the serving certificate is issued per pod).
const SECRET_FILES: &[&str] = &[
    "ca.crt",
    "ca.key",
    "signing.key",
    "revoked.txt",
    "clusters.json",
];

/// `init --from DIR`: copies the state files DIR has into `state_dir` (mode 0600).
fn copy_state(from: &std::path::Path, state_dir: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("creating state dir {}", state_dir.display()))?;
    let mut copied = 0;
    for name in SECRET_FILES.iter().chain(&["server.crt", "server.key"]) {
        let src = from.join(name);
        match std::fs::read(&src) {
            Ok(data) => {
                tether_proto::tls::write_private_file(&state_dir.join(name), &data)?;
                copied += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {}", src.display())),
        }
    }
    for required in ["ca.crt", "ca.key", "signing.key"] {
        if !state_dir.join(required).exists() {
            anyhow::bail!(
                "{} has no {required}: create the Secret with `tether-proxy init --state-dir DIR \
                 --output-secret | kubectl apply -f -`",
                from.display()
            );
        }
    }
    tracing::info!(from = %from.display(), to = %state_dir.display(), files = copied, "copied the state");
    Ok(())
}

/// `init --output-secret`: a Secret manifest holding the state dir's long-lived files.
fn state_secret(state_dir: &std::path::Path, name: &str, namespace: &str) -> Result<String> {
    use base64::Engine;
    tether_proxy::check::validate_namespace(namespace).map_err(anyhow::Error::msg)?;
    tether_proto::name::validate_cluster_name(name)
        .map_err(|e| anyhow::anyhow!("--secret-name: {e}"))?;
    let mut data = String::new();
    for file in SECRET_FILES {
        match std::fs::read(state_dir.join(file)) {
            Ok(bytes) => data.push_str(&format!(
                "  {file}: {}\n",
                base64::engine::general_purpose::STANDARD.encode(bytes)
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("reading {file}")),
        }
    }
    Ok(format!(
        "# tether proxy state from {dir}: the CA, its key and the token signing key.\n\
         # Whoever holds them can mint tokens and certificates: keep this private.\n\
         # Apply in the host cluster: kubectl apply -f THIS_FILE (or pipe into kubectl apply -f -)\n\
         apiVersion: v1\n\
         kind: Secret\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    app.kubernetes.io/name: tether-proxy\n    app.kubernetes.io/part-of: tether\n\
         type: Opaque\n\
         data:\n{data}",
        dir = state_dir.display(),
    ))
}

/// `tether-proxy manifest`: resolves the publish address, mints a token, prints the manifest.
fn manifest(args: ManifestArgs) -> Result<()> {
    use tether_proxy::settings::PublishAddress;
    tether_proto::name::validate_cluster_name(&args.cluster).map_err(anyhow::Error::msg)?;
    let publish_address = match args.publish_address.as_deref().map(str::trim) {
        Some(p) if !p.is_empty() && !p.eq_ignore_ascii_case("auto") => PublishAddress::parse(p)?,
        _ => publish_address_from_proxy(&args.admin_addr)?,
    };
    let key = StateDir::signing_key(&args.state_dir)?;
    let claims = Claims::agent(&args.cluster, args.ttl)?;
    let token = key.mint(&claims);
    let manifest = tether_proxy::manifest::AgentManifest {
        cluster: args.cluster.clone(),
        namespace: args.namespace,
        publish_address,
        transport: args.transport,
        replicas: args.replicas,
        labels: tether_proxy::manifest::parse_labels(&args.labels)?,
        image: args.image,
        token,
        token_id: claims.jti.clone(),
        ca_pem: StateDir::ca_cert(&args.state_dir)?,
        drain_timeout: args.drain_timeout,
    };
    let text = manifest.render()?;
    print!("{text}");
    eprintln!(
        "manifest for cluster {}: the agent dials {}; token id {}{}",
        args.cluster,
        manifest.proxy_url(),
        claims.jti,
        claims
            .exp
            .map(|e| format!(", expires at Unix time {e}"))
            .unwrap_or_else(|| ", no expiry".into())
    );
    Ok(())
}

/// Asks the running proxy for its publish address; fails, saying what to do, when it has
/// none that a member cluster could reach.
fn publish_address_from_proxy(admin_addr: &str) -> Result<tether_proxy::settings::PublishAddress> {
    let (code, body) = tether_proxy::check::admin_get(
        admin_addr,
        "/api/v1/publish-address",
        Duration::from_secs(10),
    )
    .with_context(|| {
        format!(
            "no --publish-address given, and the running proxy could not be asked for its \
                 own at --admin-addr {admin_addr}: pass --publish-address tls://HOST:PORT (the \
                 address member clusters reach the proxy's agent port at), or the proxy's \
                 --admin-addr"
        )
    })?;
    anyhow::ensure!(
        code == 200,
        "the proxy at {admin_addr} answered {code} for its publish address: {}; pass \
         --publish-address tls://HOST:PORT",
        body.trim()
    );
    let status: serde_json::Value =
        serde_json::from_str(&body).context("parsing the publish address")?;
    let message = status["message"].as_str().unwrap_or("").to_string();
    let Some(addr) = status["publishAddress"].as_str() else {
        anyhow::bail!(
            "the proxy does not know its publish address yet: {message}. Wait until it has one \
             (`curl http://{admin_addr}/readyz` says), or pass --publish-address tls://HOST:PORT"
        );
    };
    if status["source"] == "default" {
        anyhow::bail!(
            "the running proxy publishes {addr}, only a default taken from its listen address \
             (it was started without --publish-address), which member clusters cannot reach. \
             Restart it with --publish-address tls://PUBLIC_HOST:PORT (or auto behind a \
             LoadBalancer), or pass --publish-address here"
        );
    }
    tether_proxy::settings::PublishAddress::parse(addr)
}

/// How a kubeconfig user authenticates to the gateway.
enum Credential<'a> {
    Token(&'a str),
    Certificate(&'a str, &'a str),
}

/// A kubeconfig whose server is the gateway path of `cluster`, trusting the proxy's CA.
fn kubeconfig(
    server: &str,
    cluster: &str,
    user: &str,
    ca_pem: &str,
    cred: Credential<'_>,
) -> String {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let user_entry = match cred {
        Credential::Token(t) => format!("    token: {t}\n"),
        Credential::Certificate(c, k) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(c),
            b64(k)
        ),
    };
    let server = server.trim_end_matches('/');
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    \
         server: {server}/clusters/{cluster}\n    certificate-authority-data: {ca}\n\
         users:\n- name: {user}@tether\n  user:\n{user_entry}\
         contexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: {user}@tether\n\
         current-context: {cluster}\n",
        ca = b64(ca_pem),
    )
}

/// `tether-proxy clusters`: fetches `/api/v1/clusters` and prints a table.
fn clusters(admin_addr: &str, json: bool) -> Result<()> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(admin_addr)
        .with_context(|| format!("connecting to the proxy's admin address {admin_addr} (is the proxy running? set --admin-addr)"))?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        conn,
        "GET /api/v1/clusters HTTP/1.1\r\nHost: {admin_addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = Vec::new();
    conn.take(16 << 20).read_to_end(&mut resp)?;
    let text = String::from_utf8_lossy(&resp);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("malformed admin response")?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let list: Vec<serde_json::Value> =
        serde_json::from_str(body).context("parsing /api/v1/clusters")?;
    println!(
        "{:<24} {:>6} {:<10} {:<26} {:>9} {:<5} {:>8} {:>12} {:>12}",
        "NAME", "AGENTS", "TRANSPORT", "SINCE", "RTT", "LINK", "STREAMS", "BYTES-IN", "BYTES-OUT"
    );
    for c in list {
        let connected = c["connected"].as_bool().unwrap_or(false);
        let since = if connected {
            format!("up {}", c["connectedSince"].as_str().unwrap_or("-"))
        } else {
            format!("down {}", c["disconnectedSince"].as_str().unwrap_or("-"))
        };
        let transports: Vec<&str> = c["transports"]
            .as_array()
            .map(|a| a.iter().filter_map(|t| t.as_str()).collect())
            .unwrap_or_default();
        // Only a session that measures its link says it is slow; "-" is not a verdict.
        let link = if c["slowLink"].as_bool().unwrap_or(false) {
            "slow"
        } else {
            "-"
        };
        println!(
            "{:<24} {:>6} {:<10} {:<26} {:>7}µs {:<5} {:>8} {:>12} {:>12}",
            c["name"].as_str().unwrap_or("?"),
            c["agents"].as_u64().unwrap_or(0),
            if transports.is_empty() {
                "-".into()
            } else {
                transports.join(",")
            },
            since,
            c["rttMicros"].as_u64().unwrap_or(0),
            link,
            c["openStreams"].as_u64().unwrap_or(0),
            c["bytesIn"].as_u64().unwrap_or(0),
            c["bytesOut"].as_u64().unwrap_or(0),
        );
    }
    Ok(())
}
