//! Startup-phase packets: untagged, `len: i32` then a 32-bit code.
//!
//! The first packet of a connection is a StartupMessage, an SSLRequest, a GSSENCRequest or a
//! CancelRequest. They share one framing, so one parser tells them apart.

use bytes::{Buf, BytesMut};

use crate::frame::read_cstr;
use crate::limits::{MAX_STARTUP_PACKET, MAX_STARTUP_PARAMETERS};
use crate::ProtocolError;

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// A CancelRequest one pgwarden instance passes to its peers (1234/5700: outside the codes
/// Postgres uses). A peer acts on it only if the key is its own and never passes it on,
/// so forwarding cannot loop.
const FORWARDED_CANCEL_REQUEST: u32 = (1234 << 16) | 5700;

/// A key the client must present to cancel its query: pgwarden issues its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CancelKey {
    pub pid: i32,
    pub secret: i32,
}

/// One startup-phase packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel(CancelKey),
    /// A cancel forwarded by a peer pgwarden instance.
    ForwardedCancel(CancelKey),
    Startup(StartupMessage),
}

/// A StartupMessage: protocol 3.x and its parameters, in the order sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StartupMessage {
    /// Minor protocol version the client asked for; pgwarden speaks 3.0 and negotiates down.
    pub minor_version: u16,
    /// Parameters other than `_pq_.*` protocol options.
    pub params: Vec<(String, String)>,
    /// `_pq_.*` protocol options, which pgwarden does not support and reports back in
    /// NegotiateProtocolVersion.
    pub protocol_options: Vec<String>,
}

impl StartupMessage {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The user name; required by the protocol.
    pub fn user(&self) -> Option<&str> {
        self.param("user").filter(|u| !u.is_empty())
    }

    /// The database name, which defaults to the user name as in Postgres.
    pub fn database(&self) -> Option<&str> {
        self.param("database")
            .filter(|d| !d.is_empty())
            .or_else(|| self.user())
    }
}

/// Parses one startup-phase packet off the front of `buf`; `None` means more bytes are needed.
pub fn parse_startup(buf: &mut BytesMut) -> Result<Option<StartupPacket>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if !(8..=MAX_STARTUP_PACKET).contains(&len) {
        return Err(ProtocolError::BadStartupLength(len));
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let packet = buf.split_to(len);
    let mut body = &packet[4..];
    let code = body.get_u32();
    let parsed = match code {
        SSL_REQUEST | GSSENC_REQUEST if len != 8 => {
            return Err(ProtocolError::Malformed("encryption request"))
        }
        SSL_REQUEST => StartupPacket::SslRequest,
        GSSENC_REQUEST => StartupPacket::GssEncRequest,
        CANCEL_REQUEST | FORWARDED_CANCEL_REQUEST => {
            if len != 16 {
                return Err(ProtocolError::Malformed("cancel request"));
            }
            let key = CancelKey {
                pid: body.get_i32(),
                secret: body.get_i32(),
            };
            if code == CANCEL_REQUEST {
                StartupPacket::Cancel(key)
            } else {
                StartupPacket::ForwardedCancel(key)
            }
        }
        version => StartupPacket::Startup(parse_startup_message(version, body)?),
    };
    Ok(Some(parsed))
}

fn parse_startup_message(version: u32, mut body: &[u8]) -> Result<StartupMessage, ProtocolError> {
    let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
    if major != 3 {
        return Err(ProtocolError::UnsupportedProtocol { major, minor });
    }
    let mut message = StartupMessage {
        minor_version: minor,
        ..StartupMessage::default()
    };
    loop {
        let key = read_cstr(&mut body)?;
        if key.is_empty() {
            break;
        }
        let value = read_cstr(&mut body)?;
        if message.params.len() + message.protocol_options.len() >= MAX_STARTUP_PARAMETERS {
            return Err(ProtocolError::TooManyParameters(MAX_STARTUP_PARAMETERS));
        }
        if key.starts_with("_pq_.") {
            message.protocol_options.push(key.to_owned());
        } else if message.param(key).is_some() {
            return Err(ProtocolError::Malformed(
                "startup packet repeats a parameter",
            ));
        } else {
            message.params.push((key.to_owned(), value.to_owned()));
        }
    }
    if !body.is_empty() {
        return Err(ProtocolError::Malformed(
            "startup packet has data after its terminator",
        ));
    }
    Ok(message)
}

/// Encodes a StartupMessage (used for backend logins and by tests).
pub fn encode_startup(params: &[(&str, &str)], out: &mut BytesMut) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&196_608u32.to_be_bytes());
    for (k, v) in params {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&[0]);
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(&[0]);
    }
    out.extend_from_slice(&[0]);
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// Encodes a CancelRequest for `key`.
pub fn encode_cancel(key: CancelKey, out: &mut BytesMut) {
    encode_cancel_with(CANCEL_REQUEST, key, out);
}

