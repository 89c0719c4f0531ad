//! TLS 1.3 for both ends: configurations, a small certificate authority, and PEM files.
//!
//! The whole tree uses one rustls crypto provider, aws-lc-rs, passed explicitly to every
//! builder ([`provider`]); only TLS 1.3 is offered. The proxy's state dir holds a CA that agents
//! and callers trust; [`CertificateAuthority`] issues the proxy's serving certificate and
//! client certificates from it. Files holding private keys are written 0600
//! ([`write_private_file`]).

use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Errors building TLS material or configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what}: {detail}")]
    Pem { what: String, detail: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("{0}")]
    Verifier(String),
    #[error("i/o on {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// The one crypto provider of the tree (aws-lc-rs).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Parses every certificate in a PEM bundle; `what` names the file in errors.
pub fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| TlsError::Pem {
        what: what.into(),
        detail: format!("not a PEM certificate bundle: {e}"),
    })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what: what.into(),
            detail: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Parses a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn parse_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        what: what.into(),
        detail: format!("not a PEM private key: {e}"),
    })
}

/// A root store holding the certificates of a PEM bundle.
pub fn root_store(ca_pem: &str, what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in parse_certs(ca_pem, what)? {
        roots.add(cert).map_err(|e| TlsError::Pem {
            what: what.into(),
            detail: format!("unusable CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// A TLS 1.3 server configuration with the given ALPN protocols.
///
/// With `client_ca`, clients may present a certificate signed by it (verified); clients
/// without one are still let in, to authenticate another way (a token).
pub fn server_config(
    cert_pem: &str,
    key_pem: &str,
    alpn: &[&[u8]],
    client_ca: Option<&str>,
) -> Result<ServerConfig, TlsError> {
    let certs = parse_certs(cert_pem, "server certificate")?;
    let key = parse_key(key_pem, "server key")?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(root_store(ca, "client CA")?),
                provider(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A TLS 1.3 client configuration trusting only the CAs in `ca_pem`.
///
/// `identity` is an optional client certificate chain and key (PEM) for mTLS.
pub fn client_config(
    ca_pem: &str,
    alpn: &[&[u8]],
    identity: Option<(&str, &str)>,
) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(ca_pem, "CA file")?);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(
            parse_certs(cert, "client certificate")?,
            parse_key(key, "client key")?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertifiedKey").finish_non_exhaustive()
    }
}

/// Prefix of the OU value that carries a client certificate's cluster patterns.
pub const CLUSTERS_OU_PREFIX: &str = "clusters=";

/// The proxy's certificate authority: trusted by agents and callers, issues leaf certificates.
pub struct CertificateAuthority {
    cert_pem: String,
    key: KeyPair,
    issuer_der: CertificateDer<'static>,
}

impl CertificateAuthority {
    /// Generates a new CA named `common_name`, valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "tether");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params.self_signed(&key)?;
        Ok(CertificateAuthority {
            cert_pem: cert.pem(),
            issuer_der: cert.der().clone(),
            key,
        })
    }

    /// Loads a CA from its certificate and key (PEM).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Pem {
            what: "CA key".into(),
            detail: e.to_string(),
        })?;
        let issuer_der = parse_certs(cert_pem, "CA certificate")?.remove(0);
        Ok(CertificateAuthority {
            cert_pem: cert_pem.to_string(),
            key,
            issuer_der,
        })
    }

    /// The CA certificate (PEM), what agents and callers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM), for writing to the state dir (0600).
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// Issues a serving certificate for `names` (DNS names or IP addresses), valid `validity`.
    pub fn issue_server(
        &self,
        names: &[String],
        validity: Duration,
    ) -> Result<CertifiedKey, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map(String::as_str).unwrap_or("tether-proxy"),
        );
        params.distinguished_name = dn;
        for n in names {
            let san = match n.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(n.clone().try_into()?),
            };
            if !params.subject_alt_names.contains(&san) {
                params.subject_alt_names.push(san);
            }
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, validity)
    }

    /// Issues a client certificate: CN = `user`, O = the group, and the cluster patterns the
    /// holder may reach in OU, as `clusters=PATTERN[,PATTERN]` ([`CLUSTERS_OU_PREFIX`]).
    ///
    /// At most one group: the certificate library keeps one value per name attribute, so a
    /// user in several groups should use a client token instead.
    pub fn issue_client(
        &self,
        user: &str,
        groups: &[String],
        clusters: &[String],
        validity: Duration,
    ) -> Result<CertifiedKey, TlsError> {
        if groups.len() > 1 {
            return Err(TlsError::Verifier(
                "a client certificate carries at most one group (O); use a client token for \
                 users in several groups"
                    .into(),
            ));
        }
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        if let Some(g) = groups.first() {
            dn.push(DnType::OrganizationName, g.as_str());
        }
        if !clusters.is_empty() {
            dn.push(
                DnType::OrganizationalUnitName,
                format!("{CLUSTERS_OU_PREFIX}{}", clusters.join(",")),
            );
        }
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        validity: Duration,
    ) -> Result<CertifiedKey, TlsError> {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + validity;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_ca_cert_der(&self.issuer_der, &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What a certificate says about itself, for renewal decisions and client identities.
#[derive(Debug, Clone)]
pub struct CertificateInfo {
    /// Expiry, seconds since the Unix epoch.
    pub not_after: i64,
    /// DNS names and IP addresses in the subject alternative names.
    pub names: Vec<String>,
    /// Subject common name.
    pub common_name: Option<String>,
    /// Subject organizations.
    pub organizations: Vec<String>,
    /// Subject organizational units.
    pub organizational_units: Vec<String>,
}

/// Reads expiry, names and subject of a DER certificate.
pub fn certificate_info(der: &[u8]) -> Result<CertificateInfo, TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Pem {
        what: "certificate".into(),
        detail: e.to_string(),
    })?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap()).to_string()),
                    16 => names.push(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap()).to_string()),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let subject = cert.subject();
    let info = CertificateInfo {
        not_after: cert.validity().not_after.timestamp(),
        names,
        common_name: subject
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .map(str::to_string),
        organizations: subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok())
            .map(str::to_string)
            .collect(),
        organizational_units: subject
            .iter_organizational_unit()
            .filter_map(|o| o.as_str().ok())
            .map(str::to_string)
            .collect(),
    };
    Ok(info)
}

