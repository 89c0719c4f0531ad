//! The Kubernetes rule for names, which cluster names follow (RFC 1123 subdomain).

/// The rule, in words, for error messages.
pub const CLUSTER_NAME_RULE: &str =
    "a cluster name must consist of lowercase letters, digits, '-' \
     and '.', start and end with a letter or digit, and be at most 253 characters";

/// Checks `name` against the Kubernetes rule for names; the error says the rule.
pub fn validate_cluster_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        let shown: String = name.chars().take(64).collect();
        Err(format!(
            "invalid cluster name {shown:?}: {CLUSTER_NAME_RULE}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubernetes_names() {
        for n in ["a", "prod-eu-1", "team.a", "0abc9", &"a".repeat(253)] {
            assert!(validate_cluster_name(n).is_ok(), "{n}");
        }
    }

    #[test]
    fn refuses_others_with_the_rule() {
        for n in ["", "A", "-a", "a-", "a_b", "a b", "é", &"a".repeat(254)] {
            let err = validate_cluster_name(n).unwrap_err();
            assert!(err.contains("lowercase letters"), "{err}");
        }
    }
}
