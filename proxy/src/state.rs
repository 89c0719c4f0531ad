//! The proxy's state dir: its CA, serving certificate, signing key and known cluster UIDs.
//!
//! On first start with an empty dir, [`StateDir::open`] generates everything; on later starts
//! it reuses what is there. The serving certificate is re-issued from the CA when it is close
//! to expiry or lacks a name the proxy is now reached by, so operators never meet an expired
//! certificate. Key files are written 0600.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use tether_proto::tls::{certificate_info, parse_certs, write_private_file, CertificateAuthority};
use tether_proto::token::SigningKey;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const SERVER_CERT: &str = "server.crt";
pub const SERVER_KEY: &str = "server.key";
pub const SIGNING_KEY: &str = "signing.key";
pub const CLUSTER_UIDS: &str = "clusters.json";

/// Serving certificates are issued for this long.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(2 * 365 * 24 * 3600);
/// ... and re-issued when less than this remains.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);

/// The loaded contents of a state dir.
pub struct StateDir {
    pub dir: PathBuf,
    pub ca: CertificateAuthority,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub signing_key: SigningKey,
}

impl StateDir {
    /// Loads the state dir, generating what is missing. `names` are the DNS names and IPs the
    /// serving certificate must cover (publish address host, listen addresses, localhost).
    pub fn open(dir: &Path, names: &[String]) -> Result<Self> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating state dir {}", dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let ca = Self::load_or_generate_ca(dir)?;
        let signing_key = Self::load_or_generate_signing_key(dir)?;
        let (server_cert_pem, server_key_pem) = Self::load_or_issue_server_cert(dir, &ca, names)?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
            ca,
            server_cert_pem,
            server_key_pem,
            signing_key,
        })
    }

    /// Loads only the signing key (for minting tokens); it must exist.
    pub fn signing_key(dir: &Path) -> Result<SigningKey> {
        let path = dir.join(SIGNING_KEY);
        let pem = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (start `tether-proxy serve --state-dir {}` once, or run \
                 `tether-proxy init --state-dir {}`, to create it)",
                path.display(),
                dir.display(),
                dir.display()
            )
        })?;
        SigningKey::from_pem(&pem).with_context(|| format!("loading {}", path.display()))
    }

    /// Loads only the CA certificate (PEM); it must exist.
    pub fn ca_cert(dir: &Path) -> Result<String> {
        let path = dir.join(CA_CERT);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    fn load_or_generate_ca(dir: &Path) -> Result<CertificateAuthority> {
        let (cert, key) = (dir.join(CA_CERT), dir.join(CA_KEY));
        if cert.exists() && key.exists() {
            let ca = CertificateAuthority::load(
                &std::fs::read_to_string(&cert)
                    .with_context(|| format!("reading {}", cert.display()))?,
                &std::fs::read_to_string(&key)
                    .with_context(|| format!("reading {}", key.display()))?,
            )?;
            return Ok(ca);
        }
        let ca = CertificateAuthority::generate("tether proxy CA")?;
        write_private_file(&key, ca.key_pem().as_bytes())?;
        // The CA certificate is public, but 0600 keeps the whole dir uniform.
        write_private_file(&cert, ca.cert_pem().as_bytes())?;
        tracing::info!(dir = %dir.display(), "generated a new CA");
        Ok(ca)
    }

    fn load_or_generate_signing_key(dir: &Path) -> Result<SigningKey> {
        let path = dir.join(SIGNING_KEY);
        if path.exists() {
            return Self::signing_key(dir);
        }
        let key = SigningKey::generate()?;
        write_private_file(&path, key.to_pem().as_bytes())?;
        tracing::info!(dir = %dir.display(), kid = key.kid(), "generated a new token signing key");
        Ok(key)
    }

    fn load_or_issue_server_cert(
        dir: &Path,
        ca: &CertificateAuthority,
        names: &[String],
    ) -> Result<(String, String)> {
        let (cert_path, key_path) = (dir.join(SERVER_CERT), dir.join(SERVER_KEY));
        if cert_path.exists() && key_path.exists() {
            let cert = std::fs::read_to_string(&cert_path)?;
            let key = std::fs::read_to_string(&key_path)?;
            match Self::reusable(&cert, names) {
                Ok(()) => return Ok((cert, key)),
                Err(why) => tracing::info!(%why, "re-issuing the serving certificate"),
            }
        }
        let leaf = ca.issue_server(names, SERVER_CERT_VALIDITY)?;
        write_private_file(&key_path, leaf.key_pem.as_bytes())?;
        write_private_file(&cert_path, leaf.cert_pem.as_bytes())?;
        tracing::info!(names = ?names, "issued a serving certificate");
        Ok((leaf.cert_pem, leaf.key_pem))
    }

    /// Whether an existing serving certificate covers `names` and is far from expiry.
    fn reusable(cert_pem: &str, names: &[String]) -> std::result::Result<(), String> {
        let der = parse_certs(cert_pem, SERVER_CERT).map_err(|e| e.to_string())?;
        let info = certificate_info(&der[0]).map_err(|e| e.to_string())?;
        let now = tether_proto::token::unix_now() as i64;
        if info.not_after - now < RENEW_BEFORE.as_secs() as i64 {
            return Err("it expires within 30 days".into());
        }
        if let Some(missing) = names.iter().find(|n| !info.names.contains(n)) {
            return Err(format!("it does not cover {missing}"));
        }
        Ok(())
    }
}

