//! Messages a server sends: builders for the ones pgwarden sends itself, and typed views of
//! the ones it reads from Postgres (authentication requests, ParameterStatus, BackendKeyData,
//! ReadyForQuery, ErrorResponse).

use bytes::{BufMut, BytesMut};

use crate::frame::{read_cstr, read_i32, write_message};
use crate::startup::CancelKey;
use crate::ProtocolError;

pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';

pub const AUTH_OK: i32 = 0;
pub const AUTH_CLEARTEXT: i32 = 3;
pub const AUTH_SASL: i32 = 10;
pub const AUTH_SASL_CONTINUE: i32 = 11;
pub const AUTH_SASL_FINAL: i32 = 12;

/// Transaction status carried by ReadyForQuery.
pub const IDLE: u8 = b'I';
pub const IN_TRANSACTION: u8 = b'T';
pub const FAILED_TRANSACTION: u8 = b'E';

fn auth(out: &mut BytesMut, code: i32, data: &[u8]) {
    write_message(out, AUTHENTICATION, |b| {
        b.put_i32(code);
        b.extend_from_slice(data);
    });
}

pub fn authentication_ok(out: &mut BytesMut) {
    auth(out, AUTH_OK, &[]);
}

pub fn authentication_cleartext(out: &mut BytesMut) {
    auth(out, AUTH_CLEARTEXT, &[]);
}

/// AuthenticationSASL listing `mechanisms`.
pub fn authentication_sasl(out: &mut BytesMut, mechanisms: &[&str]) {
    write_message(out, AUTHENTICATION, |b| {
        b.put_i32(AUTH_SASL);
        for m in mechanisms {
            b.extend_from_slice(m.as_bytes());
            b.put_u8(0);
        }
        b.put_u8(0);
    });
}

pub fn authentication_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    auth(out, AUTH_SASL_CONTINUE, data);
}

pub fn authentication_sasl_final(out: &mut BytesMut, data: &[u8]) {
    auth(out, AUTH_SASL_FINAL, data);
}

pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const COMMAND_COMPLETE: u8 = b'C';

pub const ROW_DESCRIPTION: u8 = b'T';
pub const DATA_ROW: u8 = b'D';

/// The OID of type `text`: every column pgwarden describes itself is text.
const TEXT_OID: u32 = 25;

/// RowDescription of text columns in text format.
pub fn row_description(out: &mut BytesMut, columns: &[&str]) {
    write_message(out, ROW_DESCRIPTION, |b| {
        b.put_i16(i16::try_from(columns.len()).unwrap_or(i16::MAX));
        for name in columns {
            b.extend_from_slice(name.as_bytes());
            b.put_u8(0);
            b.put_u32(0); // no table
            b.put_i16(0); // no column number
            b.put_u32(TEXT_OID);
            b.put_i16(-1); // variable length
            b.put_i32(-1); // no type modifier
            b.put_i16(0); // text format
        }
    });
}

/// DataRow of text values; `None` is NULL.
pub fn data_row(out: &mut BytesMut, values: &[Option<&str>]) {
    write_message(out, DATA_ROW, |b| {
        b.put_i16(i16::try_from(values.len()).unwrap_or(i16::MAX));
        for value in values {
            match value {
                Some(v) => {
                    b.put_i32(i32::try_from(v.len()).unwrap_or(i32::MAX));
                    b.extend_from_slice(v.as_bytes());
                }
                None => b.put_i32(-1),
            }
        }
    });
}

pub fn command_complete(out: &mut BytesMut, tag: &str) {
    write_message(out, COMMAND_COMPLETE, |b| {
        b.extend_from_slice(tag.as_bytes());
        b.put_u8(0);
    });
}

pub fn parse_complete(out: &mut BytesMut) {
    write_message(out, PARSE_COMPLETE, |_| {});
}

pub fn close_complete(out: &mut BytesMut) {
    write_message(out, CLOSE_COMPLETE, |_| {});
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    write_message(out, PARAMETER_STATUS, |b| {
        b.extend_from_slice(name.as_bytes());
        b.put_u8(0);
        b.extend_from_slice(value.as_bytes());
        b.put_u8(0);
    });
}

pub fn backend_key_data(out: &mut BytesMut, key: CancelKey) {
    write_message(out, BACKEND_KEY_DATA, |b| {
        b.put_i32(key.pid);
        b.put_i32(key.secret);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    write_message(out, READY_FOR_QUERY, |b| b.put_u8(status));
}

/// NegotiateProtocolVersion: pgwarden speaks 3.0 and supports no `_pq_` options.
pub fn negotiate_protocol_version(out: &mut BytesMut, unsupported_options: &[String]) {
    write_message(out, NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(0);
        b.put_i32(unsupported_options.len() as i32);
        for o in unsupported_options {
            b.extend_from_slice(o.as_bytes());
            b.put_u8(0);
        }
    });
}

/// Severity of an error or notice pgwarden reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The session ends after this error.
    Fatal,
    /// The current statement or transaction fails; the session goes on.
    Error,
    Warning,
    Notice,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Fatal => "FATAL",
            Severity::Error => "ERROR",
            Severity::Warning => "WARNING",
            Severity::Notice => "NOTICE",
        }
    }
}

