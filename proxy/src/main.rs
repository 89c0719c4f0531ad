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

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match cli.command {
        Command::Serve(args) => {
            let settings = args.resolve()?;
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(serve::run(settings))
        }
        Command::Init {
            state_dir,
            mut names,
        } => {
            names.extend(["localhost".into(), "127.0.0.1".into(), "::1".into()]);
            StateDir::open(&state_dir, &names)?;
            println!("state dir {} is ready", state_dir.display());
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
            print!("{}", kubeconfig(&server, &cluster, &user, &ca, Credential::Token(&token)));
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
            println!("wrote {}, {} and {}", cert.display(), key.display(), kc.display());
            Ok(())
        }
    }
}

/// How a kubeconfig user authenticates to the gateway.
enum Credential<'a> {
    Token(&'a str),
    Certificate(&'a str, &'a str),
}

/// A kubeconfig whose server is the gateway path of `cluster`, trusting the proxy's CA.
fn kubeconfig(server: &str, cluster: &str, user: &str, ca_pem: &str, cred: Credential<'_>) -> String {
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
        "{:<24} {:>6} {:<10} {:<26} {:>9} {:>8} {:>12} {:>12}",
        "NAME", "AGENTS", "TRANSPORT", "SINCE", "RTT", "STREAMS", "BYTES-IN", "BYTES-OUT"
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
        println!(
            "{:<24} {:>6} {:<10} {:<26} {:>7}µs {:>8} {:>12} {:>12}",
            c["name"].as_str().unwrap_or("?"),
            c["agents"].as_u64().unwrap_or(0),
            if transports.is_empty() {
                "-".into()
            } else {
                transports.join(",")
            },
            since,
            c["rttMicros"].as_u64().unwrap_or(0),
            c["openStreams"].as_u64().unwrap_or(0),
            c["bytesIn"].as_u64().unwrap_or(0),
            c["bytesOut"].as_u64().unwrap_or(0),
        );
    }
    Ok(())
}
