//! An accepted client connection as the transports receive it: the TCP stream, the bytes the
//! listener already read from it (to tell `GET /sse` from the rest without peeking), and its
//! [`Permit`] under the node's socket cap.
//!
//! [`Socket`] is the IO hyper serves: it yields the already-read bytes first, then reads the
//! stream. A WebSocket upgrade takes it back apart with [`Socket::into_parts`].
//!
//! ```no_run
//! # async fn f(stream: tokio::net::TcpStream) {
//! use herald_server::socket::{Permit, Socket};
//! let socket = Socket::new(stream, b"GET /".to_vec(), Permit::none());
//! let (stream, unread, permit) = socket.into_parts();
//! assert_eq!(unread, b"GET /");
//! # }
//! ```

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

/// The client address of an HTTP request, as a request extension (the listener adds it,
/// the transports read it).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// A connection's place under the node's socket cap (`limits.max_connections` +
/// `limits.socket_reserve`), released when dropped, i.e. when the connection closes.
#[derive(Debug)]
pub struct Permit(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Permit {
    /// A permit taken from the listener's semaphore.
    pub fn new(permit: OwnedSemaphorePermit) -> Permit {
        Permit(Some(permit))
    }

    /// No permit (a connection that is not counted, e.g. in tests).
    pub fn none() -> Permit {
        Permit(None)
    }
}

/// A TCP stream with bytes already read from it in front (see the module docs).
#[derive(Debug)]
pub struct Socket {
    stream: TcpStream,
    /// Bytes read by the listener and not yet handed to the reader.
    prefix: Vec<u8>,
    /// How much of `prefix` was handed out.
    consumed: usize,
    permit: Permit,
}

impl Socket {
    /// `stream`, whose first bytes `prefix` were already read from it.
    pub fn new(stream: TcpStream, prefix: Vec<u8>, permit: Permit) -> Socket {
        Socket { stream, prefix, consumed: 0, permit }
    }

    /// The stream, the bytes read from it that no reader took yet, and the permit.
    pub fn into_parts(mut self) -> (TcpStream, Vec<u8>, Permit) {
        let unread = self.prefix.split_off(self.consumed.min(self.prefix.len()));
        (self.stream, unread, self.permit)
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.consumed < this.prefix.len() {
            let rest = &this.prefix[this.consumed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.consumed += n;
            if this.consumed == this.prefix.len() {
                this.prefix = Vec::new();
                this.consumed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// How long a connection being closed by the server keeps reading what the client still sends.
const LINGER: Duration = Duration::from_secs(1);
/// Most bytes read while lingering.
const LINGER_BYTES: usize = 64 * 1024;

/// After the answer is written and the write side shut down: reads and discards what the
/// client still sends, until it closes, [`LINGER`] passes or [`LINGER_BYTES`] arrived, so that
/// closing does not reset the connection under the answer.
pub(crate) async fn linger(stream: &mut TcpStream) {
    let drain = async {
        let mut buf = [0u8; 2048];
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn yields_the_prefix_then_the_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b" world").await.unwrap();
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            back
        });
        let (stream, _) = listener.accept().await.unwrap();
        let mut socket = Socket::new(stream, b"hello".to_vec(), Permit::none());
        let mut small = [0u8; 3];
        socket.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"hel");
        let (stream, unread, _) = socket.into_parts();
        assert_eq!(unread, b"lo", "what no reader took yet");
        let mut socket = Socket::new(stream, unread, Permit::none());
        let mut all = [0u8; 8];
        socket.read_exact(&mut all).await.unwrap();
        assert_eq!(&all, b"lo world");
        socket.write_all(b"ok").await.unwrap();
        drop(socket);
        assert_eq!(client.await.unwrap(), b"ok");
    }
}
