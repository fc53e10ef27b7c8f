//! Authorization: which database users an IAM principal may connect as. Deny by default:
//! a principal no rule matches gets nothing.

use serde::Deserialize;

/// One rule: principals matching `principal` (an ARN pattern where `*` matches any run of
/// characters) may connect as any of `database_users`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub principal: String,
    pub database_users: Vec<String>,
}

/// Why a principal was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no rule allows {principal} to connect as database user {user:?}")]
    NoRule { principal: String, user: String },
}

/// The IAM identity an ARN stands for: an STS assumed-role session
/// (`arn:aws:sts::ACCT:assumed-role/ROLE/SESSION`) becomes its role
/// (`arn:aws:iam::ACCT:role/ROLE`), so rules name roles, not sessions.
pub fn principal_of(arn: &str) -> String {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    if let [prefix, partition, "sts", "", account, resource] = parts[..] {
        if let Some(rest) = resource.strip_prefix("assumed-role/") {
            if let Some((role, _session)) = rest.split_once('/') {
                return format!("{prefix}:{partition}:iam::{account}:role/{role}");
            }
        }
    }
    arn.to_owned()
}

/// Matches `text` against `pattern`, where `*` matches any run of characters.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t) = (pattern.as_bytes(), text.as_bytes());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Checks whether `arn` may connect as `user`; returns the rule's pattern on success.
pub fn authorize<'a>(rules: &'a [Rule], arn: &str, user: &str) -> Result<&'a str, Denied> {
    let principal = principal_of(arn);
    rules
        .iter()
        .find(|r| glob(&r.principal, &principal) && r.database_users.iter().any(|u| u == user))
        .map(|r| r.principal.as_str())
        .ok_or(Denied::NoRule {
            principal,
            user: user.to_owned(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<Rule> {
        vec![
            Rule {
                principal: "arn:aws:iam::123456789012:role/orders-*".into(),
                database_users: vec!["orders_app".into()],
            },
            Rule {
                principal: "arn:aws:iam::123456789012:user/dev".into(),
                database_users: vec!["orders_app".into(), "orders_admin".into()],
            },
        ]
    }

    #[test]
    fn assumed_role_sessions_map_to_their_role() {
        assert_eq!(
            principal_of("arn:aws:sts::123456789012:assumed-role/orders-fn/session-1"),
            "arn:aws:iam::123456789012:role/orders-fn"
        );
        assert_eq!(
            principal_of("arn:aws:iam::1:user/bob"),
            "arn:aws:iam::1:user/bob"
        );
    }

    #[test]
    fn allows_only_what_a_rule_names() {
        let r = rules();
        let lambda = "arn:aws:sts::123456789012:assumed-role/orders-fn/abc";
        assert!(authorize(&r, lambda, "orders_app").is_ok());
        assert!(
            authorize(&r, lambda, "orders_admin").is_err(),
            "not this user"
        );
        assert!(
            authorize(
                &r,
                "arn:aws:sts::999999999999:assumed-role/orders-fn/abc",
                "orders_app"
            )
            .is_err(),
            "other account"
        );
        assert!(authorize(&r, "arn:aws:iam::123456789012:user/dev", "orders_admin").is_ok());
        assert!(
            authorize(&[], "arn:aws:iam::123456789012:user/dev", "orders_app").is_err(),
            "deny by default"
        );
    }

    #[test]
    fn glob_matches_stars_anywhere() {
        assert!(glob("a*c", "abbbc"));
        assert!(glob("*", ""));
        assert!(glob("a*b*c", "axxbyyc"));
        assert!(!glob("a*c", "abcd"));
        assert!(!glob("abc", "abcd"));
    }
}
