//! Opening a backend connection: TCP connect, StartupMessage, login (SCRAM, md5 or
//! cleartext, driven by pgwarden-auth), then ParameterStatus, BackendKeyData and the first
//! ReadyForQuery.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pgwarden_auth::{BackendLogin, LoginError, LoginStep, Secret};
use pgwarden_protocol::backend::{self, ErrorFields};
use pgwarden_protocol::frame::take_message;
use pgwarden_protocol::startup::{encode_startup, CancelKey};
use pgwarden_protocol::ProtocolError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::config::TargetConfig;
use crate::stream::{BackendStream, Socket};
use crate::tls::BackendTlsMode;

/// Largest message accepted from a backend during login.
const MAX_LOGIN_MESSAGE: usize = 64 * 1024;

/// What a successful login yields.
pub struct LoggedIn {
    pub stream: BackendStream,
    pub addr: SocketAddr,
    pub key: CancelKey,
    /// ParameterStatus values in the order the server sent them.
    pub params: Vec<(String, String)>,
    /// Bytes read past the first ReadyForQuery (normally none).
    pub leftover: BytesMut,
}

/// Why a backend login failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to {host}:{port}: {source}")]
    Io {
        host: String,
        port: u16,
        source: std::io::Error,
    },
    #[error("timed out connecting to the database after {0:?}")]
    Timeout(Duration),
    /// Postgres refused the login; `raw` is its ErrorResponse, relayed to the client as is.
    #[error("the database refused the login: {} ({})", .fields.message, .fields.code)]
    Server { fields: ErrorFields, raw: Bytes },
    #[error("backend sent invalid protocol during login: {0}")]
    Protocol(#[from] ProtocolError),
    #[error(transparent)]
    Login(#[from] LoginError),
    #[error("backend closed the connection during login")]
    Closed,
    #[error("the database does not accept TLS, which target setting tls = {0:?} requires")]
    TlsRefused(BackendTlsMode),
    #[error("TLS handshake with the database failed: {0}")]
    Tls(std::io::Error),
}

impl ConnectError {
    /// Postgres refused the password (28P01): the login may have been rotated.
    pub fn is_password_refused(&self) -> bool {
        matches!(self, ConnectError::Server { fields, .. } if fields.code == "28P01")
    }

    /// Says the target cannot take logins at all: unreachable, broken TLS or protocol,
    /// pgwarden's password refused (28P01), or a server not accepting connections (57P03).
    /// A refusal about what the client asked for (a database that does not exist, a
    /// pg_hba rule for one database) does not: one client's typo must not take the
    /// instance out of service. Nor does a full server (53300): every instance would see
    /// it, and pulling them all would turn an overload into an outage.
    pub fn says_target_down(&self) -> bool {
        match self {
            ConnectError::Server { fields, .. } => fields.code == "28P01" || fields.code == "57P03",
            _ => true,
        }
    }

    /// Worth another attempt (the server may be restarting); a refusal by Postgres is not.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ConnectError::Io { .. } | ConnectError::Closed | ConnectError::Timeout(_)
        ) || matches!(self, ConnectError::Server { fields, .. } if fields.code == "57P03")
    }
}

