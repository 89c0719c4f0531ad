//! Copying bytes both ways between two streams until both directions are done.
//!
//! Each direction ends when its reader reaches end of stream; the writer is then shut down
//! (half-close), and the other direction keeps flowing until it ends too. Counters are updated
//! as bytes move, so status pages see long transfers while they run.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of each direction's copy buffer.
pub const SPLICE_BUFFER: usize = 64 * 1024;

/// Bytes moved by a finished [`splice`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Spliced {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
}

/// Copies `a → b` and `b → a` at once, half-closing each writer when its reader ends.
///
/// `a_to_b` and `b_to_a` (if given) are incremented as bytes move. Returns when both
/// directions have ended, or with the first error.
pub async fn splice<A, B>(
    a: A,
    b: B,
    a_to_b: Option<&AtomicU64>,
    b_to_a: Option<&AtomicU64>,
) -> io::Result<Spliced>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let (x, y) = tokio::try_join!(
        copy_then_shutdown(&mut ar, &mut bw, a_to_b),
        copy_then_shutdown(&mut br, &mut aw, b_to_a),
    )?;
    Ok(Spliced {
        a_to_b: x,
        b_to_a: y,
    })
}

async fn copy_then_shutdown<R, W>(
    r: &mut R,
    w: &mut W,
    counter: Option<&AtomicU64>,
) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; SPLICE_BUFFER];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        total += n as u64;
        if let Some(c) = counter {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    }
    // The peer may already be gone; a failed shutdown does not undo a finished copy.
    let _ = w.shutdown().await;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_both_ways_and_half_closes() {
        let (client, a) = tokio::io::duplex(1024);
        let (b, server) = tokio::io::duplex(1024);
        let counter = AtomicU64::new(0);
        let task = tokio::spawn(async move {
            let c = AtomicU64::new(0);
            let r = splice(a, b, Some(&c), None).await.unwrap();
            (r, c.load(Ordering::Relaxed))
        });
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        cw.write_all(b"hello").await.unwrap();
        cw.shutdown().await.unwrap();
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        // The other direction still flows after the first one closed.
        sw.write_all(b"world!").await.unwrap();
        sw.shutdown().await.unwrap();
        let mut back = Vec::new();
        cr.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        let (r, c) = task.await.unwrap();
        assert_eq!(
            r,
            Spliced {
                a_to_b: 5,
                b_to_a: 6
            }
        );
        assert_eq!(c, 5);
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
