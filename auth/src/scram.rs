//! The server side of SCRAM-SHA-256 (RFC 5802, RFC 7677), the way PostgreSQL's
//! `auth-scram.c` speaks it, so that clients log in to pgwarden exactly as they
//! would log in to Postgres.
//!
//! Deliberate choices, all matching Postgres:
//! - only `SCRAM-SHA-256`; no `-PLUS`, so a client asking for channel binding
//!   (`p=...`) is refused, while `n,,` and `y,,` are accepted;
//! - the user name in client-first-message is ignored: the startup packet's user
//!   is the one that counts (Postgres clients send `n=`);
//! - an authorization identity (`a=`) and mandatory extensions (`m=`) are refused;
//! - the server nonce is 18 random bytes from a CSPRNG, base64-encoded.
//!
//! Password rotation: an exchange can hold several secrets (the current and the
//! pending password) and accepts a proof that matches any of them. They must
//! share one salt and iteration count, because server-first-message announces
//! exactly one of each.

use std::mem;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

/// The only mechanism offered to clients.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";
/// Postgres' default (`scram_iterations`).
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// Postgres' salt length (`SCRAM_DEFAULT_SALT_LEN`).
pub const SALT_LEN: usize = 16;
/// Longest client message accepted; real ones are around 100 bytes.
pub const MAX_CLIENT_MESSAGE_LEN: usize = 1024;
/// Postgres' `SCRAM_RAW_NONCE_LEN`.
const NONCE_RAW_LEN: usize = 18;
const KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Why a SCRAM exchange failed. `Malformed`, `UnsupportedMechanism`,
/// `ChannelBindingUnsupported`, `NonceMismatch` and `OutOfOrder` are protocol
/// violations (SQLSTATE 08P01); `InvalidProof` is a wrong password (28P01).
/// `InvalidSecrets` is a caller bug and never the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScramError {
    #[error("unsupported SASL mechanism (only SCRAM-SHA-256 is offered)")]
    UnsupportedMechanism,
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported: use SCRAM-SHA-256 without channel binding")]
    ChannelBindingUnsupported,
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
    #[error("password authentication failed")]
    InvalidProof,
    #[error("SCRAM message out of order")]
    OutOfOrder,
    #[error("invalid SCRAM secrets: {0}")]
    InvalidSecrets(&'static str),
}

/// What the server keeps of a password (RFC 5802 §3): enough to verify a client
/// proof and sign the reply, without the password itself. Deriving it runs
/// PBKDF2, which is deliberately slow: derive once per password and cache it.
#[derive(Clone)]
pub struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; KEY_LEN],
    server_key: [u8; KEY_LEN],
}

impl std::fmt::Debug for ScramSecret {
    // The keys are password equivalents for this protocol: never print them.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramSecret")
            .field("iterations", &self.iterations)
            .field("salt_len", &self.salt.len())
            .finish_non_exhaustive()
    }
}

impl ScramSecret {
    /// Derives the secret. The password is SASLprep-normalized first, as Postgres
    /// and libpq do; like them, a password SASLprep refuses (prohibited
    /// characters) is used as its raw bytes.
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> Result<Self, ScramError> {
        if salt.is_empty() {
            return Err(ScramError::InvalidSecrets("empty salt"));
        }
        if iterations == 0 {
            return Err(ScramError::InvalidSecrets(
                "iteration count must be at least 1",
            ));
        }
        let prepared = match stringprep::saslprep(password) {
            Ok(p) => p.into_owned().into_bytes(),
            Err(_) => password.as_bytes().to_vec(),
        };
        let mut salted = [0u8; KEY_LEN];
        pbkdf2::pbkdf2_hmac::<Sha256>(&prepared, salt, iterations, &mut salted);
        let client_key = hmac(&salted, &[b"Client Key"]);
        Ok(ScramSecret {
            iterations,
            salt: salt.to_vec(),
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, &[b"Server Key"]),
        })
    }

    pub fn iterations(&self) -> u32 {
        self.iterations
    }

    pub fn salt(&self) -> &[u8] {
        &self.salt
    }
}