/// Connects and logs in to `host:port` as `user` on `database`, within `timeout`.
pub async fn connect(
    target: &TargetConfig,
    connector: Option<&TlsConnector>,
    database: &str,
    user: &str,
    password: &Secret,
    timeout: Duration,
) -> Result<LoggedIn, ConnectError> {
    tokio::time::timeout(timeout, login(target, connector, database, user, password))
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

/// TCP connect, then TLS if the target asks for it (SSLRequest, then the handshake).
async fn open(
    target: &TargetConfig,
    connector: Option<&TlsConnector>,
) -> Result<(BackendStream, SocketAddr), ConnectError> {
    let (host, port) = (target.host.as_str(), target.port);
    let io_error = |source| ConnectError::Io {
        host: host.to_owned(),
        port,
        source,
    };
    let mut tcp = TcpStream::connect((host, port)).await.map_err(io_error)?;
    tcp.set_nodelay(true).map_err(io_error)?;
    let addr = tcp.peer_addr().map_err(io_error)?;
    let Some(connector) = connector else {
        return Ok((BackendStream::Plain(Socket::Live(tcp)), addr));
    };
    let mut request = BytesMut::with_capacity(8);
    request.extend_from_slice(&8u32.to_be_bytes());
    request.extend_from_slice(&80_877_103u32.to_be_bytes());
    tcp.write_all(&request).await.map_err(io_error)?;
    let answer = tcp.read_u8().await.map_err(io_error)?;
    match (answer, target.tls) {
        (b'S', _) => {
            let name = crate::tls::server_name(host)
                .map_err(|e| ConnectError::Tls(std::io::Error::other(e)))?;
            let tls = connector
                .connect(name, Socket::Live(tcp))
                .await
                .map_err(ConnectError::Tls)?;
            Ok((BackendStream::Tls(Box::new(tls)), addr))
        }
        (b'N', BackendTlsMode::Prefer) => Ok((BackendStream::Plain(Socket::Live(tcp)), addr)),
        (b'N', mode) => Err(ConnectError::TlsRefused(mode)),
        _ => Err(ProtocolError::Malformed("answer to SSLRequest").into()),
    }
}

async fn login(
    target: &TargetConfig,
    connector: Option<&TlsConnector>,
    database: &str,
    user: &str,
    password: &Secret,
) -> Result<LoggedIn, ConnectError> {
    let (host, port) = (target.host.as_str(), target.port);
    let io_error = |source| ConnectError::Io {
        host: host.to_owned(),
        port,
        source,
    };
    let (mut stream, addr) = open(target, connector).await?;

    let mut out = BytesMut::with_capacity(256);
    encode_startup(
        &[
            ("user", user),
            ("database", database),
            ("client_encoding", "UTF8"),
        ],
        &mut out,
    );
    stream.write_all(&out).await.map_err(io_error)?;
    stream.flush().await.map_err(io_error)?;

    let mut login = BackendLogin::new(user, password.clone());
    let mut buf = BytesMut::with_capacity(1024);
    let mut params = Vec::new();
    let mut key = None;
    loop {
        let (tag, body) = loop {
            if let Some(message) = take_message(&mut buf, MAX_LOGIN_MESSAGE)? {
                break message;
            }
            if stream.read_buf(&mut buf).await.map_err(io_error)? == 0 {
                return Err(ConnectError::Closed);
            }
        };
        match tag {
            backend::AUTHENTICATION => match login.respond(&body)? {
                LoginStep::Send(reply) => {
                    stream.write_all(&reply).await.map_err(io_error)?;
                    stream.flush().await.map_err(io_error)?;
                }
                LoginStep::Ok | LoginStep::Continue => {}
            },
            backend::PARAMETER_STATUS => {
                let (name, value) = backend::parse_parameter_status(&body)?;
                params.push((name.to_owned(), value.to_owned()));
            }
            backend::BACKEND_KEY_DATA => key = Some(backend::parse_backend_key_data(&body)?),
            backend::ERROR_RESPONSE => {
                let fields = ErrorFields::parse(&body)?;
                let mut raw = BytesMut::with_capacity(body.len() + 5);
                pgwarden_protocol::frame::write_message(&mut raw, tag, |b| {
                    b.extend_from_slice(&body)
                });
                return Err(ConnectError::Server {
                    fields,
                    raw: raw.freeze(),
                });
            }
            backend::NOTICE_RESPONSE | backend::NEGOTIATE_PROTOCOL_VERSION => {}
            backend::READY_FOR_QUERY => {
                let key = key.ok_or(ProtocolError::Malformed("login without BackendKeyData"))?;
                return Ok(LoggedIn {
                    stream,
                    addr,
                    key,
                    params,
                    leftover: buf,
                });
            }
            other => return Err(ProtocolError::Unexpected(other as char).into()),
        }
    }
}
