//! Hard limits on what is read from the network. Every length read from a peer is checked
//! against one of these before anything is allocated.

/// Largest startup-phase packet accepted, the same bound Postgres itself uses
/// (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

/// Most key/value pairs accepted in a StartupMessage.
pub const MAX_STARTUP_PARAMETERS: usize = 64;

/// Largest regular message (tag excluded, length field included). Postgres refuses anything
/// above 1 GB; pgwarden never buffers such a message whole, it streams it.
pub const MAX_MESSAGE_LEN: usize = 1 << 30;

/// Largest message the proxy will buffer whole in order to look inside it. Bigger messages of
/// an inspected kind are still relayed, streamed, but reported as too big to inspect.
pub const MAX_INSPECTED_MESSAGE: usize = 1 << 20;

/// Largest authentication message (password, SASL) accepted from a client.
pub const MAX_AUTH_MESSAGE: usize = 8 * 1024;