/// Encodes the request a pgwarden instance sends its peers for a key it does not own.
pub fn encode_forwarded_cancel(key: CancelKey, out: &mut BytesMut) {
    encode_cancel_with(FORWARDED_CANCEL_REQUEST, key, out);
}

fn encode_cancel_with(code: u32, key: CancelKey, out: &mut BytesMut) {
    out.extend_from_slice(&16u32.to_be_bytes());
    out.extend_from_slice(&code.to_be_bytes());
    out.extend_from_slice(&key.pid.to_be_bytes());
    out.extend_from_slice(&key.secret.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u32, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        out.extend_from_slice(&((8 + payload.len()) as u32).to_be_bytes());
        out.extend_from_slice(&code.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn parses_a_startup_message_across_split_reads() {
        let mut whole = BytesMut::new();
        encode_startup(
            &[("user", "app"), ("database", "db"), ("options", "-c a=b")],
            &mut whole,
        );
        let mut buf = BytesMut::new();
        for (i, b) in whole.iter().enumerate() {
            buf.extend_from_slice(&[*b]);
            let parsed = parse_startup(&mut buf).expect("valid");
            if i + 1 < whole.len() {
                assert_eq!(parsed, None);
            } else {
                let Some(StartupPacket::Startup(m)) = parsed else {
                    panic!("startup expected")
                };
                assert_eq!(m.user(), Some("app"));
                assert_eq!(m.database(), Some("db"));
                assert_eq!(m.param("options"), Some("-c a=b"));
            }
        }
    }

    #[test]
    fn database_defaults_to_user() {
        let mut buf = BytesMut::new();
        encode_startup(&[("user", "app")], &mut buf);
        let Some(StartupPacket::Startup(m)) = parse_startup(&mut buf).expect("valid") else {
            panic!("startup expected")
        };
        assert_eq!(m.database(), Some("app"));
    }

    #[test]
    fn parses_ssl_gss_and_cancel_requests() {
        assert_eq!(
            parse_startup(&mut packet(SSL_REQUEST, &[])).expect("valid"),
            Some(StartupPacket::SslRequest)
        );
        assert_eq!(
            parse_startup(&mut packet(GSSENC_REQUEST, &[])).expect("valid"),
            Some(StartupPacket::GssEncRequest)
        );
        let mut cancel = BytesMut::new();
        encode_cancel(CancelKey { pid: 7, secret: -9 }, &mut cancel);
        assert_eq!(
            parse_startup(&mut cancel).expect("valid"),
            Some(StartupPacket::Cancel(CancelKey { pid: 7, secret: -9 }))
        );
    }

    #[test]
    fn protocol_options_and_newer_minor_versions_are_recorded_for_negotiation() {
        let mut buf = packet((3 << 16) | 2, b"user\0u\0_pq_.x\0one\0\0");
        let Some(StartupPacket::Startup(m)) = parse_startup(&mut buf).expect("valid") else {
            panic!("startup expected")
        };
        assert_eq!(m.minor_version, 2);
        assert_eq!(m.protocol_options, vec!["_pq_.x".to_owned()]);
    }

    #[test]
    fn rejects_malformed_packets() {
        let cases: Vec<BytesMut> = vec![
            BytesMut::from(&[0u8, 0, 0, 4][..]),      // too short
            BytesMut::from(&[0u8, 1, 0, 0][..]),      // too long (65536)
            packet(2 << 16, b"user\0u\0\0"),          // protocol 2
            packet(3 << 16, b"user\0u"),              // no terminator
            packet(3 << 16, b"user\0u\0\0junk"),      // trailing data
            packet(3 << 16, b"user\0a\0user\0b\0\0"), // repeated key
            packet(3 << 16, b"user\0\xff\0\0"),       // not UTF-8
            packet(SSL_REQUEST, &[1]),                // SSLRequest with payload
            packet(CANCEL_REQUEST, &[0, 0, 0, 1]),    // short cancel
        ];
        for mut case in cases {
            assert!(parse_startup(&mut case).is_err(), "{case:?}");
        }
    }

    #[test]
    fn rejects_too_many_parameters() {
        let mut payload = Vec::new();
        for i in 0..=MAX_STARTUP_PARAMETERS {
            payload.extend_from_slice(format!("k{i}\0v\0").as_bytes());
        }
        payload.push(0);
        assert_eq!(
            parse_startup(&mut packet(3 << 16, &payload)),
            Err(ProtocolError::TooManyParameters(MAX_STARTUP_PARAMETERS))
        );
    }
}
