//! The agent manifest `tether-proxy manifest --cluster NAME` prints: everything a member
//! cluster needs, ready for `kubectl apply -f`.
//!
//! Documents, in apply order: Namespace; ServiceAccount; ClusterRole and ClusterRoleBinding
//! for the agent (least privilege: `impersonate` on users and groups, `get` on the
//! `kube-system` namespace for the cluster UID; the agent-identity mode is a commented
//! option); ClusterRole and ClusterRoleBinding for the user `tether-proxy check` acts as (get
//! and list namespaces); a Secret with the agent token and the proxy's CA; and the
//! Deployment (non-root, read-only root filesystem, all capabilities dropped, resource
//! limits, anti-affinity across nodes when replicas > 1, a termination grace period that
//! covers the agent's drain).
//!
//! The YAML is written by hand (so it keeps its order and comments); every value that comes
//! from the operator is emitted as a double-quoted scalar, so no input can change the
//! structure.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{bail, Result};
use base64::Engine;

use crate::check::{validate_namespace, CHECK_USER};
use crate::settings::PublishAddress;

/// The namespace the agent goes into unless told otherwise.
pub const DEFAULT_NAMESPACE: &str = "tether-system";
/// The image unless `--image` (or `TETHER_AGENT_IMAGE`) says otherwise.
pub const DEFAULT_IMAGE: &str = concat!("tether:", env!("CARGO_PKG_VERSION"));
/// The agent's drain on SIGTERM (its `--drain-timeout`), in the generated Deployment.
pub const AGENT_DRAIN: Duration = Duration::from_secs(20);
/// Time Kubernetes gives the pod beyond the drain before it kills it.
const GRACE_MARGIN: Duration = Duration::from_secs(10);
/// Where the Secret is mounted in the agent's container.
const SECRET_DIR: &str = "/etc/tether";
/// The uid/gid the agent runs as (the image's non-root user).
const RUN_AS: u32 = 65532;

/// Everything the manifest is made from.
#[derive(Debug, Clone)]
pub struct AgentManifest {
    pub cluster: String,
    pub namespace: String,
    /// The address agents dial, as the proxy publishes it.
    pub publish_address: PublishAddress,
    /// `auto`, `tls` or `quic`: the scheme of the agent's `--proxy` [default: the publish
    /// address's].
    pub transport: Option<String>,
    pub replicas: u32,
    /// Labels the agent reports to the proxy (`--label k=v`).
    pub labels: Vec<(String, String)>,
    pub image: String,
    /// The agent token, and its id (for the revoke hint and the pod annotation).
    pub token: String,
    pub token_id: String,
    /// The proxy's CA (PEM).
    pub ca_pem: String,
    pub drain_timeout: Duration,
}

/// Parses `k=v,k2=v2` (the `--labels` flag).
pub fn parse_labels(list: &[String]) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for item in list
        .iter()
        .flat_map(|l| l.split(','))
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        let Some((k, v)) = item.split_once('=') else {
            bail!("--labels {item:?}: expected KEY=VALUE");
        };
        let k = k.trim();
        let key_ok = !k.is_empty()
            && k.len() <= 253
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !key_ok {
            bail!("--labels {item:?}: a key is letters, digits, '-', '_', '.' and '/'");
        }
        if v.chars().any(char::is_control) || v.len() > 253 {
            bail!("--labels {item:?}: the value must be printable and at most 253 characters");
        }
        out.push((k.to_string(), v.trim().to_string()));
    }
    Ok(out)
}

