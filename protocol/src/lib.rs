//! The PostgreSQL v3 wire protocol as plain data and functions.
//!
//! Owns: message framing (with hard size limits), the untagged startup-phase packets, typed
//! views of the few messages the proxy must look inside, and builders for what the proxy
//! itself sends (authentication, ParameterStatus, ErrorResponse with SQLSTATE, ...).
//! Must not know about sockets, tasks, pools or authentication policy: everything here works
//! on byte slices and `BytesMut`, so it can be unit-tested and fuzzed in isolation.

pub mod backend;
pub mod error;
pub mod frame;
pub mod frontend;
pub mod limits;
pub mod sqlstate;
pub mod startup;

pub use error::ProtocolError;
pub use frame::{take_message, FrameWalker, Message, Walk};
