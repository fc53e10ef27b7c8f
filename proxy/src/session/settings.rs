//! Session settings tracked per client and replayed on whichever backend serves it, so a
//! client in transaction mode keeps its own `SET`s (and startup parameters) without pinning,
//! and nobody else ever sees them.
//!
//! A client's settings are an ordered list of (name, SQL value). A backend remembers the
//! signature of the list last applied to it; when a client with a different list borrows
//! it, pgwarden runs `RESET ALL` and the client's `SET`s first, hiding their answers.

use std::sync::LazyLock;

use sha2::{Digest, Sha256};

/// Startup parameters that are not settings.
const NOT_SETTINGS: &[&str] = &["user", "database", "replication", "options"];

/// Identifies a list of settings; equal lists have equal signatures.
pub type Signature = [u8; 16];

/// The signature of a backend whose settings pgwarden no longer knows (a replay failed):
/// it matches no client, so the next client's settings are replayed in full.
pub const UNKNOWN: Signature = [0xff; 16];

/// The signature of "no settings": a freshly logged-in or reset backend.
pub fn defaults() -> Signature {
    static DEFAULTS: LazyLock<Signature> = LazyLock::new(|| signature_of(&[]));
    *DEFAULTS
}

fn signature_of(list: &[(String, String)]) -> Signature {
    let mut hasher = Sha256::new();
    for (name, value) in list {
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
        hasher.update([0]);
    }
    let mut out = [0u8; 16];
    out.copy_from_slice(&hasher.finalize()[..16]);
    out
}

/// A change to a client's settings, from its SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Set { name: String, value: String },
    Reset { name: String },
    ResetAll,
}

/// What a simple-query statement does to session settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettingSql {
    /// A session-level change pgwarden can track and replay.
    Track(Change),
    /// Not a session setting (or only for the current transaction).
    None,
}

/// One client's settings. Boxed on first change: most clients set nothing, and every
/// parked client carries this.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    tracked: Option<Box<Tracked>>,
}

#[derive(Debug, Clone)]
struct Tracked {
    list: Vec<(String, String)>,
    /// Changes made inside the open transaction block, kept only if it commits.
    in_transaction: Vec<Change>,
    /// `signature_of(list)`, updated when `list` changes: it is compared on every borrow.
    signature: Signature,
}

impl Default for Tracked {
    fn default() -> Self {
        Self {
            list: Vec::new(),
            in_transaction: Vec::new(),
            signature: defaults(),
        }
    }
}

fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A setting name pgwarden can safely put back into SQL: letters, digits, `_` and `.`.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
}

impl Settings {
    /// The settings a client asked for in its startup packet (`options=-c name=value`
    /// included). Parameters pgwarden cannot replay are ignored by Postgres too (it
    /// would refuse them at login); they are returned as errors for the caller to report.
    pub fn from_startup(params: &[(String, String)]) -> Result<Self, String> {
        let mut settings = Settings::default();
        for (name, value) in params {
            if NOT_SETTINGS.contains(&name.as_str()) || name.starts_with("_pq_.") {
                continue;
            }
            settings.apply(Change::Set {
                name: name.to_ascii_lowercase(),
                value: quote_literal(value),
            })?;
        }
        if let Some((_, options)) = params.iter().find(|(n, _)| n == "options") {
            for (name, value) in parse_options(options)? {
                settings.apply(Change::Set {
                    name,
                    value: quote_literal(&value),
                })?;
            }
        }
        Ok(settings)
    }

    pub fn signature(&self) -> Signature {
        self.tracked.as_ref().map_or_else(defaults, |t| t.signature)
    }

    pub fn is_empty(&self) -> bool {
        self.list().is_empty()
    }

    fn list(&self) -> &[(String, String)] {
        self.tracked.as_ref().map_or(&[], |t| &t.list)
    }

