//! Length-delimited message framing: a protobuf varint length, then the encoded message.
//!
//! Reads are exact: [`read_message`] never consumes a byte past the end of its frame, so raw
//! bytes may follow a message on the same stream (a data stream carries `StreamOpen`, then
//! `StreamReply`, then the spliced bytes). A length above the caller's maximum is a protocol
//! error reported before anything is allocated.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest control message we accept by default (a `Hello` with labels and a token fits well).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// What can go wrong reading or writing a framed message.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("malformed frame length prefix")]
    BadLength,
    #[error("peer closed the stream before a complete message")]
    Closed,
    #[error("message could not be decoded: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Writes `msg` with its length prefix, and flushes.
pub async fn write_message<W, M>(w: &mut W, msg: &M) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    M: Message,
{
    let buf = msg.encode_length_delimited_to_vec();
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one length-prefixed message of at most `max` bytes.
///
/// Returns [`FrameError::Closed`] if the stream ends before the first byte or mid-message.
pub async fn read_message<R, M>(r: &mut R, max: usize) -> Result<M, FrameError>
where
    R: AsyncRead + Unpin,
    M: Message + Default,
{
    let len = read_length(r).await?;
    if len > max as u64 {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await.map_err(eof_as_closed)?;
    Ok(M::decode(&buf[..])?)
}

/// Reads a varint length one byte at a time (at most 10 bytes), so nothing past it is consumed.
async fn read_length<R: AsyncRead + Unpin>(r: &mut R) -> Result<u64, FrameError> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let byte = r.read_u8().await.map_err(eof_as_closed)?;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(FrameError::BadLength)
}

fn eof_as_closed(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Closed
    } else {
        FrameError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Hello, Ping};

    #[tokio::test]
    async fn round_trip_leaves_following_bytes_unread() {
        let hello = Hello {
            protocol_version: 1,
            cluster: "a".into(),
            ..Default::default()
        };
        let mut wire = Vec::new();
        write_message(&mut wire, &hello).await.unwrap();
        wire.extend_from_slice(b"raw");
        let mut r = &wire[..];
        let got: Hello = read_message(&mut r, DEFAULT_MAX_FRAME).await.unwrap();
        assert_eq!(got, hello);
        assert_eq!(r, b"raw");
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_before_allocation() {
        // A length prefix claiming 2^40 bytes.
        let mut wire = Vec::new();
        prost::encoding::encode_varint(1 << 40, &mut wire);
        let mut r = &wire[..];
        let err = read_message::<_, Ping>(&mut r, 1024).await.unwrap_err();
        assert!(
            matches!(err, FrameError::TooLarge { max: 1024, .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn garbage_and_truncation_are_errors() {
        let mut r: &[u8] = &[0xff; 16];
        assert!(matches!(
            read_message::<_, Ping>(&mut r, 1 << 20).await,
            Err(FrameError::BadLength)
        ));
        let mut r: &[u8] = &[5, 1, 2];
        assert!(matches!(
            read_message::<_, Ping>(&mut r, 1024).await,
            Err(FrameError::Closed)
        ));
        let mut r: &[u8] = &[3, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_message::<_, Ping>(&mut r, 1024).await,
            Err(FrameError::Decode(_))
        ));
    }
}
