//! pgwarden: a PostgreSQL wire-protocol proxy that lets many short-lived clients share a
//! small, bounded pool of backend connections.
//!
//! Owns everything with a socket, a task or shared state: configuration, the listener, the
//! client session state machine, backend pools, cancel routing, metrics and the admin
//! endpoint, and the CLI. Wire formats live in `pgwarden-protocol`; who may connect and
//! with what credentials lives in `pgwarden-auth`.

pub mod admin;
pub mod app;
pub mod auth_limit;
pub mod backend;
pub mod cancel;
pub mod config;
pub mod console;
pub mod credentials;
pub mod demo;
pub mod memory;
pub mod metrics;
pub mod parking;
pub mod pinning;
pub mod placement;
pub mod pool;
pub mod quotas;
pub mod runtime;
pub mod secrets;
pub mod server;
pub mod session;
pub mod stream;
pub mod sts;
pub mod tls;
pub mod token_cli;

pub use app::App;
pub use config::Config;
