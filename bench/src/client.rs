//! Opening a client connection to a target: plain or TLS (rustls, through pgwarden's own
//! `sslmode=require` config: the bench measures, it does not authenticate the server).

use tokio_postgres::config::SslMode;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

/// How clients reach one target.
#[derive(Clone)]
pub struct Connector {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl Connector {
    /// `dsn` in key=value or URL form; `tls` overrides its sslmode.
    pub fn new(dsn: &str, tls: bool) -> anyhow::Result<Self> {
        let mut config: tokio_postgres::Config = dsn.parse()?;
        config.ssl_mode(if tls {
            SslMode::Require
        } else {
            SslMode::Disable
        });
        let rustls = pgwarden::tls::unverified_client_config()?;
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(rustls),
        })
    }

    /// Connects; returns once the first ReadyForQuery arrived.
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        tokio::spawn(connection);
        Ok(client)
    }
}

/// The label an error is counted under: its SQLSTATE, or `connection` for I/O failures.
pub fn error_key(e: &tokio_postgres::Error) -> String {
    e.code()
        .map_or_else(|| "connection".to_owned(), |c| c.code().to_owned())
}
