//! What a connection's writer writes to: a [`Wire`] is either the raw TCP socket (WebSocket
//! connections, SSE streams on the raw path) or a [`BodyWire`], the streaming body of a response
//! hyper writes (an SSE stream requested on a kept-alive HTTP connection).
//!
//! A wire is written without awaiting (`try_write_vectored`, `WouldBlock` when full) and awaited
//! for room (`writable`), so [`crate::conn`] drives both the same way.
//!
//! ```ignore
//! let (mut wire, body) = BodyWire::new(4);
//! assert_eq!(wire.try_write_vectored(&[IoSlice::new(b"data: 1\n\n")])?, 9);
//! // `body` is the response body: it yields b"data: 1\n\n".
//! ```

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

/// A byte stream a connection writes to and reads (or watches) the peer on.
pub(crate) trait Wire: Send + Sync {
    /// Writes what the socket takes now from `bufs`, in order; `WouldBlock` when it is full.
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Reads what the peer sent, without waiting: `Ok(0)` once it closed, `WouldBlock` when
    /// nothing is there.
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Waits until the peer sent something or closed.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Waits until a write can make progress.
    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Ends the server's side of the stream (FIN) after what was written.
    fn shutdown_write(&mut self);
    /// Makes the end abortive: the peer learns the stream is broken, not that it ended.
    fn reset(&mut self);
}

impl Wire for TcpStream {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }

    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        TcpStream::try_read(self, buf)
    }

    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::readable(self)
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        TcpStream::writable(self)
    }

    fn shutdown_write(&mut self) {
        let _ = socket2::SockRef::from(&*self).shutdown(std::net::Shutdown::Write);
    }

    /// `SO_LINGER` 0: dropping the socket then sends a reset.
    fn reset(&mut self) {
        let _ = socket2::SockRef::from(&*self).set_linger(Some(Duration::ZERO));
    }
}

/// The writing end of a streaming response body: each write becomes one body chunk, at most
/// `capacity` of them waiting for hyper (then `WouldBlock`). The peer "closes" when hyper drops
/// the body (the client went away); nothing can be read from it.
#[derive(Debug)]
pub(crate) struct BodyWire {
    /// `None` once the server's side ended (the body then ends with its last chunk).
    tx: Option<mpsc::Sender<Bytes>>,
    /// Fails the body, so hyper aborts the connection instead of ending the body cleanly.
    abort: Option<oneshot::Sender<()>>,
}

impl BodyWire {
    /// A wire and the body it feeds.
    pub(crate) fn new(capacity: usize) -> (BodyWire, Body) {
        let (tx, rx) = mpsc::channel(capacity);
        let (abort, aborted) = oneshot::channel();
        (BodyWire { tx: Some(tx), abort: Some(abort) }, Body { rx, aborted: Some(aborted) })
    }
}

fn gone() -> io::Error {
    io::ErrorKind::BrokenPipe.into()
}

impl Wire for BodyWire {
    /// Copies `bufs` into one chunk (at most one render batch: [`crate::conn::MAX_IOVECS`]
    /// slices).
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let tx = self.tx.as_ref().ok_or_else(gone)?;
        match tx.try_reserve() {
            Ok(permit) => {
                let len = bufs.iter().map(|b| b.len()).sum();
                let mut chunk = BytesMut::with_capacity(len);
                for b in bufs {
                    chunk.extend_from_slice(b);
                }
                permit.send(chunk.freeze());
                Ok(len)
            }
            Err(mpsc::error::TrySendError::Full(())) => Err(io::ErrorKind::WouldBlock.into()),
            Err(mpsc::error::TrySendError::Closed(())) => Err(gone()),
        }
    }

    fn try_read(&self, _buf: &mut [u8]) -> io::Result<usize> {
        match &self.tx {
            Some(tx) if !tx.is_closed() => Err(io::ErrorKind::WouldBlock.into()),
            _ => Ok(0),
        }
    }

    /// Ready once hyper dropped the body (or the server's side ended): then "EOF".
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
        let tx = self.tx.as_ref();
        async move {
            if let Some(tx) = tx {
                tx.closed().await;
            }
            Ok(())
        }
    }

    fn writable(&self) -> impl Future<Output = io::Result<()>> + Send {
        let tx = self.tx.as_ref();
        async move {
            // The slot is given back at once: this writer is the only sender, so the next
            // `try_write_vectored` finds it free.
            tx.ok_or_else(gone)?.reserve().await.map(drop).map_err(|_| gone())
        }
    }

    fn shutdown_write(&mut self) {
        self.tx = None;
        self.abort = None;
    }

    fn reset(&mut self) {
        if let Some(abort) = self.abort.take() {
            let _ = abort.send(());
        }
        self.tx = None;
    }
}

/// The response body a [`BodyWire`] feeds: its chunks, then the end (or an error after
/// [`Wire::reset`], which makes hyper abort the connection).
#[derive(Debug)]
pub(crate) struct Body {
    rx: mpsc::Receiver<Bytes>,
    aborted: Option<oneshot::Receiver<()>>,
}

impl futures_util::Stream for Body {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(aborted) = &mut this.aborted {
            match Pin::new(aborted).poll(cx) {
                Poll::Ready(Ok(())) => {
                    this.aborted = None;
                    this.rx.close();
                    let reset = io::Error::new(io::ErrorKind::ConnectionReset, "stream reset");
                    return Poll::Ready(Some(Err(reset)));
                }
                // Ended without a reset: the chunks, then the end.
                Poll::Ready(Err(_)) => this.aborted = None,
                Poll::Pending => {}
            }
        }
        this.rx.poll_recv(cx).map(|chunk| chunk.map(Ok))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn a_body_wire_fills_then_blocks_then_ends() {
        let (mut wire, mut body) = BodyWire::new(2);
        let one = [IoSlice::new(b"a"), IoSlice::new(b"bc")];
        assert_eq!(wire.try_write_vectored(&one).unwrap(), 3);
        assert_eq!(wire.try_write_vectored(&one).unwrap(), 3);
        let full = wire.try_write_vectored(&one).unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock);
        assert_eq!(body.next().await.unwrap().unwrap(), "abc");
        wire.writable().await.unwrap();
        assert_eq!(wire.try_write_vectored(&one).unwrap(), 3);
        assert_eq!(wire.try_read(&mut [0; 4]).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        wire.shutdown_write();
        assert_eq!(wire.try_read(&mut [0; 4]).unwrap(), 0, "ended: reads as EOF");
        assert_eq!(body.next().await.unwrap().unwrap(), "abc");
        assert_eq!(body.next().await.unwrap().unwrap(), "abc");
        assert!(body.next().await.is_none(), "a clean end");
    }

    #[tokio::test]
    async fn a_reset_fails_the_body_and_a_dropped_body_reads_as_eof() {
        let (mut wire, mut body) = BodyWire::new(2);
        wire.try_write_vectored(&[IoSlice::new(b"x")]).unwrap();
        wire.reset();
        assert!(body.next().await.unwrap().is_err(), "the body fails at once");
        let (wire, body) = BodyWire::new(2);
        drop(body);
        wire.readable().await.unwrap();
        assert_eq!(wire.try_read(&mut [0; 4]).unwrap(), 0);
        let gone = wire.try_write_vectored(&[IoSlice::new(b"x")]).unwrap_err();
        assert_eq!(gone.kind(), io::ErrorKind::BrokenPipe);
    }
}
