//! Messages a client sends: typed views of the ones the proxy looks inside, and builders for
//! the few the proxy sends to a backend on its own (ROLLBACK after a client vanished,
//! Terminate, Sync).

use bytes::{BufMut, BytesMut};

use crate::frame::{read_cstr, read_i32, write_message};
use crate::ProtocolError;

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const TERMINATE: u8 = b'X';
/// PasswordMessage, SASLInitialResponse and SASLResponse all use this tag.
pub const PASSWORD: u8 = b'p';

/// True for the messages that each get exactly one ReadyForQuery in reply: the backend is
/// busy for this client until every one of them has been answered.
pub fn expects_ready_for_query(tag: u8) -> bool {
    matches!(tag, QUERY | SYNC | FUNCTION_CALL)
}

/// The SQL text of a Query body.
pub fn parse_query(mut body: &[u8]) -> Result<&str, ProtocolError> {
    read_cstr(&mut body)
}

/// The statement name of a Parse body (empty for the unnamed statement).
pub fn parse_statement_name(mut body: &[u8]) -> Result<&str, ProtocolError> {
    read_cstr(&mut body)
}

/// A SASLInitialResponse: the chosen mechanism and the client-first message.
pub fn parse_sasl_initial_response(mut body: &[u8]) -> Result<(&str, &[u8]), ProtocolError> {
    let mechanism = read_cstr(&mut body)?;
    let len = read_i32(&mut body)?;
    if len == -1 {
        return Ok((mechanism, &[]));
    }
    if len < 0 || len as usize != body.len() {
        return Err(ProtocolError::Malformed("SASL initial response"));
    }
    Ok((mechanism, body))
}

/// A cleartext PasswordMessage body.
pub fn parse_password(mut body: &[u8]) -> Result<&str, ProtocolError> {
    let password = read_cstr(&mut body)?;
    if !body.is_empty() {
        return Err(ProtocolError::Malformed("password message"));
    }
    Ok(password)
}

/// The portal and statement names of a Bind body, and the offset of what follows them.
pub fn parse_bind_names(body: &[u8]) -> Result<(&str, &str, usize), ProtocolError> {
    let mut rest = body;
    let portal = read_cstr(&mut rest)?;
    let statement = read_cstr(&mut rest)?;
    Ok((portal, statement, body.len() - rest.len()))
}

/// The kind (`S` statement or `P` portal) and name of a Describe or Close body.
pub fn parse_target(body: &[u8]) -> Result<(u8, &str), ProtocolError> {
    let (&kind, mut rest) = body
        .split_first()
        .ok_or(ProtocolError::Malformed("describe or close"))?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed("describe or close kind"));
    }
    let name = read_cstr(&mut rest)?;
    Ok((kind, name))
}

/// A Parse message for statement `name` whose body after the name is `rest` (query text,
/// parameter types), as read from a client's Parse.
pub fn parse(out: &mut BytesMut, name: &str, rest: &[u8]) {
    write_message(out, PARSE, |b| {
        b.extend_from_slice(name.as_bytes());
        b.put_u8(0);
        b.extend_from_slice(rest);
    });
}

/// A Bind of `portal` to `statement`, followed by `rest` (formats, parameters, result
/// formats) as read from a client's Bind.
pub fn bind(out: &mut BytesMut, portal: &str, statement: &str, rest: &[u8]) {
    write_message(out, BIND, |b| {
        b.extend_from_slice(portal.as_bytes());
        b.put_u8(0);
        b.extend_from_slice(statement.as_bytes());
        b.put_u8(0);
        b.extend_from_slice(rest);
    });
}

/// A Describe (`tag` = [`DESCRIBE`]) or Close (`tag` = [`CLOSE`]) of `kind` `name`.
pub fn target_message(out: &mut BytesMut, tag: u8, kind: u8, name: &str) {
    write_message(out, tag, |b| {
        b.put_u8(kind);
        b.extend_from_slice(name.as_bytes());
        b.put_u8(0);
    });
}

pub fn query(out: &mut BytesMut, sql: &str) {
    write_message(out, QUERY, |b| {
        b.extend_from_slice(sql.as_bytes());
        b.put_u8(0);
    });
}

pub fn sync(out: &mut BytesMut) {
    write_message(out, SYNC, |_| {});
}

pub fn terminate(out: &mut BytesMut) {
    write_message(out, TERMINATE, |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sasl_initial_response() {
        let body = b"SCRAM-SHA-256\0\0\0\0\x03abc";
        assert_eq!(
            parse_sasl_initial_response(body),
            Ok(("SCRAM-SHA-256", &b"abc"[..]))
        );
        assert!(parse_sasl_initial_response(b"SCRAM-SHA-256\0\0\0\0\x09abc").is_err());
        assert!(parse_sasl_initial_response(b"SCRAM-SHA-256\0\xff\xff\xff\xfe").is_err());
        assert!(parse_sasl_initial_response(b"SCRAM").is_err());
    }

    #[test]
    fn parses_query_statement_name_and_password() {
        assert_eq!(parse_query(b"select 1\0"), Ok("select 1"));
        assert_eq!(parse_statement_name(b"s1\0select\0\0\0"), Ok("s1"));
        assert_eq!(parse_password(b"pw\0"), Ok("pw"));
        assert!(parse_password(b"pw\0extra").is_err());
        assert!(parse_query(b"no terminator").is_err());
    }

    #[test]
    fn extended_protocol_names_round_trip_through_parsers_and_builders() {
        let mut out = BytesMut::new();
        bind(&mut out, "", "pgw_1", &[0, 0, 0, 0, 0, 0]);
        let (_, body) = crate::frame::take_message(&mut out, 1024)
            .expect("valid")
            .expect("whole");
        let (portal, statement, rest) = parse_bind_names(&body).expect("names");
        assert_eq!(
            (portal, statement, &body[rest..]),
            ("", "pgw_1", &[0u8, 0, 0, 0, 0, 0][..])
        );
        target_message(&mut out, CLOSE, b'S', "s1");
        let (tag, body) = crate::frame::take_message(&mut out, 1024)
            .expect("valid")
            .expect("whole");
        assert_eq!(tag, CLOSE);
        assert_eq!(parse_target(&body), Ok((b'S', "s1")));
        assert!(parse_target(b"Xname\0").is_err());
        assert!(parse_bind_names(b"portal\0stmt").is_err());
        parse(&mut out, "n", b"select 1\0\0\0");
        assert_eq!(&out[..], b"P\0\0\0\x11n\0select 1\0\0\0");
    }

    #[test]
    fn builders_produce_exact_bytes() {
        let mut out = BytesMut::new();
        query(&mut out, "ROLLBACK");
        sync(&mut out);
        terminate(&mut out);
        assert_eq!(&out[..], b"Q\0\0\0\x0dROLLBACK\0S\0\0\0\x04X\0\0\0\x04");
    }

    #[test]
    fn only_query_sync_and_function_call_expect_ready_for_query() {
        for tag in [QUERY, SYNC, FUNCTION_CALL] {
            assert!(expects_ready_for_query(tag));
        }
        for tag in [
            PARSE, BIND, EXECUTE, DESCRIBE, CLOSE, FLUSH, COPY_DATA, COPY_DONE,
        ] {
            assert!(!expects_ready_for_query(tag));
        }
    }
}
