//! The first packets of a connection: SSL/GSS negotiation, then a StartupMessage or a
//! CancelRequest.

use bytes::BytesMut;
use pgwarden_protocol::startup::{parse_startup, CancelKey, StartupMessage, StartupPacket};
use pgwarden_protocol::ProtocolError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a new connection wants.
pub enum Handshake {
    Startup(StartupMessage),
    Cancel(CancelKey),
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("client closed the connection during startup")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Reads startup packets until a StartupMessage or CancelRequest arrives. Encryption
/// requests are declined with `N` (each at most once, as Postgres allows).
pub async fn handshake(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<Handshake, HandshakeError> {
    let mut declined_ssl = false;
    let mut declined_gss = false;
    loop {
        let packet = loop {
            if let Some(packet) = parse_startup(buf)? {
                break packet;
            }
            if stream.read_buf(buf).await? == 0 {
                return Err(HandshakeError::Closed);
            }
        };
        match packet {
            StartupPacket::SslRequest if !declined_ssl => declined_ssl = true,
            StartupPacket::GssEncRequest if !declined_gss => declined_gss = true,
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                return Err(ProtocolError::Malformed("repeated encryption request").into())
            }
            StartupPacket::Cancel(key) => return Ok(Handshake::Cancel(key)),
            StartupPacket::Startup(message) => return Ok(Handshake::Startup(message)),
        }
        // Data sent before our answer to an encryption request would be a downgrade attack
        // vector once TLS is offered; refuse it now already.
        if !buf.is_empty() {
            return Err(ProtocolError::Malformed("data after an encryption request").into());
        }
        stream.write_all(b"N").await?;
    }
}