/// A YAML double-quoted scalar (a JSON string is one).
fn q(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

impl AgentManifest {
    /// The `--proxy` URL of the agent: `auto://` (QUIC, falling back to TLS) unless
    /// `--transport` says otherwise.
    pub fn proxy_url(&self) -> String {
        let mut addr = self.publish_address.clone();
        addr.scheme = self.transport.clone().unwrap_or_else(|| "auto".into());
        addr.to_string()
    }

    /// Names of the cluster-scoped RBAC objects: plain in the default namespace, suffixed
    /// otherwise so two installs in one cluster do not overwrite each other's bindings.
    fn cluster_scoped(&self, base: &str) -> String {
        if self.namespace == DEFAULT_NAMESPACE {
            base.to_string()
        } else {
            format!("{base}-{}", self.namespace)
        }
    }

    /// Checks the inputs, then writes the manifest.
    pub fn render(&self) -> Result<String> {
        tether_proto::name::validate_cluster_name(&self.cluster).map_err(anyhow::Error::msg)?;
        validate_namespace(&self.namespace).map_err(|e| anyhow::anyhow!("--namespace: {e}"))?;
        if let Some(t) = &self.transport {
            if !matches!(t.as_str(), "auto" | "tls" | "quic") {
                bail!("--transport {t:?}: expected auto, tls or quic");
            }
        }
        if self.replicas == 0 || self.replicas > 100 {
            bail!("--replicas {}: expected 1 to 100", self.replicas);
        }
        if self.image.trim().is_empty() || self.image.chars().any(char::is_whitespace) {
            bail!(
                "--image {:?}: expected an image reference like registry.example.com/tether:0.1.0",
                self.image
            );
        }
        tether_proto::tls::parse_certs(&self.ca_pem, "the proxy's CA")?;

        let ns = q(&self.namespace);
        let proxy = self.proxy_url();
        let agent_role = self.cluster_scoped("tether-agent");
        let check_role = self.cluster_scoped("tether-check");
        let grace = (self.drain_timeout + GRACE_MARGIN).as_secs();
        let drain = humantime::format_duration(self.drain_timeout).to_string();
        let version = env!("CARGO_PKG_VERSION");
        let mut out = String::new();

        // Header.
        let _ = write!(
            out,
            "# tether agent for member cluster {cluster}, generated by tether-proxy {version}.\n\
             # It dials the proxy at {proxy} and authenticates with a token valid\n\
             # for cluster {cluster} only; `tether-proxy token revoke {jti}` revokes it.\n\
             # The Secret below holds that credential: keep this file private.\n\
             #\n\
             # Apply in the member cluster:  kubectl apply -f {file}.yaml\n\
             # Then, next to the proxy:      tether-proxy check --cluster {file}\n",
            cluster = q(&self.cluster),
            jti = self.token_id,
            file = self.cluster,
        );

        let _ = write!(
            out,
            "---\n\
             apiVersion: v1\n\
             kind: Namespace\n\
             metadata:\n  name: {ns}\n  labels:\n    app.kubernetes.io/part-of: tether\n\
             ---\n\
             apiVersion: v1\n\
             kind: ServiceAccount\n\
             metadata:\n  name: tether-agent\n  namespace: {ns}\n  labels:\n    app.kubernetes.io/name: tether-agent\n    app.kubernetes.io/part-of: tether\n"
        );

        // The agent's RBAC, with the agent-identity option as a comment.
        let _ = write!(
            out,
            "---\n\
             # The agent's own rights. It impersonates every caller the proxy verified\n\
             # (--identity impersonate, the default), so this cluster's RBAC decides what each\n\
             # caller may do; the agent itself may only impersonate, and read the kube-system\n\
             # namespace, whose UID identifies this cluster to the proxy.\n\
             #\n\
             # Agent-identity mode (--identity agent: every gateway request acts as the agent\n\
             # itself, as tower does): add \"- --identity=agent\" to the container's args below,\n\
             # remove the impersonate rule, and grant the agent what callers may do instead, e.g.\n\
             #   ---\n\
             #   apiVersion: rbac.authorization.k8s.io/v1\n\
             #   kind: ClusterRoleBinding\n\
             #   metadata: {{name: {agent_role}-view}}\n\
             #   roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}}\n\
             #   subjects: [{{kind: ServiceAccount, name: tether-agent, namespace: {ns}}}]\n\
             apiVersion: rbac.authorization.k8s.io/v1\n\
             kind: ClusterRole\n\
             metadata:\n  name: {role}\n  labels:\n    app.kubernetes.io/part-of: tether\n\
             rules:\n\
             - apiGroups: [\"\"]\n  resources: [\"users\", \"groups\"]\n  verbs: [\"impersonate\"]\n\
             - apiGroups: [\"\"]\n  resources: [\"namespaces\"]\n  resourceNames: [\"kube-system\"]\n  verbs: [\"get\"]\n\
             ---\n\
             apiVersion: rbac.authorization.k8s.io/v1\n\
             kind: ClusterRoleBinding\n\
             metadata:\n  name: {role}\n  labels:\n    app.kubernetes.io/part-of: tether\n\
             roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {role}\n\
             subjects:\n- kind: ServiceAccount\n  name: tether-agent\n  namespace: {ns}\n",
            role = q(&agent_role),
        );

        // The check's user.
        let _ = write!(
            out,
            "---\n\
             # `tether-proxy check` acts as user {user} (the agent impersonates it) and lists\n\
             # namespaces: it may get and list them, nothing else. Leave these two documents out\n\
             # to disallow that; the check then needs --skip-namespace-check.\n\
             apiVersion: rbac.authorization.k8s.io/v1\n\
             kind: ClusterRole\n\
             metadata:\n  name: {role}\n  labels:\n    app.kubernetes.io/part-of: tether\n\
             rules:\n\
             - apiGroups: [\"\"]\n  resources: [\"namespaces\"]\n  verbs: [\"get\", \"list\"]\n\
             ---\n\
             apiVersion: rbac.authorization.k8s.io/v1\n\
             kind: ClusterRoleBinding\n\
             metadata:\n  name: {role}\n  labels:\n    app.kubernetes.io/part-of: tether\n\
             roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {role}\n\
             subjects:\n- apiGroup: rbac.authorization.k8s.io\n  kind: User\n  name: {user}\n",
            user = q(CHECK_USER),
            role = q(&check_role),
        );

        // The credential.
        let _ = write!(
            out,
            "---\n\
             # The agent token (valid for cluster {cluster} only) and the proxy's CA.\n\
             apiVersion: v1\n\
             kind: Secret\n\
             metadata:\n  name: tether-agent\n  namespace: {ns}\n  labels:\n    app.kubernetes.io/name: tether-agent\n    app.kubernetes.io/part-of: tether\n\
             type: Opaque\n\
             data:\n  token: {token}\n  ca.crt: {ca}\n",
            cluster = q(&self.cluster),
            token = b64(&self.token),
            ca = b64(&self.ca_pem),
        );

        // The Deployment.
        let mut args = vec![
            format!("--proxy={proxy}"),
            format!("--cluster={}", self.cluster),
            format!("--token-file={SECRET_DIR}/token"),
            format!("--ca-file={SECRET_DIR}/ca.crt"),
            format!("--drain-timeout={drain}"),
        ];
        for (k, v) in &self.labels {
            args.push(format!("--label={k}={v}"));
        }
        let args: String = args
            .iter()
            .map(|a| format!("        - {}\n", q(a)))
            .collect();
        let affinity = if self.replicas > 1 {
            "      # Replicas on different nodes, where the cluster has them.\n\
             \x20     affinity:\n\
             \x20       podAntiAffinity:\n\
             \x20         preferredDuringSchedulingIgnoredDuringExecution:\n\
             \x20         - weight: 100\n\
             \x20           podAffinityTerm:\n\
             \x20             topologyKey: kubernetes.io/hostname\n\
             \x20             labelSelector:\n\
             \x20               matchLabels:\n\
             \x20                 app.kubernetes.io/name: tether-agent\n"
        } else {
            ""
        };
        let _ = write!(
            out,
            "---\n\
             apiVersion: apps/v1\n\
             kind: Deployment\n\
             metadata:\n  name: tether-agent\n  namespace: {ns}\n  labels:\n    app.kubernetes.io/name: tether-agent\n    app.kubernetes.io/part-of: tether\n\
             \x20 annotations:\n    tether.dev/cluster: {cluster}\n    tether.dev/publish-address: {publish}\n\
             spec:\n\
             \x20 replicas: {replicas}\n\
             \x20 selector:\n    matchLabels:\n      app.kubernetes.io/name: tether-agent\n\
             \x20 strategy:\n    type: RollingUpdate\n    rollingUpdate:\n      maxSurge: 1\n      maxUnavailable: 0\n\
             \x20 template:\n\
             \x20   metadata:\n\
             \x20     labels:\n        app.kubernetes.io/name: tether-agent\n        app.kubernetes.io/part-of: tether\n\
             \x20     annotations:\n        # A new token (a new manifest) rolls the pods.\n        tether.dev/token-id: {jti}\n\
             \x20   spec:\n\
             \x20     serviceAccountName: tether-agent\n\
             \x20     automountServiceAccountToken: true\n\
             \x20     # SIGTERM: the agent refuses new streams, lets open ones finish for\n\
             \x20     # --drain-timeout ({drain}), then exits; Kubernetes waits that long plus a margin.\n\
             \x20     terminationGracePeriodSeconds: {grace}\n\
             \x20     securityContext:\n\
             \x20       runAsNonRoot: true\n\
             \x20       runAsUser: {uid}\n\
             \x20       runAsGroup: {uid}\n\
             \x20       fsGroup: {uid}\n\
             \x20       seccompProfile:\n          type: RuntimeDefault\n\
             {affinity}\
             \x20     containers:\n\
             \x20     - name: agent\n\
             \x20       image: {image}\n\
             \x20       imagePullPolicy: IfNotPresent\n\
             \x20       command: [\"/tether-agent\"]\n\
             \x20       args:\n{args}\
             \x20       env:\n\
             \x20       - name: POD_NAME\n          valueFrom:\n            fieldRef:\n              fieldPath: metadata.name\n\
             \x20       - name: TETHER_LOG_FORMAT\n          value: \"json\"\n\
             \x20       resources:\n\
             \x20         requests:\n            cpu: 50m\n            memory: 64Mi\n\
             \x20         limits:\n            cpu: \"1\"\n            memory: 512Mi\n\
             \x20       securityContext:\n\
             \x20         allowPrivilegeEscalation: false\n\
             \x20         readOnlyRootFilesystem: true\n\
             \x20         runAsNonRoot: true\n\
             \x20         capabilities:\n            drop: [\"ALL\"]\n\
             \x20       volumeMounts:\n\
             \x20       - name: credentials\n          mountPath: {dir}\n          readOnly: true\n\
             \x20     volumes:\n\
             \x20     - name: credentials\n\
             \x20       secret:\n\
             \x20         secretName: tether-agent\n\
             \x20         defaultMode: 288 # 0440: readable by the pod's group ({uid}) only\n",
            cluster = q(&self.cluster),
            publish = q(&proxy),
            replicas = self.replicas,
            jti = q(&self.token_id),
            uid = RUN_AS,
            image = q(&self.image),
            dir = q(SECRET_DIR),
        );
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> String {
        tether_proto::tls::CertificateAuthority::generate("t")
            .unwrap()
            .cert_pem()
            .to_string()
    }

    fn manifest() -> AgentManifest {
        AgentManifest {
            cluster: "prod-eu-1".into(),
            namespace: DEFAULT_NAMESPACE.into(),
            publish_address: PublishAddress::parse("tls://proxy.example.com:8443").unwrap(),
            transport: None,
            replicas: 1,
            labels: vec![("env".into(), "prod".into())],
            image: DEFAULT_IMAGE.into(),
            token: "tok".into(),
            token_id: "jti1".into(),
            ca_pem: ca(),
            drain_timeout: AGENT_DRAIN,
        }
    }

    #[test]
    fn parses_as_yaml_documents() {
        let text = manifest().render().unwrap();
        let docs: Vec<serde_yaml_ng::Value> = serde_yaml_ng::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .filter(|v: &serde_yaml_ng::Value| !v.is_null())
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Namespace",
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "ClusterRole",
                "ClusterRoleBinding",
                "Secret",
                "Deployment"
            ]
        );
        let dep = &docs[7];
        let spec = &dep["spec"]["template"]["spec"];
        assert_eq!(spec["terminationGracePeriodSeconds"].as_u64(), Some(30));
        assert!(spec["affinity"].is_null());
        let args: Vec<&str> = spec["containers"][0]["args"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert!(
            args.contains(&"--proxy=auto://proxy.example.com:8443"),
            "{args:?}"
        );
        assert!(args.contains(&"--label=env=prod"), "{args:?}");
        // Impersonate only, plus the kube-system namespace by name.
        let rules = docs[2]["rules"].as_sequence().unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0]["verbs"][0].as_str(), Some("impersonate"));
        assert_eq!(rules[1]["resourceNames"][0].as_str(), Some("kube-system"));
    }

    #[test]
    fn replicas_get_anti_affinity_and_transport_sets_the_scheme() {
        let mut m = manifest();
        m.replicas = 3;
        m.transport = Some("quic".into());
        let text = m.render().unwrap();
        assert!(text.contains("podAntiAffinity"));
        assert!(text.contains("--proxy=quic://proxy.example.com:8443"));
    }

    #[test]
    fn hostile_values_stay_scalars() {
        let mut m = manifest();
        m.labels = vec![("team".into(), "a\"\n  evil: true".into())];
        assert!(m.render().is_err() || !m.render().unwrap().contains("\n  evil: true"));
        assert!(parse_labels(&["a=b,c".into()]).is_err());
        assert!(parse_labels(&["bad key=x".into()]).is_err());
        m.labels = parse_labels(&["team=x: y".into()]).unwrap();
        let text = m.render().unwrap();
        assert!(text.contains("\"--label=team=x: y\""));
        m.namespace = "Bad".into();
        assert!(m.render().is_err());
    }
}
