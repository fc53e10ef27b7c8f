//! A client or backend connection that is plain TCP or TLS over TCP, behind one
//! AsyncRead + AsyncWrite type, so sessions and the relay do not care which; and the
//! socket under it, which can leave tokio's reactor: a client's while it is parked, a
//! backend's when a client on another worker thread borrows it.

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
pub type ClientStream = MaybeTls<Socket, tokio_rustls::server::TlsStream<Socket>>;
/// A backend connection.
pub type BackendStream = MaybeTls<Socket, tokio_rustls::client::TlsStream<Socket>>;

/// A TCP socket that can leave tokio's reactor and join another: registered with the
/// reactor of the worker thread serving it, a plain file descriptor while its client is
/// parked (see `parking.rs`). Under TLS it is the transport the TLS session wraps, so the
/// session survives the move.
pub enum Socket {
    Live(TcpStream),
    Parked(std::net::TcpStream),
    /// Only between the two states above.
    Moving,
}

impl Socket {
    /// Deregisters the socket from tokio; returns its descriptor for another poller.
    pub fn park(&mut self) -> io::Result<RawFd> {
        let Socket::Live(tcp) = std::mem::replace(self, Socket::Moving) else {
            return Err(io::Error::other("socket is not live"));
        };
        let std = tcp.into_std()?;
        let fd = std.as_raw_fd();
        *self = Socket::Parked(std);
        Ok(fd)
    }

    /// Registers a parked socket with tokio again. Must run inside the runtime.
    pub fn unpark(&mut self) -> io::Result<()> {
        let Socket::Parked(std) = std::mem::replace(self, Socket::Moving) else {
            return Err(io::Error::other("socket is not parked"));
        };
        *self = Socket::Live(TcpStream::from_std(std)?);
        Ok(())
    }

    /// Moves a live socket to the reactor of the calling thread's runtime (each worker
    /// thread has its own: see `runtime.rs`).
    pub fn move_here(&mut self) -> io::Result<()> {
        self.park()?;
        self.unpark()
    }

    /// The descriptor of a parked socket.
    pub fn parked_fd(&self) -> Option<RawFd> {
        match self {
            Socket::Parked(std) => Some(std.as_raw_fd()),
            _ => None,
        }
    }

    fn live(&mut self) -> io::Result<&mut TcpStream> {
        match self {
            Socket::Live(tcp) => Ok(tcp),
            _ => Err(io::Error::from(io::ErrorKind::NotConnected)),
        }
    }
}

impl AsyncRead for Socket {
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

impl AsyncWrite for Socket {
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
    pub fn socket_mut(&mut self) -> &mut Socket {
        match self {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.get_mut().0,
        }
    }

    /// Whether input (or the end of the stream) may have arrived since a read last drained
    /// the socket. `false` is known from the reactor's readiness, without a system call:
    /// epoll marks the socket readable when anything arrives, waiting task or not. Under
    /// TLS plaintext may sit decrypted in the session, so the answer is always `true`.
    pub fn may_be_readable(&self) -> bool {
        match self {
            MaybeTls::Plain(Socket::Live(tcp)) => tcp
                .poll_read_ready(&mut Context::from_waker(Waker::noop()))
                .is_ready(),
            MaybeTls::Plain(_) | MaybeTls::Tls(_) => true,
        }
    }
}

impl ClientStream {
    pub fn socket_mut(&mut self) -> &mut Socket {
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