/// One client's SCRAM exchange: `client_first`, then `client_final`. Any error
/// ends it; a later call returns `OutOfOrder`.
pub struct ScramExchange {
    secrets: Vec<ScramSecret>,
    /// Unknown user: run the whole exchange, then fail, as Postgres does, so the
    /// answer does not tell an attacker which user names exist.
    doomed: bool,
    state: State,
}

enum State {
    Initial,
    ServerFirstSent {
        /// base64 of the gs2 header, which client-final's `c=` must repeat.
        cbind: String,
        client_first_bare: String,
        server_first: String,
        nonce: String,
    },
    /// The proof matched no secret; `replace_secrets` may reopen the exchange once.
    Refused(Box<State>),
    Finished,
}

impl ScramExchange {
    /// An exchange that accepts a proof for any of `secrets` (current and pending
    /// password during a rotation). All must share one salt and iteration count.
    pub fn new(secrets: Vec<ScramSecret>) -> Result<Self, ScramError> {
        let first = secrets
            .first()
            .ok_or(ScramError::InvalidSecrets("no secrets"))?;
        if secrets
            .iter()
            .any(|s| s.salt != first.salt || s.iterations != first.iterations)
        {
            return Err(ScramError::InvalidSecrets(
                "all secrets of one exchange must share the same salt and iteration count",
            ));
        }
        Ok(ScramExchange {
            secrets,
            doomed: false,
            state: State::Initial,
        })
    }

    /// An exchange for a user that does not exist: it looks like a real one and
    /// always ends in `InvalidProof`. The salt is derived from the user name and
    /// `mock_key` (a random per-process key) so that repeated attempts for one
    /// name see the same salt, as they would for a real user.
    pub fn doomed(user: &str, mock_key: &[u8]) -> Self {
        let salt = user_salt(mock_key, user);
        let mut keys = [0u8; 2 * KEY_LEN];
        rand::thread_rng().fill_bytes(&mut keys);
        let mut stored_key = [0u8; KEY_LEN];
        let mut server_key = [0u8; KEY_LEN];
        stored_key.copy_from_slice(&keys[..KEY_LEN]);
        server_key.copy_from_slice(&keys[KEY_LEN..]);
        ScramExchange {
            secrets: vec![ScramSecret {
                iterations: DEFAULT_ITERATIONS,
                salt: salt.to_vec(),
                stored_key,
                server_key,
            }],
            doomed: true,
            state: State::Initial,
        }
    }

    /// Replaces the secrets after `client_final` answered `InvalidProof` and reopens the
    /// exchange, so the caller can check the same final message again, e.g. once a rotated password has been
    /// fetched. The new secrets must share the salt and iteration count already sent.
    pub fn replace_secrets(&mut self, secrets: Vec<ScramSecret>) -> Result<(), ScramError> {
        if self.doomed {
            return Err(ScramError::OutOfOrder);
        }
        let sent = &self.secrets[0];
        if secrets.is_empty()
            || secrets
                .iter()
                .any(|s| s.salt != sent.salt || s.iterations != sent.iterations)
        {
            return Err(ScramError::InvalidSecrets(
                "replacement secrets must keep the salt and iteration count already sent",
            ));
        }
        match mem::replace(&mut self.state, State::Finished) {
            State::Refused(sent) => {
                self.state = *sent;
                self.secrets = secrets;
                Ok(())
            }
            _ => Err(ScramError::OutOfOrder),
        }
    }

