//! The `file` credential provider: database users and their passwords read from a
//! local TOML file, for local use and the demo. Secrets Manager is the production
//! provider; this one exists so pgwarden runs with nothing but a file.
//!
//! ```toml
//! [[users]]
//! name = "app"
//! password = "app-password"
//! ```

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::secret::Secret;

/// A database user and the password pgwarden logs in to Postgres with.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DbUser {
    pub name: String,
    pub password: Secret,
}

/// The users of a credentials file, validated: names are unique and non-empty.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCredentials {
    users: Vec<DbUser>,
}

/// Why a credentials file was refused. Messages name the file and the problem and
/// never contain a password, so they are safe to log and to print.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read credentials file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials file {source_name}{}: {message}", Position(*.line_col))]
    Parse {
        source_name: String,
        /// 1-based line and column, when toml knows where the problem is.
        line_col: Option<(usize, usize)>,
        message: String,
    },
    #[error("credentials file {source_name}: {}", .problems.join("; "))]
    Invalid {
        source_name: String,
        /// Every problem found, not only the first.
        problems: Vec<String>,
    },
}

struct Position(Option<(usize, usize)>);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, col)) => write!(f, ":{line}:{col}"),
            None => Ok(()),
        }
    }
}

impl FileCredentials {
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses the file's contents; errors name the source `<string>`.
    pub fn from_toml_str(text: &str) -> Result<Self, CredentialsError> {
        Self::parse("<string>", text)
    }

    pub fn get(&self, name: &str) -> Option<&DbUser> {
        self.users.iter().find(|u| u.name == name)
    }

    pub fn users(&self) -> &[DbUser] {
        &self.users
    }

    fn parse(source_name: &str, text: &str) -> Result<Self, CredentialsError> {
        let creds: FileCredentials = toml::from_str(text).map_err(|e| CredentialsError::Parse {
            source_name: source_name.to_owned(),
            line_col: e.span().map(|span| line_col(text, span.start)),
            message: redact_value(e.message()),
        })?;
        let problems = creds.problems();
        if problems.is_empty() {
            Ok(creds)
        } else {
            Err(CredentialsError::Invalid {
                source_name: source_name.to_owned(),
                problems,
            })
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.users.is_empty() {
            problems.push("no users defined".to_owned());
        }
        let mut seen = HashSet::new();
        for (i, user) in self.users.iter().enumerate() {
            let n = i + 1;
            if user.name.is_empty() {
                problems.push(format!("user #{n} has an empty name"));
                continue;
            }
            // Postgres strings are NUL-terminated on the wire, so a NUL could never be sent.
            if user.name.contains('\0') {
                problems.push(format!("user #{n} has a NUL byte in its name"));
                continue;
            }
            if !seen.insert(user.name.as_str()) {
                problems.push(format!("user {:?} is defined more than once", user.name));
            }
            if user.password.expose().is_empty() {
                // Postgres refuses every login with an empty password.
                problems.push(format!("user {:?} has an empty password", user.name));
            } else if user.password.expose().contains('\0') {
                problems.push(format!(
                    "user {:?} has a NUL byte in its password",
                    user.name
                ));
            }
        }
        problems
    }
}

/// serde's "invalid type: string \"...\", expected ..." quotes the offending value,
/// which may be a password: keep only what was expected.
fn redact_value(message: &str) -> String {
    for kind in ["invalid type", "invalid value", "invalid length"] {
        if message.starts_with(kind) {
            return match message.find(", expected ") {
                Some(at) => format!("{kind}{}", &message[at..]),
                None => kind.to_owned(),
            };
        }
    }
    message.trim_end().to_owned()
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        match FileCredentials::from_toml_str(text) {
            Ok(c) => panic!("accepted: {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn loads_users() {
        let c = FileCredentials::from_toml_str(
            r#"
[[users]]
name = "app"
password = "app-password"

[[users]]
name = "report"
password = "r"
"#,
        )
        .expect("valid file");
        assert_eq!(c.users().len(), 2);
        let app = c.get("app").expect("app exists");
        assert_eq!(app.password.expose(), "app-password");
        assert!(c.get("nobody").is_none());
        assert!(!format!("{c:?}").contains("app-password"));
    }

    #[test]
    fn load_reads_a_file_and_names_it_in_errors() {
        let dir = std::env::temp_dir().join(format!("pgwarden-auth-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("users.toml");
        std::fs::write(&path, "[[users]]\nname = \"a\"\npassword = \"pw\"\n").expect("write");
        let c = FileCredentials::load(&path).expect("loads");
        assert_eq!(c.get("a").map(|u| u.password.expose()), Some("pw"));

        std::fs::write(&path, "[[users]]\nname = \"a\"\n").expect("write");
        let e = FileCredentials::load(&path)
            .expect_err("password missing")
            .to_string();
        assert!(e.contains("users.toml"), "{e}");
        assert!(e.contains("missing field `password`"), "{e}");

        let missing = dir.join("missing.toml");
        let e = FileCredentials::load(&missing)
            .expect_err("no file")
            .to_string();
        assert!(
            e.contains("cannot read credentials file") && e.contains("missing.toml"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn rejects_duplicate_and_empty_names_all_at_once() {
        let e = err(r#"
[[users]]
name = "app"
password = "a"
[[users]]
name = ""
password = "b"
[[users]]
name = "app"
password = "c"
"#);
        assert!(e.contains("user #2 has an empty name"), "{e}");
        assert!(e.contains(r#"user "app" is defined more than once"#), "{e}");
    }

    #[test]
    fn rejects_unknown_fields_with_position() {
        let e = err("[[users]]\nname = \"app\"\npassword = \"p\"\nrole = \"x\"\n");
        assert!(e.contains("unknown field `role`"), "{e}");
        assert!(e.contains("<string>:4:"), "{e}");
        let e = err("users = []\nextra = 1\n");
        assert!(e.contains("unknown field `extra`"), "{e}");
    }

    #[test]
    fn rejects_empty_passwords_and_empty_files() {
        assert!(err("[[users]]\nname = \"a\"\npassword = \"\"\n").contains("empty password"));
        assert!(err("users = []").contains("no users defined"));
        assert!(err("").contains("missing field `users`"));
    }

    #[test]
    fn errors_never_print_a_password() {
        // A password typed as a number or an array would be quoted by serde's message.
        for text in [
            "[[users]]\nname = \"a\"\npassword = 987654321\n",
            "[[users]]\nname = \"a\"\npassword = [\"987654321\"]\n",
            "[[users]]\nname = 987654321\npassword = \"987654321\"\n",
            "[[users]]\nname = \"a\"\npassword = \"987654321\n",
            "[[users]]\nname = \"a\"\npassword = \"987654321\"\npassword = \"987654321\"\n",
        ] {
            let e = err(text);
            assert!(!e.contains("987654321"), "{e}");
        }
    }
}
