//! The client side of logging in to a Postgres backend, as a state machine with
//! no I/O: the proxy hands it each Authentication ('R') message body and writes
//! out whatever message it returns. Keeping it free of sockets makes every
//! method and every out-of-order case testable with plain bytes.

use std::fmt;

use bytes::BytesMut;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;

use crate::secret::Secret;

const AUTH_OK: i32 = 0;
const AUTH_CLEARTEXT: i32 = 3;
const AUTH_MD5: i32 = 5;
const AUTH_SASL: i32 = 10;
const AUTH_SASL_CONTINUE: i32 = 11;
const AUTH_SASL_FINAL: i32 = 12;

/// What to do after an Authentication message.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginStep {
    /// AuthenticationOk: logged in; ParameterStatus and ReadyForQuery follow.
    Ok,
    /// Write this complete frontend message (tag and length included).
    Send(BytesMut),
    /// Nothing to send (the server's SCRAM signature was verified); wait for the
    /// next message, which should be AuthenticationOk.
    Continue,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    #[error("malformed or unexpected authentication message from the backend: {0}")]
    Malformed(&'static str),
    #[error("backend offers no supported SASL mechanism (offered: {0}; pgwarden supports SCRAM-SHA-256)")]
    UnsupportedMechanism(String),
    #[error("backend asked for {name} authentication (code {0}), which pgwarden does not support", name = method_name(*.0))]
    Unsupported(i32),
    #[error("backend failed to prove it knows the password (bad SCRAM server signature)")]
    ServerSignature,
    #[error("the configured password cannot be sent to Postgres: {0}")]
    InvalidPassword(&'static str),
}

fn method_name(code: i32) -> &'static str {
    match code {
        2 => "KerberosV5",
        6 => "SCM credential",
        7 | 8 => "GSSAPI",
        9 => "SSPI",
        _ => "an unknown method of",
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    PasswordSent,
    ScramFirstSent,
    ScramFinalSent,
    ScramVerified,
    Done,
}

/// One login to a backend as `user` with `password`.
pub struct BackendLogin {
    user: String,
    password: Secret,
    scram: Option<ScramSha256>,
    phase: Phase,
}

impl fmt::Debug for BackendLogin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendLogin")
            .field("user", &self.user)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl BackendLogin {
    pub fn new(user: impl Into<String>, password: Secret) -> Self {
        BackendLogin {
            user: user.into(),
            password,
            scram: None,
            phase: Phase::Start,
        }
    }

    /// `auth_body` is an 'R' message's body: after the length, starting with the
    /// i32 authentication code. Any error ends the login.
    pub fn respond(&mut self, auth_body: &[u8]) -> Result<LoginStep, LoginError> {
        let phase = std::mem::replace(&mut self.phase, Phase::Done);
        let Some((code, rest)) = auth_body.split_first_chunk::<4>() else {
            return Err(LoginError::Malformed(
                "authentication message shorter than its code",
            ));
        };
        let code = i32::from_be_bytes(*code);
        match (code, phase) {
            (AUTH_OK, Phase::Start | Phase::PasswordSent | Phase::ScramVerified) => {
                expect_empty(rest)?;
                Ok(LoginStep::Ok)
            }
            // A server that skips SASLFinal would never have proved it knows the
            // password: refuse, as libpq does.
            (AUTH_OK, Phase::ScramFirstSent | Phase::ScramFinalSent) => Err(LoginError::Malformed(
                "AuthenticationOk before the SCRAM exchange completed",
            )),
            (AUTH_CLEARTEXT, Phase::Start) => {
                expect_empty(rest)?;
                self.phase = Phase::PasswordSent;
                self.password_message(self.password.expose().as_bytes())
            }
            (AUTH_MD5, Phase::Start) => {
                let salt: [u8; 4] = rest
                    .try_into()
                    .map_err(|_| LoginError::Malformed("MD5 salt is not 4 bytes"))?;
                let hash = md5_hash(
                    self.user.as_bytes(),
                    self.password.expose().as_bytes(),
                    salt,
                );
                self.phase = Phase::PasswordSent;
                self.password_message(hash.as_bytes())
            }
            (AUTH_SASL, Phase::Start) => {
                let mechanisms = parse_mechanisms(rest)?;
                if !mechanisms.contains(&SCRAM_SHA_256) {
                    return Err(LoginError::UnsupportedMechanism(mechanisms.join(", ")));
                }
                // No channel binding: this layer never sees the backend's TLS
                // certificate. "n,," is what libpq sends in the same situation.
                let scram = ScramSha256::new(
                    self.password.expose().as_bytes(),
                    ChannelBinding::unsupported(),
                );
                let mut buf = BytesMut::new();
                frontend::sasl_initial_response(SCRAM_SHA_256, scram.message(), &mut buf)
                    .map_err(|_| LoginError::InvalidPassword("SCRAM message too long"))?;
                self.scram = Some(scram);
                self.phase = Phase::ScramFirstSent;
                Ok(LoginStep::Send(buf))
            }
            (AUTH_SASL_CONTINUE, Phase::ScramFirstSent) => {
                let scram = self
                    .scram
                    .as_mut()
                    .ok_or(LoginError::Malformed("SASLContinue without SASL"))?;
                scram.update(rest).map_err(|_| {
                    LoginError::Malformed(
                        "invalid SCRAM server-first-message (nonce, salt or iterations)",
                    )
                })?;
                let mut buf = BytesMut::new();
                frontend::sasl_response(scram.message(), &mut buf)
                    .map_err(|_| LoginError::InvalidPassword("SCRAM message too long"))?;
                self.phase = Phase::ScramFinalSent;
                Ok(LoginStep::Send(buf))
            }
            (AUTH_SASL_FINAL, Phase::ScramFinalSent) => {
                // Dropping the client state also drops the salted password.
                let mut scram = self
                    .scram
                    .take()
                    .ok_or(LoginError::Malformed("SASLFinal without SASL"))?;
                scram
                    .finish(rest)
                    .map_err(|_| LoginError::ServerSignature)?;
                self.phase = Phase::ScramVerified;
                Ok(LoginStep::Continue)
            }
            (
                AUTH_OK | AUTH_CLEARTEXT | AUTH_MD5 | AUTH_SASL | AUTH_SASL_CONTINUE
                | AUTH_SASL_FINAL,
                _,
            ) => Err(LoginError::Malformed("authentication message out of order")),
            (other, _) => Err(LoginError::Unsupported(other)),
        }
    }

    fn password_message(&self, password: &[u8]) -> Result<LoginStep, LoginError> {
        let mut buf = BytesMut::new();
        frontend::password_message(password, &mut buf)
            .map_err(|_| LoginError::InvalidPassword("it contains a NUL byte"))?;
        Ok(LoginStep::Send(buf))
    }
}

fn expect_empty(rest: &[u8]) -> Result<(), LoginError> {
    if rest.is_empty() {
        Ok(())
    } else {
        Err(LoginError::Malformed(
            "unexpected data after the authentication code",
        ))
    }
}

/// AuthenticationSASL: NUL-terminated names, then an empty name.
fn parse_mechanisms(mut rest: &[u8]) -> Result<Vec<&str>, LoginError> {
    let mut names = Vec::new();
    loop {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(LoginError::Malformed("unterminated SASL mechanism list"))?;
        if end == 0 {
            return if rest.len() == 1 {
                Ok(names)
            } else {
                Err(LoginError::Malformed("data after the SASL mechanism list"))
            };
        }
        let name = std::str::from_utf8(&rest[..end])
            .map_err(|_| LoginError::Malformed("SASL mechanism name is not UTF-8"))?;
        names.push(name);
        rest = &rest[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scram::{ScramExchange, ScramSecret, DEFAULT_ITERATIONS};

    fn body(code: i32, rest: &[u8]) -> Vec<u8> {
        let mut b = code.to_be_bytes().to_vec();
        b.extend_from_slice(rest);
        b
    }

    fn sent(step: Result<LoginStep, LoginError>) -> Vec<u8> {
        match step {
            Ok(LoginStep::Send(buf)) => buf.to_vec(),
            other => panic!("expected a message to send, got {other:?}"),
        }
    }

    /// A frontend message: tag, i32 length counting itself, payload.
    fn frame(tag: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![tag];
        f.extend_from_slice(&(payload.len() as i32 + 4).to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn login(pw: &str) -> BackendLogin {
        BackendLogin::new("app", Secret::new(pw))
    }

    #[test]
    fn trust_is_ok_at_once() {
        assert_eq!(login("pw").respond(&body(0, b"")), Ok(LoginStep::Ok));
    }

    #[test]
    fn cleartext_sends_password_message() {
        let mut l = login("app-password");
        let msg = sent(l.respond(&body(3, b"")));
        assert_eq!(msg, frame(b'p', b"app-password\0"));
        assert_eq!(msg[..5], [b'p', 0, 0, 0, 17]);
        assert_eq!(l.respond(&body(0, b"")), Ok(LoginStep::Ok));
    }

    #[test]
    fn md5_sends_known_hash() {
        // md5("md5" ... ) = "md5" + md5hex(md5hex("password" + "md5_user") + salt)
        let mut l = BackendLogin::new("md5_user", Secret::new("password"));
        let msg = sent(l.respond(&body(5, &[0x2a, 0x3d, 0x8f, 0xe0])));
        assert_eq!(msg, frame(b'p', b"md562af4dd09bbb41884907a838a3233294\0"));
        assert_eq!(l.respond(&body(0, b"")), Ok(LoginStep::Ok));
    }

    #[test]
    fn scram_against_our_own_server() {
        let secret =
            ScramSecret::from_password("app-password", b"saltsaltsaltsalt", DEFAULT_ITERATIONS)
                .expect("valid secret");
        let mut server = ScramExchange::new(vec![secret]).expect("one secret");
        let mut l = login("app-password");

        let msg = sent(l.respond(&body(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")));
        // SASLInitialResponse: 'p', length, "SCRAM-SHA-256\0", i32 data length, data.
        let (head, data) = msg.split_at(1 + 4 + 14 + 4);
        assert_eq!(head[0], b'p');
        assert_eq!(
            i32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize,
            msg.len() - 1
        );
        assert_eq!(&head[5..19], b"SCRAM-SHA-256\0");
        assert_eq!(
            i32::from_be_bytes([head[19], head[20], head[21], head[22]]) as usize,
            data.len()
        );
        assert!(
            data.starts_with(b"n,,n=,r="),
            "{:?}",
            String::from_utf8_lossy(data)
        );

        let server_first = server
            .client_first("SCRAM-SHA-256", data)
            .expect("server-first");
        let msg = sent(l.respond(&body(11, &server_first)));
        // SASLResponse: 'p', length, data.
        let client_final = &msg[5..];
        assert_eq!(msg, frame(b'p', client_final));
        let server_final = server.client_final(client_final).expect("proof accepted");

        assert_eq!(l.respond(&body(12, &server_final)), Ok(LoginStep::Continue));
        assert_eq!(l.respond(&body(0, b"")), Ok(LoginStep::Ok));
        assert!(matches!(
            l.respond(&body(0, b"")),
            Err(LoginError::Malformed(_))
        ));
    }

    /// Runs SCRAM up to the server's final message, which the test then tampers with.
    fn scram_until_final(l: &mut BackendLogin, server_password: &str) -> Vec<u8> {
        let secret = ScramSecret::from_password(server_password, b"saltsaltsaltsalt", 4096)
            .expect("valid secret");
        let mut server = ScramExchange::new(vec![secret]).expect("one secret");
        let msg = sent(l.respond(&body(10, b"SCRAM-SHA-256\0\0")));
        let server_first = server
            .client_first("SCRAM-SHA-256", &msg[23..])
            .expect("sf");
        let msg = sent(l.respond(&body(11, &server_first)));
        server.client_final(&msg[5..]).expect("proof accepted")
    }

    #[test]
    fn bad_server_signature_is_refused() {
        let mut l = login("pw");
        let mut server_final = scram_until_final(&mut l, "pw");
        let last = server_final.len() - 2;
        server_final[last] = if server_final[last] == b'A' {
            b'B'
        } else {
            b'A'
        };
        assert_eq!(
            l.respond(&body(12, &server_final)),
            Err(LoginError::ServerSignature)
        );
        let mut l = login("pw");
        let _ = scram_until_final(&mut l, "pw");
        assert_eq!(
            l.respond(&body(12, b"e=invalid-proof")),
            Err(LoginError::ServerSignature)
        );
    }

    #[test]
    fn ok_before_scram_final_is_refused() {
        let mut l = login("pw");
        let _ = scram_until_final(&mut l, "pw");
        assert!(matches!(
            l.respond(&body(0, b"")),
            Err(LoginError::Malformed(_))
        ));
        let mut l = login("pw");
        sent(l.respond(&body(10, b"SCRAM-SHA-256\0\0")));
        assert!(matches!(
            l.respond(&body(0, b"")),
            Err(LoginError::Malformed(_))
        ));
    }

    #[test]
    fn sasl_without_scram_sha_256_is_unsupported() {
        assert_eq!(
            login("pw").respond(&body(10, b"SCRAM-SHA-256-PLUS\0OAUTHBEARER\0\0")),
            Err(LoginError::UnsupportedMechanism(
                "SCRAM-SHA-256-PLUS, OAUTHBEARER".into()
            ))
        );
    }

    #[test]
    fn other_methods_are_unsupported() {
        for code in [2, 6, 7, 8, 9, 42, -1] {
            assert_eq!(
                login("pw").respond(&body(code, b"")),
                Err(LoginError::Unsupported(code))
            );
        }
        assert!(LoginError::Unsupported(7).to_string().contains("GSSAPI"));
    }

    #[test]
    fn truncated_or_out_of_order_is_malformed() {
        let cases: &[(&[u8], &[&[u8]])] = &[
            (b"", &[]),
            (&[0, 0, 0], &[]),
            (&[0, 0, 0, 0, 1], &[]),
            (&[0, 0, 0, 3, 0], &[]),
            (&[0, 0, 0, 5, 1, 2, 3], &[]),
            (&[0, 0, 0, 5, 1, 2, 3, 4, 5], &[]),
            (&[0, 0, 0, 10], &[]),
            (b"\0\0\0\x0aSCRAM-SHA-256", &[]),
            (b"\0\0\0\x0aSCRAM-SHA-256\0", &[]),
            (b"\0\0\0\x0aSCRAM-SHA-256\0\0x", &[]),
            (b"\0\0\0\x0b", &[]),
            (b"\0\0\0\x0c", &[]),
            // Continue with a server-first-message the client cannot accept.
            (b"\0\0\0\x0b", &[b"\0\0\0\x0aSCRAM-SHA-256\0\0"]),
            // A second password request after one was answered.
            (b"\0\0\0\x03", &[b"\0\0\0\x03"]),
            (b"\0\0\0\x05salt", &[b"\0\0\0\x03"]),
            (b"\0\0\0\x0aSCRAM-SHA-256\0\0", &[b"\0\0\0\x03"]),
        ];
        for (last, before) in cases {
            let mut l = login("pw");
            for b in *before {
                sent(l.respond(b));
            }
            assert!(
                matches!(l.respond(last), Err(LoginError::Malformed(_))),
                "{last:?} after {before:?}"
            );
        }
    }

    #[test]
    fn password_with_nul_cannot_be_sent() {
        assert!(matches!(
            login("a\0b").respond(&body(3, b"")),
            Err(LoginError::InvalidPassword(_))
        ));
        assert!(!format!("{:?}", login("secret-pw")).contains("secret-pw"));
    }
}
