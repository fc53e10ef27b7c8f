//! The database logins a target uses, and the SCRAM secrets clients authenticate against.
//!
//! In native password mode a client proves it knows the same password pgwarden uses to log
//! in to the database (like a managed proxy's native auth). The SCRAM secret of each
//! password is derived once here (PBKDF2 is deliberately slow), not per connection.

use std::collections::HashMap;
use std::path::Path;

use pgwarden_auth::{FileCredentials, ScramSecret, Secret};

/// Iterations for the SCRAM secrets pgwarden derives; Postgres's default.
const SCRAM_ITERATIONS: u32 = 4096;

/// One database user pgwarden can log in as.
pub struct UserCredentials {
    pub password: Secret,
    pub scram: ScramSecret,
}

/// Every login a target knows, by user name.
pub struct CredentialStore {
    users: HashMap<String, UserCredentials>,
    /// Keys the salt of the fake exchange run for unknown users, so a probe cannot tell
    /// a missing user from a wrong password.
    mock_key: [u8; 32],
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    File(#[from] pgwarden_auth::CredentialsError),
    #[error("cannot derive the SCRAM secret of user {user:?}: {reason}")]
    Scram { user: String, reason: String },
}

impl CredentialStore {
    /// Loads a `file` provider.
    pub fn from_file(path: &Path) -> Result<Self, StoreError> {
        Self::from_users(&FileCredentials::load(path)?)
    }

    pub fn from_users(file: &FileCredentials) -> Result<Self, StoreError> {
        Self::from_logins(
            file.users()
                .iter()
                .map(|u| (u.name.clone(), u.password.clone())),
        )
    }

    /// Builds the store from (database user, password) pairs, whatever their source.
    pub fn from_logins(
        logins: impl IntoIterator<Item = (String, Secret)>,
    ) -> Result<Self, StoreError> {
        let mut mock_key = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut mock_key);
        let mut users = HashMap::new();
        for (name, password) in logins {
            let salt = pgwarden_auth::scram::user_salt(&mock_key, &name);
            let scram = ScramSecret::from_password(password.expose(), &salt, SCRAM_ITERATIONS)
                .map_err(|e| StoreError::Scram {
                    user: name.clone(),
                    reason: e.to_string(),
                })?;
            users.insert(name, UserCredentials { password, scram });
        }
        Ok(Self { users, mock_key })
    }

    pub fn get(&self, user: &str) -> Option<&UserCredentials> {
        self.users.get(user)
    }

    pub fn mock_key(&self) -> &[u8] {
        &self.mock_key
    }

    pub fn user_count(&self) -> usize {
        self.users.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_user_gets_its_own_salt_derived_like_an_unknown_users() {
        let file = FileCredentials::from_toml_str(
            "[[users]]\nname = \"alice\"\npassword = \"a\"\n[[users]]\nname = \"bob\"\npassword = \"b\"\n",
        )
        .expect("valid");
        let store = CredentialStore::from_users(&file).expect("store");
        let alice = store.get("alice").expect("alice").scram.salt().to_vec();
        let bob = store.get("bob").expect("bob").scram.salt().to_vec();
        assert_ne!(
            alice, bob,
            "a shared salt would tell real users from unknown ones"
        );
        let derived = pgwarden_auth::scram::user_salt(store.mock_key(), "alice");
        assert_eq!(alice, derived.to_vec());
    }
}
