//! pgwarden-auth owns who may connect and with what credentials: the SCRAM-SHA-256
//! server side that clients log in through, the client side of logging in to a
//! Postgres backend, and the credential providers that hold database passwords.
//!
//! It knows nothing of sockets, pools or tokio tasks: every type here is plain
//! data or a state machine the proxy drives with bytes it has already read.

pub mod backend_login;
pub mod file_provider;
pub mod rds_secret;
pub mod rds_token;
pub mod rules;
pub mod scram;
pub mod secret;
pub mod sts_token;

pub use backend_login::{BackendLogin, LoginError, LoginStep};
pub use file_provider::{CredentialsError, DbUser, FileCredentials};
pub use scram::{ScramError, ScramExchange, ScramSecret};
pub use secret::Secret;