    /// Applies a change that took effect (outside a transaction block, or committed).
    pub fn apply(&mut self, change: Change) -> Result<(), String> {
        if let Change::Set { name, .. } = &change {
            if !valid_name(name) {
                return Err(format!("unsupported setting name {name:?}"));
            }
        }
        let tracked = self.tracked.get_or_insert_default();
        match change {
            Change::Set { name, value } => {
                tracked.list.retain(|(n, _)| *n != name);
                tracked.list.push((name, value));
            }
            Change::Reset { name } => tracked.list.retain(|(n, _)| *n != name),
            Change::ResetAll => tracked.list.clear(),
        }
        tracked.signature = signature_of(&tracked.list);
        Ok(())
    }

    /// Records a change made inside a transaction block.
    pub fn defer(&mut self, change: Change) {
        self.tracked
            .get_or_insert_default()
            .in_transaction
            .push(change);
    }

    /// The transaction block ended: keep its changes if it committed.
    pub fn end_transaction(&mut self, committed: bool) {
        let Some(tracked) = self.tracked.as_mut() else {
            return;
        };
        let changes = std::mem::take(&mut tracked.in_transaction);
        if committed {
            for change in changes {
                let _ = self.apply(change);
            }
        }
    }

    pub fn has_deferred(&self) -> bool {
        self.tracked
            .as_ref()
            .is_some_and(|t| !t.in_transaction.is_empty())
    }

    /// SQL that turns a backend's settings into exactly these.
    pub fn replay_sql(&self) -> String {
        let mut sql = String::from("RESET ALL");
        for (name, value) in self.list() {
            sql.push_str(&format!("; SET {name} = {value}"));
        }
        sql
    }
}

/// Parses `-c name=value` / `--name=value` pairs of the `options` startup parameter
/// (backslash escapes a space, as in libpq).
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut current = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => current.extend(chars.next()),
            c if c.is_whitespace() => {
                if !current.is_empty() {
                    words.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        words.push(current);
    }
    let mut pairs = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let assignment = if word == "-c" {
            words.next().ok_or("-c without a setting in options")?
        } else if let Some(rest) = word.strip_prefix("--") {
            rest.to_owned()
        } else if let Some(rest) = word.strip_prefix("-c") {
            rest.to_owned()
        } else {
            return Err(format!("unsupported option {word:?} in options"));
        };
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| format!("option {assignment:?} has no value"))?;
        pairs.push((
            name.replace('-', "_").to_ascii_lowercase(),
            value.to_owned(),
        ));
    }
    Ok(pairs)
}

/// Classifies a simple query that is a single `SET`/`RESET` statement. Anything else is
/// left to the pinning rules.
pub fn classify(sql: &str) -> SettingSql {
    let statement = sql.trim().trim_end_matches(';').trim();
    if statement.contains(';') || statement.contains("--") || statement.contains("/*") {
        return SettingSql::None;
    }
    let mut words = statement.split_whitespace();
    match words.next() {
        Some(first) if first.eq_ignore_ascii_case("reset") => {
            let rest: Vec<&str> = words.collect();
            match rest.as_slice() {
                [all] if all.eq_ignore_ascii_case("all") => SettingSql::Track(Change::ResetAll),
                [name] if valid_name(&name.to_ascii_lowercase()) && !is_role(name) => {
                    SettingSql::Track(Change::Reset {
                        name: name.to_ascii_lowercase(),
                    })
                }
                _ => SettingSql::None,
            }
        }
        Some(first) if first.eq_ignore_ascii_case("set") => {
            classify_set(statement[3..].trim_start())
        }
        _ => SettingSql::None,
    }
}

fn is_role(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    n == "role" || n == "session" || n == "session_authorization"
}