/// Writes `contents` to `path` readable by the owner only (0600), replacing it atomically.
pub fn write_private_file(path: &Path, contents: &[u8]) -> Result<(), TlsError> {
    let io_err = |source| TlsError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io_err)?;
        f.write_all(contents).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
    }
    std::fs::rename(&tmp, path).map_err(io_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn ca_issues_server_and_client_certs() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
        let server = ca.issue_server(&names, Duration::from_secs(3600)).unwrap();
        let der = parse_certs(&server.cert_pem, "x").unwrap().remove(0);
        let info = certificate_info(&der).unwrap();
        assert_eq!(info.names, names);
        let client = ca
            .issue_client(
                "alice",
                &["dev".into()],
                &["prod-*".into()],
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(ca
            .issue_client(
                "bob",
                &["a".into(), "b".into()],
                &[],
                Duration::from_secs(60)
            )
            .is_err());
        let der = parse_certs(&client.cert_pem, "x").unwrap().remove(0);
        let info = certificate_info(&der).unwrap();
        assert_eq!(info.common_name.as_deref(), Some("alice"));
        assert_eq!(info.organizations, vec!["dev"]);
        assert_eq!(info.organizational_units, vec!["clusters=prod-*"]);
        // Reloading the CA from PEM keeps it able to sign.
        let again = CertificateAuthority::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        again.issue_server(&names, Duration::from_secs(60)).unwrap();
    }

    #[tokio::test]
    async fn tls13_handshake_with_alpn_and_pinned_ca() {
        let ca = CertificateAuthority::generate("test CA").unwrap();
        let server = ca
            .issue_server(&["localhost".into()], Duration::from_secs(3600))
            .unwrap();
        let sc = server_config(&server.cert_pem, &server.key_pem, &[crate::ALPN], None).unwrap();
        let cc = client_config(ca.cert_pem(), &[crate::ALPN], None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
        let srv = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            assert_eq!(
                tls.get_ref().1.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            tls.write_all(b"hi").await.unwrap();
            tls.shutdown().await.unwrap();
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
        let mut tls = connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(crate::ALPN));
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.unwrap();
        assert_eq!(buf, b"hi");
        srv.await.unwrap();

        // A client trusting another CA refuses the server.
        let other = CertificateAuthority::generate("other").unwrap();
        let cc = client_config(other.cert_pem(), &[crate::ALPN], None).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sc = server_config(&server.cert_pem, &server.key_pem, &[crate::ALPN], None).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(sc));
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let _ = acceptor.accept(tcp).await;
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(cc));
        assert!(connector
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .is_err());
    }

    #[test]
    fn private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.pem");
        write_private_file(&p, b"secret").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
