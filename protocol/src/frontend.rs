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
