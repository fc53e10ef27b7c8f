//! A tiny HTTP/1.0 GET for pgwarden's admin port (`/healthz`, `/metrics`), so the harness
//! needs no HTTP client crate.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest a single admin request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Status code and body of a `GET path` to 127.0.0.1:`port`.
pub(crate) async fn get(port: u16, path: &str) -> io::Result<(u16, String)> {
    tokio::time::timeout(REQUEST_TIMEOUT, get_inner(port, path))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("GET {path} timed out")))?
}

async fn get_inner(port: u16, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("bad response: {head:?}"),
            )
        })?;
    Ok((status, body.to_owned()))
}
