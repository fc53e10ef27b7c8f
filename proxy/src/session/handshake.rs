//! The first packets of a connection: SSL/GSS negotiation, then a StartupMessage or a
//! CancelRequest.

use bytes::BytesMut;
use pgwarden_protocol::startup::{parse_startup, CancelKey, StartupMessage, StartupPacket};
use pgwarden_protocol::ProtocolError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stream::{ClientStream, Socket};
use crate::tls::ServerTls;

/// What a new connection wants.
pub enum Handshake {
    Startup(StartupMessage),
    Cancel(CancelKey),
    /// A cancel a peer instance passed on: handled here only, never forwarded again.
    ForwardedCancel(CancelKey),
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("client closed the connection during startup")]
    Closed,
    #[error("startup packet not received in time")]
    Timeout,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The connection after negotiation: TLS if the client asked and pgwarden offers it.
pub struct Negotiated {
    pub stream: ClientStream,
    pub handshake: Handshake,
}

/// Reads startup packets until a StartupMessage or CancelRequest arrives. An SSLRequest is
/// answered `S` and the connection upgraded when `tls` is configured, `N` otherwise; a
/// GSSENCRequest is always declined. Each may come once, as Postgres allows.
pub async fn handshake(
    tcp: TcpStream,
    buf: &mut BytesMut,
    tls: Option<&ServerTls>,
    deadline: tokio::time::Instant,
) -> Result<Negotiated, (Option<ClientStream>, HandshakeError)> {
    let mut stream = ClientStream::Plain(Socket::Live(tcp));
    let mut asked_ssl = false;
    let mut asked_gss = false;
    loop {
        let packet = loop {
            match parse_startup(buf) {
                Ok(Some(packet)) => break packet,
                Ok(None) => {}
                Err(e) => return Err((Some(stream), e.into())),
            }
            match tokio::time::timeout_at(deadline, stream.read_buf(buf)).await {
                Err(_) => return Err((Some(stream), HandshakeError::Timeout)),
                Ok(Ok(0)) => return Err((None, HandshakeError::Closed)),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err((None, e.into())),
            }
        };
        let upgrade = match packet {
            StartupPacket::SslRequest if !asked_ssl && !stream.is_tls() => {
                asked_ssl = true;
                tls.is_some()
            }
            StartupPacket::GssEncRequest if !asked_gss && !stream.is_tls() => {
                asked_gss = true;
                false
            }
            StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                let e = ProtocolError::Malformed("repeated encryption request");
                return Err((Some(stream), e.into()));
            }
            StartupPacket::Cancel(key) => {
                return Ok(Negotiated {
                    stream,
                    handshake: Handshake::Cancel(key),
                })
            }
            StartupPacket::ForwardedCancel(key) => {
                return Ok(Negotiated {
                    stream,
                    handshake: Handshake::ForwardedCancel(key),
                })
            }
            StartupPacket::Startup(message) => {
                return Ok(Negotiated {
                    stream,
                    handshake: Handshake::Startup(message),
                })
            }
        };
        // Bytes sent before our answer to an encryption request would travel outside the
        // TLS session they claim to be in: refuse them.
        if !buf.is_empty() {
            let e = ProtocolError::Malformed("data after an encryption request");
            return Err((Some(stream), e.into()));
        }
        let answer: &[u8] = if upgrade { b"S" } else { b"N" };
        if let Err(e) = stream.write_all(answer).await {
            return Err((None, e.into()));
        }
        if upgrade {
            // Chosen above only for a plain stream with TLS configured.
            let (ClientStream::Plain(tcp), Some(tls)) = (stream, tls) else {
                return Err((
                    None,
                    std::io::Error::other("TLS upgrade of a TLS stream").into(),
                ));
            };
            match tokio::time::timeout_at(deadline, tls.acceptor().accept(tcp)).await {
                Ok(Ok(upgraded)) => stream = ClientStream::Tls(Box::new(upgraded)),
                Ok(Err(e)) => return Err((None, e.into())),
                Err(_) => return Err((None, HandshakeError::Timeout)),
            }
        }
    }
}