/// Remembers the cluster UID each cluster name first connected with, in `clusters.json`.
///
/// A different UID under a known name is a second cluster imported under the same name; the
/// proxy refuses it rather than mixing two clusters' traffic.
pub struct ClusterUids {
    path: Option<PathBuf>,
    uids: Mutex<BTreeMap<String, String>>,
}

impl ClusterUids {
    /// Loads the file if it exists; `None` keeps UIDs in memory only.
    pub fn load(path: Option<PathBuf>) -> Result<Self> {
        let uids = match &path {
            Some(p) if p.exists() => serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
            _ => BTreeMap::new(),
        };
        Ok(ClusterUids {
            path,
            uids: Mutex::new(uids),
        })
    }

    /// Whether a cluster of this name has ever connected.
    pub fn known(&self, cluster: &str) -> bool {
        self.uids.lock().expect("uid lock").contains_key(cluster)
    }

    /// Records `uid` for `cluster`, or returns the UID already recorded if it differs.
    /// An empty `uid` (an agent outside a cluster without `--cluster-uid`) is not checked,
    /// but the name is remembered as known.
    pub fn check_and_record(&self, cluster: &str, uid: &str) -> std::result::Result<(), String> {
        let mut uids = self.uids.lock().expect("uid lock");
        match uids.get(cluster) {
            Some(known) if !known.is_empty() && !uid.is_empty() && known != uid => {
                return Err(known.clone());
            }
            Some(known) if !known.is_empty() || uid.is_empty() => return Ok(()),
            _ => {}
        }
        uids.insert(cluster.to_string(), uid.to_string());
        if let Some(p) = &self.path {
            let json = serde_json::to_vec_pretty(&*uids).expect("map serializes");
            if let Err(e) = write_private_file(p, &json) {
                tracing::warn!(error = %e, "could not persist cluster UIDs");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let a = StateDir::open(dir.path(), &names).unwrap();
        let b = StateDir::open(dir.path(), &names).unwrap();
        assert_eq!(a.ca.cert_pem(), b.ca.cert_pem());
        assert_eq!(a.server_cert_pem, b.server_cert_pem);
        assert_eq!(a.signing_key.kid(), b.signing_key.kid());
        for f in [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, SIGNING_KEY] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // A new name re-issues the serving cert from the same CA.
        let more = vec!["localhost".to_string(), "proxy.example.com".to_string()];
        let c = StateDir::open(dir.path(), &more).unwrap();
        assert_ne!(c.server_cert_pem, a.server_cert_pem);
        assert_eq!(c.ca.cert_pem(), a.ca.cert_pem());
    }

    #[test]
    fn uid_is_bound_to_first_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CLUSTER_UIDS);
        let uids = ClusterUids::load(Some(path.clone())).unwrap();
        assert!(!uids.known("a"));
        uids.check_and_record("a", "uid-1").unwrap();
        uids.check_and_record("a", "uid-1").unwrap();
        assert_eq!(
            uids.check_and_record("a", "uid-2"),
            Err("uid-1".to_string())
        );
        uids.check_and_record("a", "").unwrap();
        // Persisted across restarts.
        let again = ClusterUids::load(Some(path)).unwrap();
        assert!(again.known("a"));
        assert!(again.check_and_record("a", "uid-2").is_err());
    }
}