    /// Takes the mechanism and data of SASLInitialResponse; returns
    /// server-first-message, the body of AuthenticationSASLContinue.
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let mut raw = [0u8; NONCE_RAW_LEN];
        rand::thread_rng().fill_bytes(&mut raw);
        self.client_first_with_nonce(mechanism, data, &STANDARD.encode(raw))
    }

    fn client_first_with_nonce(
        &mut self,
        mechanism: &str,
        data: &[u8],
        server_nonce: &str,
    ) -> Result<Vec<u8>, ScramError> {
        if !matches!(
            mem::replace(&mut self.state, State::Finished),
            State::Initial
        ) {
            return Err(ScramError::OutOfOrder);
        }
        if mechanism != SCRAM_SHA_256 {
            return Err(ScramError::UnsupportedMechanism);
        }
        let msg = as_text(data)?;

        // gs2-header = gs2-cbind-flag "," [authzid] ","
        let mut parts = msg.splitn(3, ',');
        let (flag, authzid, bare) = match (parts.next(), parts.next(), parts.next()) {
            (Some(f), Some(a), Some(b)) => (f, a, b),
            _ => return Err(ScramError::Malformed("missing GS2 header")),
        };
        match flag {
            // "y": the client could bind but thinks we cannot, which is true.
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBindingUnsupported),
            _ => return Err(ScramError::Malformed("unexpected channel-binding flag")),
        }
        if !authzid.is_empty() {
            return Err(ScramError::Malformed(
                "authorization identity is not supported",
            ));
        }

        // client-first-message-bare = [reserved-mext ","] username "," nonce ["," extensions]
        let mut attrs = bare.split(',');
        let first = attrs.next().unwrap_or_default();
        if first.starts_with("m=") {
            return Err(ScramError::Malformed(
                "mandatory SCRAM extensions are not supported",
            ));
        }
        // The user name is ignored: the startup packet's user is authenticated.
        attr_value(first, b'n')?;
        let client_nonce = attr_value(attrs.next().unwrap_or_default(), b'r')?;
        if client_nonce.is_empty() || !client_nonce.bytes().all(is_printable) {
            return Err(ScramError::Malformed("invalid client nonce"));
        }
        for ext in attrs {
            any_attr(ext)?;
        }

        let secret = &self.secrets[0];
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&secret.salt),
            secret.iterations
        );
        let reply = server_first.clone().into_bytes();
        self.state = State::ServerFirstSent {
            cbind: STANDARD.encode(format!("{flag},,")),
            client_first_bare: bare.to_owned(),
            server_first,
            nonce,
        };
        Ok(reply)
    }

    /// Takes the data of SASLResponse (client-final-message); returns
    /// server-final-message (`v=...`), the body of AuthenticationSASLFinal.
    pub fn client_final(&mut self, data: &[u8]) -> Result<Vec<u8>, ScramError> {
        let State::ServerFirstSent {
            cbind,
            client_first_bare,
            server_first,
            nonce,
        } = mem::replace(&mut self.state, State::Finished)
        else {
            return Err(ScramError::OutOfOrder);
        };
        let msg = as_text(data)?;

        // client-final-message = "c=" cbind "," "r=" nonce ["," extensions] "," "p=" proof
        let (without_proof, proof) = match msg.rsplit_once(',') {
            Some((head, last)) => (head, attr_value(last, b'p')?),
            None => return Err(ScramError::Malformed("missing proof")),
        };
        let mut attrs = without_proof.split(',');
        let cbind_got = attr_value(attrs.next().unwrap_or_default(), b'c')?;
        let nonce_got = attr_value(attrs.next().unwrap_or_default(), b'r')?;
        for ext in attrs {
            // The proof must be the last attribute (Postgres: "garbage at end").
            if any_attr(ext)? == b'p' {
                return Err(ScramError::Malformed("data after the proof"));
            }
        }
        if cbind_got != cbind {
            return Err(ScramError::Malformed(
                "channel binding does not match the GS2 header",
            ));
        }
        if nonce_got != nonce {
            return Err(ScramError::NonceMismatch);
        }
        let proof: [u8; KEY_LEN] = STANDARD
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not valid base64"))?
            .try_into()
            .map_err(|_| ScramError::Malformed("invalid proof length"))?;

        let auth_message = [
            client_first_bare.as_bytes(),
            b",",
            server_first.as_bytes(),
            b",",
            without_proof.as_bytes(),
        ];
        // Check every secret, without stopping early, so timing does not tell
        // which one (if any) matched.
        let mut matched = subtle::Choice::from(0);
        let mut index = 0u32;
        for (i, secret) in self.secrets.iter().enumerate() {
            let signature = hmac(&secret.stored_key, &auth_message);
            let mut client_key = proof;
            for (k, s) in client_key.iter_mut().zip(signature) {
                *k ^= s;
            }
            let ok = Sha256::digest(client_key)
                .as_slice()
                .ct_eq(&secret.stored_key);
            index = u32::conditional_select(&index, &(i as u32), ok & !matched);
            matched |= ok;
        }
        if self.doomed || !bool::from(matched) {
            if !self.doomed {
                // Kept so the same final message can be checked once more against
                // refreshed secrets (a password rotated since the exchange began).
                self.state = State::Refused(Box::new(State::ServerFirstSent {
                    cbind,
                    client_first_bare,
                    server_first,
                    nonce,
                }));
            }
            return Err(ScramError::InvalidProof);
        }
        let secret = &self.secrets[index as usize];
        let server_signature = hmac(&secret.server_key, &auth_message);
        Ok(format!("v={}", STANDARD.encode(server_signature)).into_bytes())
    }
}

