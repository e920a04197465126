//! A connection switched to another protocol (a WebSocket, after the upstream's `101`), spliced
//! byte for byte between the client and the upstream. It ends when either side closes, after
//! `idle_timeout_seconds` without a byte either way (or with the client taking none of the
//! bytes sent to it: its socket's `Stall` fails the write), or at the gateway's shutdown (both sides
//! then get an orderly close, so clients reconnect, to another node if this one stops). The
//! bytes each way are counted, for the consumer's usage.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

/// How a spliced connection went.
#[derive(Debug, Default)]
pub struct Spliced {
    /// Bytes the client sent (to the upstream).
    pub from_client: u64,
    /// Bytes the upstream sent (to the client), those read with its `101` included.
    pub to_client: u64,
    /// Why it ended: `closed` (by a side), `idle`, `shutdown` or `error`.
    pub end: &'static str,
    /// The failure, when it ended with an error.
    pub error: Option<std::io::Error>,
}

/// A side of the splice: counts what is read from it and when.
struct Watched<'a, S> {
    inner: S,
    read: u64,
    /// Milliseconds from `base` to the last byte read on either side.
    last: &'a AtomicU64,
    base: Instant,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.read += n as u64;
            // rounded up: the idle time is never counted from before this read
            let ms = self.base.elapsed().as_millis().saturating_add(1);
            self.last
                .store(u64::try_from(ms).unwrap_or(u64::MAX), Relaxed);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Splices `client` and `upstream` (after writing `early`, bytes the upstream sent behind its
/// `101`, to the client) until one closes, `idle` passes without traffic, or `stop` turns true.
pub async fn run<C, U>(
    client: C,
    upstream: U,
    early: &[u8],
    idle: Duration,
    stop: Option<watch::Receiver<bool>>,
) -> Spliced
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let base = Instant::now();
    let last = AtomicU64::new(0);
    let mut c = Watched {
        inner: client,
        read: 0,
        last: &last,
        base,
    };
    let mut u = Watched {
        inner: upstream,
        read: early.len() as u64,
        last: &last,
        base,
    };
    let (end, error) = {
        let copied = async {
            c.inner.write_all(early).await?;
            tokio::io::copy_bidirectional(&mut c, &mut u).await
        };
        tokio::pin!(copied);
        let stopping = async {
            match stop {
                Some(mut s) => {
                    let _ = s.wait_for(|stopping| *stopping).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stopping);
        let mut check = base + idle;
        loop {
            tokio::select! {
                r = &mut copied => break match r {
                    Ok(_) => ("closed", None),
                    Err(e) => ("error", Some(e)),
                },
                _ = &mut stopping => break ("shutdown", None),
                _ = super::timer::sleep_until(check) => {
                    let at = base + Duration::from_millis(last.load(Relaxed)) + idle;
                    if at <= Instant::now() {
                        break ("idle", None);
                    }
                    check = at;
                }
            }
        }
    };
    if error.is_none() && end != "closed" {
        // an orderly close of both sides, bounded: a peer that reads nothing cannot hold it
        let _ = super::timer::timeout(Duration::from_secs(1), async {
            let _ = c.inner.shutdown().await;
            let _ = u.inner.shutdown().await;
        })
        .await;
    }
    Spliced {
        from_client: c.read,
        to_client: u.read,
        end,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn an_idle_splice_ends_and_counts_both_ways() {
        let idle = Duration::from_secs(2);
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (upstream, mut upstream_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(run(client, upstream, b"hi", idle, None));
        let mut got = [0u8; 2];
        client_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hi");
        client_peer.write_all(b"ping!").await.unwrap();
        let mut got = [0u8; 5];
        upstream_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping!");
        // later traffic pushes the end back
        tokio::time::sleep(Duration::from_millis(500)).await;
        let last_traffic = Instant::now();
        upstream_peer.write_all(b"pong").await.unwrap();
        let mut got = [0u8; 4];
        client_peer.read_exact(&mut got).await.unwrap();
        let done = task.await.unwrap();
        assert!(
            last_traffic.elapsed() >= idle,
            "ended {:?} after the last traffic",
            last_traffic.elapsed()
        );
        assert_eq!(done.end, "idle");
        assert_eq!((done.from_client, done.to_client), (5, 6));
        // both sides were closed in order: the peers read the end
        assert_eq!(client_peer.read(&mut got).await.unwrap(), 0);
        assert_eq!(upstream_peer.read(&mut got).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_splice_ends_at_shutdown_and_when_a_side_closes() {
        let (tx, rx) = watch::channel(false);
        let (client, mut client_peer) = tokio::io::duplex(1024);
        let (upstream, _upstream_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(run(
            client,
            upstream,
            b"",
            Duration::from_secs(60),
            Some(rx),
        ));
        tx.send(true).unwrap();
        let done = task.await.unwrap();
        assert_eq!(done.end, "shutdown");
        let mut buf = [0u8; 1];
        assert_eq!(client_peer.read(&mut buf).await.unwrap(), 0);

        let (client, client_peer) = tokio::io::duplex(1024);
        let (upstream, upstream_peer) = tokio::io::duplex(1024);
        let task = tokio::spawn(run(client, upstream, b"", Duration::from_secs(60), None));
        drop(client_peer);
        drop(upstream_peer);
        assert_eq!(task.await.unwrap().end, "closed");
    }
}