fn classify_set(rest: &str) -> SettingSql {
    let rest = match rest.get(..8) {
        Some(p) if p.eq_ignore_ascii_case("session ") => rest[8..].trim_start(),
        _ => rest,
    };
    let name_end = rest
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(rest.len());
    let name = rest[..name_end].to_ascii_lowercase();
    if matches!(name.as_str(), "local" | "transaction" | "constraints") || is_role(&name) {
        return SettingSql::None;
    }
    let after = rest[name_end..].trim_start();
    let (name, value) = if name == "time" {
        match after.get(..4) {
            Some(z) if z.eq_ignore_ascii_case("zone") => ("timezone".to_owned(), after[4..].trim()),
            _ => return SettingSql::None,
        }
    } else if let Some(v) = after.strip_prefix('=') {
        (name, v.trim())
    } else if after.len() > 3 && after[..3].eq_ignore_ascii_case("to ") {
        (name, after[3..].trim())
    } else {
        return SettingSql::None;
    };
    if !valid_name(&name) || value.is_empty() {
        return SettingSql::None;
    }
    if value.eq_ignore_ascii_case("default") {
        return SettingSql::Track(Change::Reset { name });
    }
    SettingSql::Track(Change::Set {
        name,
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, value: &str) -> SettingSql {
        SettingSql::Track(Change::Set {
            name: name.into(),
            value: value.into(),
        })
    }

    #[test]
    fn classifies_session_set_and_reset() {
        assert_eq!(
            classify("SET search_path = app, public"),
            set("search_path", "app, public")
        );
        assert_eq!(
            classify("set statement_timeout to '5s';"),
            set("statement_timeout", "'5s'")
        );
        assert_eq!(
            classify("SET SESSION DateStyle TO ISO"),
            set("datestyle", "ISO")
        );
        assert_eq!(classify("SET TIME ZONE 'UTC'"), set("timezone", "'UTC'"));
        assert_eq!(
            classify("set myapp.tenant = '42'"),
            set("myapp.tenant", "'42'")
        );
        assert_eq!(
            classify("SET work_mem = DEFAULT"),
            SettingSql::Track(Change::Reset {
                name: "work_mem".into()
            })
        );
        assert_eq!(classify("RESET ALL"), SettingSql::Track(Change::ResetAll));
        assert_eq!(
            classify("reset search_path"),
            SettingSql::Track(Change::Reset {
                name: "search_path".into()
            })
        );
    }

    #[test]
    fn leaves_transaction_scoped_role_and_compound_statements_alone() {
        for sql in [
            "SET LOCAL statement_timeout = 1",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET ROLE admin",
            "SET SESSION AUTHORIZATION bob",
            "RESET ROLE",
            "SET a = 1; SET b = 2",
            "SET a = 1 -- comment",
            "select 1",
            "SET",
        ] {
            assert_eq!(classify(sql), SettingSql::None, "{sql}");
        }
    }

    #[test]
    fn startup_parameters_and_options_become_settings_in_order() {
        let params = vec![
            ("user".to_owned(), "u".to_owned()),
            ("application_name".to_owned(), "it's".to_owned()),
            (
                "options".to_owned(),
                "-c statement_timeout=5s --search-path=app\\ x".to_owned(),
            ),
        ];
        let s = Settings::from_startup(&params).expect("valid");
        assert_eq!(
            s.replay_sql(),
            "RESET ALL; SET application_name = 'it''s'; SET statement_timeout = '5s'; SET search_path = 'app x'"
        );
        assert!(Settings::from_startup(&[("options".into(), "-x".into())]).is_err());
    }

    #[test]
    fn signatures_follow_content_and_transactions_commit_or_not() {
        let mut a = Settings::default();
        assert_eq!(a.signature(), defaults());
        a.apply(Change::Set {
            name: "x".into(),
            value: "1".into(),
        })
        .expect("valid");
        let mut b = Settings::default();
        b.defer(Change::Set {
            name: "x".into(),
            value: "1".into(),
        });
        b.end_transaction(false);
        assert_eq!(b.signature(), defaults(), "rolled back");
        b.defer(Change::Set {
            name: "x".into(),
            value: "1".into(),
        });
        b.end_transaction(true);
        assert_eq!(a.signature(), b.signature(), "committed");
        a.apply(Change::ResetAll).expect("valid");
        assert_eq!(a.signature(), defaults());
    }
}