/// An ErrorResponse or NoticeResponse that pgwarden sends on its own behalf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReport {
    pub severity: Severity,
    pub code: &'static str,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl ErrorReport {
    pub fn new(severity: Severity, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity,
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Fatal, code, message)
    }

    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(Severity::Error, code, message)
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Encodes as an ErrorResponse (or a NoticeResponse for warning/notice severities).
    pub fn encode(&self, out: &mut BytesMut) {
        let tag = match self.severity {
            Severity::Fatal | Severity::Error => ERROR_RESPONSE,
            Severity::Warning | Severity::Notice => NOTICE_RESPONSE,
        };
        write_message(out, tag, |b| {
            let mut field = |code: u8, value: &str| {
                b.put_u8(code);
                // A NUL inside a field would end it early; messages never need one.
                b.extend(value.bytes().filter(|&c| c != 0));
                b.put_u8(0);
            };
            field(b'S', self.severity.as_str());
            field(b'V', self.severity.as_str());
            field(b'C', self.code);
            field(b'M', &self.message);
            if let Some(d) = &self.detail {
                field(b'D', d);
            }
            if let Some(h) = &self.hint {
                field(b'H', h);
            }
            b.put_u8(0);
        });
    }
}

/// The fields of an ErrorResponse/NoticeResponse read from Postgres.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    pub fn parse(mut body: &[u8]) -> Result<Self, ProtocolError> {
        let mut fields = ErrorFields::default();
        loop {
            let Some((&kind, rest)) = body.split_first() else {
                return Err(ProtocolError::Malformed("error response"));
            };
            body = rest;
            if kind == 0 {
                return Ok(fields);
            }
            let value = read_cstr(&mut body)?;
            match kind {
                b'V' => value.clone_into(&mut fields.severity),
                b'S' if fields.severity.is_empty() => value.clone_into(&mut fields.severity),
                b'C' => value.clone_into(&mut fields.code),
                b'M' => value.clone_into(&mut fields.message),
                _ => {}
            }
        }
    }

    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }
}

/// Name and value of a ParameterStatus body.
pub fn parse_parameter_status(mut body: &[u8]) -> Result<(&str, &str), ProtocolError> {
    let name = read_cstr(&mut body)?;
    let value = read_cstr(&mut body)?;
    Ok((name, value))
}

/// The key of a BackendKeyData body.
pub fn parse_backend_key_data(mut body: &[u8]) -> Result<CancelKey, ProtocolError> {
    let pid = read_i32(&mut body)?;
    let secret = read_i32(&mut body)?;
    Ok(CancelKey { pid, secret })
}

/// The transaction status of a ReadyForQuery body.
pub fn parse_ready_for_query(body: &[u8]) -> Result<u8, ProtocolError> {
    match body {
        [status @ (IDLE | IN_TRANSACTION | FAILED_TRANSACTION)] => Ok(*status),
        _ => Err(ProtocolError::Malformed("ready for query")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::take_message;

    fn one(out: &mut BytesMut) -> (u8, Vec<u8>) {
        let (tag, body) = take_message(out, 1 << 20)
            .expect("valid")
            .expect("complete");
        (tag, body.to_vec())
    }

    #[test]
    fn error_report_round_trips_through_the_parser() {
        let mut out = BytesMut::new();
        ErrorReport::fatal("53300", "borrow timeout after 30s")
            .with_hint("raise pool_size")
            .encode(&mut out);
        let (tag, body) = one(&mut out);
        assert_eq!(tag, b'E');
        let fields = ErrorFields::parse(&body).expect("valid");
        assert_eq!(fields.code, "53300");
        assert_eq!(fields.message, "borrow timeout after 30s");
        assert!(fields.is_fatal());
    }

    #[test]
    fn notices_use_the_notice_tag_and_nul_bytes_are_dropped() {
        let mut out = BytesMut::new();
        ErrorReport::new(Severity::Notice, "00000", "a\0b").encode(&mut out);
        let (tag, body) = one(&mut out);
        assert_eq!(tag, b'N');
        assert_eq!(ErrorFields::parse(&body).expect("valid").message, "ab");
    }

    #[test]
    fn builders_produce_exact_bytes() {
        let mut out = BytesMut::new();
        ready_for_query(&mut out, IDLE);
        assert_eq!(&out[..], b"Z\0\0\0\x05I");
        out.clear();
        authentication_ok(&mut out);
        assert_eq!(&out[..], b"R\0\0\0\x08\0\0\0\0");
        out.clear();
        parameter_status(&mut out, "client_encoding", "UTF8");
        assert_eq!(&out[..], b"S\0\0\0\x19client_encoding\0UTF8\0");
        out.clear();
        backend_key_data(&mut out, CancelKey { pid: 1, secret: 2 });
        assert_eq!(&out[..], b"K\0\0\0\x0c\0\0\0\x01\0\0\0\x02");
        out.clear();
        authentication_sasl(&mut out, &["SCRAM-SHA-256"]);
        assert_eq!(&out[..], b"R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0");
        out.clear();
        negotiate_protocol_version(&mut out, &["_pq_.a".to_owned()]);
        assert_eq!(&out[..], b"v\0\0\0\x13\0\0\0\0\0\0\0\x01_pq_.a\0");
    }

    #[test]
    fn parsers_reject_truncated_bodies() {
        assert!(ErrorFields::parse(b"Cxx").is_err());
        assert!(ErrorFields::parse(b"").is_err());
        assert!(parse_parameter_status(b"a\0b").is_err());
        assert!(parse_backend_key_data(&[0, 0, 0, 1, 0]).is_err());
        assert!(parse_ready_for_query(b"X").is_err());
        assert_eq!(parse_ready_for_query(b"T"), Ok(IN_TRANSACTION));
        assert_eq!(parse_parameter_status(b"a\0b\0"), Ok(("a", "b")));
    }
}
