//! Errors found while decoding bytes from a peer.

use thiserror::Error;

/// Why a byte stream is not valid protocol. Every variant maps to SQLSTATE 08P01
/// (protocol_violation) when reported to a client.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: usize },
    #[error("message of type {tag:?} is {len} bytes, more than the limit of {limit}")]
    TooLong { tag: char, len: usize, limit: usize },
    #[error("startup packet length {0} is out of range")]
    BadStartupLength(usize),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedProtocol { major: u16, minor: u16 },
    #[error("startup packet has more than {0} parameters")]
    TooManyParameters(usize),
    #[error("malformed {0}")]
    Malformed(&'static str),
    #[error("unexpected message type {0:?}")]
    Unexpected(char),
}