/// The salt of `user`'s secret, derived from a per-process key: real and unknown users get
/// salts made the same way, so the salt in server-first tells nothing about whether a user
/// exists (a shared salt for real users would).
pub fn user_salt(key: &[u8], user: &str) -> [u8; SALT_LEN] {
    let mac = hmac(key, &[b"pgwarden-scram-salt", user.as_bytes()]);
    let mut salt = [0u8; SALT_LEN];
    salt.copy_from_slice(&mac[..SALT_LEN]);
    salt
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn as_text(data: &[u8]) -> Result<&str, ScramError> {
    if data.is_empty() {
        return Err(ScramError::Malformed("empty message"));
    }
    if data.len() > MAX_CLIENT_MESSAGE_LEN {
        return Err(ScramError::Malformed("message too long"));
    }
    if data.contains(&0) {
        return Err(ScramError::Malformed("NUL byte in message"));
    }
    std::str::from_utf8(data).map_err(|_| ScramError::Malformed("message is not valid UTF-8"))
}

/// `name=value` with the expected one-letter name; returns the value.
fn attr_value(attr: &str, name: u8) -> Result<&str, ScramError> {
    match attr.as_bytes() {
        [n, b'=', ..] if *n == name => Ok(&attr[2..]),
        _ => Err(ScramError::Malformed("unexpected attribute")),
    }
}

/// Any `x=value` attribute (an optional extension); returns its name.
fn any_attr(attr: &str) -> Result<u8, ScramError> {
    match attr.as_bytes() {
        [n, b'=', ..] if n.is_ascii_alphabetic() => Ok(*n),
        _ => Err(ScramError::Malformed("invalid attribute")),
    }
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E.
fn is_printable(b: u8) -> bool {
    (0x21..=0x7e).contains(&b) && b != b','
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    const SALT: &[u8] = b"0123456789abcdef";

    fn secret(password: &str) -> ScramSecret {
        ScramSecret::from_password(password, SALT, DEFAULT_ITERATIONS).expect("valid secret")
    }

    fn exchange(passwords: &[&str]) -> ScramExchange {
        ScramExchange::new(passwords.iter().map(|p| secret(p)).collect()).expect("valid secrets")
    }

    /// Runs postgres-protocol's client against our server.
    fn login(
        server: &mut ScramExchange,
        password: &str,
        cb: ChannelBinding,
    ) -> Result<(), ScramError> {
        let mut client = ScramSha256::new(password.as_bytes(), cb);
        let server_first = server.client_first(SCRAM_SHA_256, client.message())?;
        client
            .update(&server_first)
            .expect("client accepts server-first");
        let server_final = server.client_final(client.message())?;
        client
            .finish(&server_final)
            .expect("client verifies the server signature");
        Ok(())
    }

    /// Client side up to client-final, for tampering tests.
    fn client_final_of(server: &mut ScramExchange, password: &str) -> String {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let sf = server
            .client_first(SCRAM_SHA_256, client.message())
            .expect("server-first");
        client.update(&sf).expect("client accepts server-first");
        String::from_utf8(client.message().to_vec()).expect("ascii")
    }

    #[test]
    fn right_password_logs_in_and_server_is_verified() {
        let mut s = exchange(&["app-password"]);
        assert_eq!(
            login(&mut s, "app-password", ChannelBinding::unsupported()),
            Ok(())
        );
        // A client that supports binding but was not offered it sends "y,,".
        let mut s = exchange(&["app-password"]);
        assert_eq!(
            login(&mut s, "app-password", ChannelBinding::unrequested()),
            Ok(())
        );
    }

    #[test]
    fn wrong_password_is_invalid_proof() {
        let mut s = exchange(&["app-password"]);
        assert_eq!(
            login(&mut s, "wrong", ChannelBinding::unsupported()),
            Err(ScramError::InvalidProof)
        );
        assert_eq!(s.client_final(b"c=biws"), Err(ScramError::OutOfOrder));
    }

    #[test]
    fn current_and_pending_passwords_are_both_accepted() {
        for pw in ["current", "pending"] {
            let mut s = exchange(&["current", "pending"]);
            assert_eq!(
                login(&mut s, pw, ChannelBinding::unsupported()),
                Ok(()),
                "{pw}"
            );
        }
        let mut s = exchange(&["current", "pending"]);
        assert_eq!(
            login(&mut s, "previous", ChannelBinding::unsupported()),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn secrets_must_share_salt_and_iterations() {
        let other_salt = ScramSecret::from_password("p", b"another salt", DEFAULT_ITERATIONS)
            .expect("valid secret");
        let other_iter = ScramSecret::from_password("p", SALT, 4097).expect("valid secret");
        for s in [other_salt, other_iter] {
            assert!(matches!(
                ScramExchange::new(vec![secret("a"), s]),
                Err(ScramError::InvalidSecrets(_))
            ));
        }
        assert!(ScramExchange::new(vec![]).is_err());
        assert!(ScramSecret::from_password("p", b"", 4096).is_err());
        assert!(ScramSecret::from_password("p", SALT, 0).is_err());
    }

    #[test]
    fn secret_matches_postgres_protocol_verifier() {
        // postgres-protocol's verifier is what `ALTER ROLE ... PASSWORD` stores;
        // the soft hyphen checks SASLprep (it maps to nothing).
        for pw in ["app-password", "I\u{AD}X", "pässwörd"] {
            let verifier = postgres_protocol::password::scram_sha_256(pw.as_bytes());
            let (_, rest) = verifier.split_once('$').expect("mechanism");
            let (iter_salt, keys) = rest.split_once('$').expect("keys");
            let (iter, salt) = iter_salt.split_once(':').expect("salt");
            let (stored, server) = keys.split_once(':').expect("server key");
            let salt = STANDARD.decode(salt).expect("salt base64");
            let s = ScramSecret::from_password(pw, &salt, iter.parse().expect("iterations"))
                .expect("valid secret");
            assert_eq!(STANDARD.encode(s.stored_key), stored, "{pw}");
            assert_eq!(STANDARD.encode(s.server_key), server, "{pw}");
        }
        let a = secret("I\u{AD}X");
        let b = secret("IX");
        assert_eq!(a.stored_key, b.stored_key);
        assert!(!format!("{a:?}").contains(&STANDARD.encode(a.stored_key)));
    }

    #[test]
    fn rfc7677_test_vector() {
        let s = ScramSecret::from_password(
            "pencil",
            &STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").expect("base64"),
            4096,
        )
        .expect("valid secret");
        let mut ex = ScramExchange::new(vec![s]).expect("one secret");
        let sf = ex
            .client_first_with_nonce(
                SCRAM_SHA_256,
                b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
                "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
            )
            .expect("server-first");
        assert_eq!(
            sf,
            b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let final_ = ex
            .client_final(
                b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
                  p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            )
            .expect("valid proof");
        assert_eq!(final_, b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    #[test]
    fn server_first_has_fresh_nonce_salt_and_iterations() {
        let mut s = exchange(&["pw"]);
        let sf = s
            .client_first(SCRAM_SHA_256, b"n,,n=ignored,r=abc")
            .expect("server-first");
        let sf = String::from_utf8(sf).expect("ascii");
        let (nonce, rest) = sf
            .strip_prefix("r=abc")
            .and_then(|r| r.split_once(','))
            .expect("nonce extends the client's");
        assert_eq!(
            STANDARD.decode(nonce).expect("base64 nonce").len(),
            NONCE_RAW_LEN
        );
        assert_eq!(rest, format!("s={},i=4096", STANDARD.encode(SALT)));
    }

    #[test]
    fn channel_binding_and_other_mechanisms_are_refused() {
        let mut s = exchange(&["pw"]);
        assert_eq!(
            login(
                &mut s,
                "pw",
                ChannelBinding::tls_server_end_point(vec![1, 2, 3])
            ),
            Err(ScramError::ChannelBindingUnsupported)
        );
        let mut s = exchange(&["pw"]);
        assert_eq!(
            s.client_first("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::UnsupportedMechanism)
        );
        let mut s = exchange(&["pw"]);
        assert_eq!(
            s.client_first(SCRAM_SHA_256, b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::ChannelBindingUnsupported)
        );
    }

    #[test]
    fn malformed_client_first_is_refused() {
        let too_long = format!("n,,n=,r={}", "a".repeat(MAX_CLIENT_MESSAGE_LEN));
        let cases: &[&[u8]] = &[
            b"",
            b"n",
            b"n,",
            b"x,,n=,r=abc",
            b"n,a=admin,n=,r=abc",
            b"n,,m=ext,n=,r=abc",
            b"n,,r=abc",
            b"n,,n=,",
            b"n,,n=,r=",
            b"n,,n=,r=ab\x7f",
            b"n,,n=,r=abc,1=x",
            b"n,,n=,r=abc,",
            b"n,,n=\0,r=abc",
            b"n,,n=\xff,r=abc",
            too_long.as_bytes(),
        ];
        for case in cases {
            let mut s = exchange(&["pw"]);
            assert!(
                matches!(
                    s.client_first(SCRAM_SHA_256, case),
                    Err(ScramError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(case)
            );
        }
        // An optional extension after the nonce is allowed (RFC 5802).
        let mut s = exchange(&["pw"]);
        assert!(s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc,x=ext").is_ok());
    }

    #[test]
    fn malformed_client_final_is_refused() {
        type Case = fn(&str, &str, &str) -> String;
        let cases: [Case; 10] = [
            |_, _, _| String::new(),
            |head, _, _| head.to_owned(),
            |head, _, _| format!("{head},p=!!!"),
            |head, _, _| format!("{head},p=AAAA"),
            |_, nonce, proof| format!("c=eSws,{nonce},p={proof}"),
            |_, nonce, proof| format!("{nonce},c=biws,p={proof}"),
            |head, _, proof| format!("{head},p={proof},x=1"),
            |head, _, proof| format!("{head},p={proof},p={proof}"),
            |head, _, proof| format!("{head},p={proof},"),
            |head, _, _| format!("{head},p={}", "A".repeat(MAX_CLIENT_MESSAGE_LEN)),
        ];
        for case in cases {
            let mut s = exchange(&["pw"]);
            let good = client_final_of(&mut s, "pw");
            let (head, proof) = good.rsplit_once(",p=").expect("proof");
            let nonce = head.strip_prefix("c=biws,").expect("cbind");
            let case = case(head, nonce, proof);
            assert!(
                matches!(
                    s.client_final(case.as_bytes()),
                    Err(ScramError::Malformed(_))
                ),
                "{case}"
            );
        }
        // Extensions before the proof are allowed.
        let mut s = exchange(&["pw"]);
        let good = client_final_of(&mut s, "pw");
        let (head, _) = good.rsplit_once(",p=").expect("proof");
        let with_ext = format!("{head},x=ext,p={}", STANDARD.encode([0u8; 32]));
        assert_eq!(
            s.client_final(with_ext.as_bytes()),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn tampered_nonce_is_refused() {
        let mut s = exchange(&["pw"]);
        let good = client_final_of(&mut s, "pw");
        let tampered = good.replacen(",r=", ",r=X", 1);
        assert_eq!(
            s.client_final(tampered.as_bytes()),
            Err(ScramError::NonceMismatch)
        );
    }

    #[test]
    fn messages_out_of_order_are_refused() {
        let mut s = exchange(&["pw"]);
        assert_eq!(
            s.client_final(b"c=biws,r=abc,p=AAAA"),
            Err(ScramError::OutOfOrder)
        );
        let mut s = exchange(&["pw"]);
        s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc")
            .expect("server-first");
        assert_eq!(
            s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc"),
            Err(ScramError::OutOfOrder)
        );
        let mut s = exchange(&["pw"]);
        assert_eq!(login(&mut s, "pw", ChannelBinding::unsupported()), Ok(()));
        assert_eq!(
            s.client_first(SCRAM_SHA_256, b"n,,n=,r=abc"),
            Err(ScramError::OutOfOrder)
        );
    }

    #[test]
    fn doomed_exchange_looks_real_and_always_fails() {
        let key = [7u8; 32];
        let mut a = ScramExchange::doomed("ghost", &key);
        let mut b = ScramExchange::doomed("ghost", &key);
        let sa = String::from_utf8(a.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").expect("sf"))
            .expect("ascii");
        let sb = String::from_utf8(b.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").expect("sf"))
            .expect("ascii");
        let salt = |s: &str| s.split(',').nth(1).map(str::to_owned);
        assert_eq!(salt(&sa), salt(&sb), "same user, same salt");
        let mut c = ScramExchange::doomed("other", &key);
        let sc = String::from_utf8(c.client_first(SCRAM_SHA_256, b"n,,n=,r=abc").expect("sf"))
            .expect("ascii");
        assert_ne!(salt(&sa), salt(&sc));

        let mut d = ScramExchange::doomed("ghost", &key);
        assert_eq!(
            login(&mut d, "anything", ChannelBinding::unsupported()),
            Err(ScramError::InvalidProof)
        );
    }

    #[test]
    fn a_refused_proof_can_be_checked_again_against_refreshed_secrets() {
        let mut s = exchange(&["old"]);
        let mut client = ScramSha256::new(b"new", ChannelBinding::unsupported());
        let sf = s
            .client_first(SCRAM_SHA_256, client.message())
            .expect("server-first");
        client.update(&sf).expect("client accepts server-first");
        let last = client.message().to_vec();
        assert_eq!(s.client_final(&last), Err(ScramError::InvalidProof));
        let other_salt =
            ScramSecret::from_password("new", b"another-salt", DEFAULT_ITERATIONS).expect("secret");
        assert!(matches!(
            s.replace_secrets(vec![other_salt]),
            Err(ScramError::InvalidSecrets(_))
        ));
        s.replace_secrets(vec![secret("old"), secret("new")])
            .expect("same salt");
        let server_final = s.client_final(&last).expect("the new password matches");
        client
            .finish(&server_final)
            .expect("the signature is the matching secret's");
        assert_eq!(
            s.replace_secrets(vec![secret("new")]),
            Err(ScramError::OutOfOrder),
            "a finished exchange cannot be reopened"
        );
        let mut doomed = ScramExchange::doomed("ghost", &[7u8; 32]);
        assert_eq!(
            login(&mut doomed, "x", ChannelBinding::unsupported()),
            Err(ScramError::InvalidProof)
        );
        assert_eq!(
            doomed.replace_secrets(vec![secret("x")]),
            Err(ScramError::OutOfOrder)
        );
    }
}
