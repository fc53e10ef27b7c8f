//! A client or backend connection that is plain TCP or TLS over TCP, behind one
//! AsyncRead + AsyncWrite type, so sessions and the relay do not care which; and the
//! client's socket, which can leave tokio's reactor while the client is parked.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Plain or TLS, for either side of the proxy: `S` is the socket, `T` TLS over it.
pub enum MaybeTls<S, T> {
    Plain(S),
    Tls(Box<T>),
}

/// A client's connection.
pub type ClientStream = MaybeTls<ClientSocket, tokio_rustls::server::TlsStream<ClientSocket>>;
/// A backend connection.
pub type BackendStream = MaybeTls<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// A client's TCP socket: registered with tokio while a task serves the client, a plain
/// file descriptor while the client is parked (see `parking.rs`). Under TLS it is the
/// transport the TLS session wraps, so a TLS client parks without losing its session.
pub enum ClientSocket {
    Live(TcpStream),
    Parked(std::net::TcpStream),
    /// Only between the two states above.
    Moving,
}

impl ClientSocket {
    /// Deregisters the socket from tokio; returns its descriptor for another poller.
    pub fn park(&mut self) -> io::Result<RawFd> {
        let ClientSocket::Live(tcp) = std::mem::replace(self, ClientSocket::Moving) else {
            return Err(io::Error::other("client socket is not live"));
        };
        let std = tcp.into_std()?;
        let fd = std.as_raw_fd();
        *self = ClientSocket::Parked(std);
        Ok(fd)
    }

    /// Registers a parked socket with tokio again. Must run inside the runtime.
    pub fn unpark(&mut self) -> io::Result<()> {
        let ClientSocket::Parked(std) = std::mem::replace(self, ClientSocket::Moving) else {
            return Err(io::Error::other("client socket is not parked"));
        };
        *self = ClientSocket::Live(TcpStream::from_std(std)?);
        Ok(())
    }

    /// The descriptor of a parked socket.
    pub fn parked_fd(&self) -> Option<RawFd> {
        match self {
            ClientSocket::Parked(std) => Some(std.as_raw_fd()),
            _ => None,
        }
    }

    fn live(&mut self) -> io::Result<&mut TcpStream> {
        match self {
            ClientSocket::Live(tcp) => Ok(tcp),
            _ => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }
}

impl AsyncRead for ClientSocket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut().live() {
            Ok(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl AsyncWrite for ClientSocket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().live() {
            Ok(tcp) => Pin::new(tcp).poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().live() {
            Ok(tcp) => Pin::new(tcp).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().live() {
            Ok(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, T: AsyncRead + AsyncWrite + Unpin> MaybeTls<S, T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }

    /// Reads whatever is available now into `buf` without waiting: `None` if nothing is.
    /// Under TLS this includes plaintext already decrypted but not yet read.
    pub fn read_now(&mut self, buf: &mut BytesMut) -> Option<io::Result<usize>> {
        let mut cx = Context::from_waker(Waker::noop());
        match tokio_util::io::poll_read_buf(Pin::new(self), &mut cx, buf) {
            Poll::Ready(r) => Some(r),
            Poll::Pending => None,
        }
    }
}

impl BackendStream {
    /// Whether input (or the end of the stream) may have arrived since a read last drained
    /// the socket. `false` is known from the reactor's readiness, without a system call:
    /// epoll marks the socket readable when anything arrives, waiting task or not. Under
    /// TLS plaintext may sit decrypted in the session, so the answer is always `true`.
    pub fn may_be_readable(&self) -> bool {
        match self {
            MaybeTls::Plain(tcp) => tcp
                .poll_read_ready(&mut Context::from_waker(Waker::noop()))
                .is_ready(),
            MaybeTls::Tls(_) => true,
        }
    }
}

impl ClientStream {
    pub fn socket_mut(&mut self) -> &mut ClientSocket {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.get_mut().0,
        }
    }

    /// Waits until the socket has something to read (or is closed), holding no buffer.
    pub async fn readable(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_readable(cx)).await
    }

    /// [`Self::readable`] as a poll: a waiting client keeps no future for it, only the
    /// socket's own waker slot.
    pub fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.socket_mut().live() {
            Ok(tcp) => tcp.poll_read_ready(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, T: AsyncRead + AsyncWrite + Unpin> AsyncRead
    for MaybeTls<S, T>
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin, T: AsyncRead + AsyncWrite + Unpin> AsyncWrite
    for MaybeTls<S, T>
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
