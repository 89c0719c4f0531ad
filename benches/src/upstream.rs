//! The in-process upstream server that every case talks to, directly or through the tunnel.
//!
//! The agent splices each tunnel stream to one upstream address, so a single listener serves
//! every case; the first byte a client sends picks the behavior:
//!
//! - `S` + 8-byte little-endian length `L`: **sink**. Reads and discards `L` bytes, then
//!   writes back the 8-byte count it received.
//! - `E`: **echo**. Writes back every byte it reads, the `E` included, until end of stream.
//! - `G`: **HTTP/1.1** (the `G` of `GET`). Answers every request on the keep-alive
//!   connection with `200 OK` and a fixed body: 1 MiB when the path ends in [`PATH_1M`]
//!   (`/object-1m`), else 1 KiB.
//!
//! - `0x16` (a TLS handshake record): **HTTPS**. TLS 1.3 with a certificate for `127.0.0.1`
//!   and `localhost` from a CA generated at start ([`Upstream::ca_pem`]), then the same
//!   HTTP/1.1 answers as `G`. This is the "API server" the agent's kube gateway handler talks
//!   to (`--upstream https://ADDR --upstream-ca-file ...`), on the same port as the raw modes.
//!
//! Anything else closes the connection. Every connection ends at end of stream or on error;
//! the accept loop ends when the returned [`Upstream`] is dropped.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

/// Mode byte: sink.
pub const MODE_SINK: u8 = b'S';
/// Mode byte: echo.
pub const MODE_ECHO: u8 = b'E';
/// First byte of a TLS connection (handshake record).
const MODE_TLS: u8 = 0x16;
/// Size of the HTTP response body.
pub const HTTP_BODY: usize = 1024;
/// Path (last segment) of the large object, and its size.
pub const PATH_1M: &str = "object-1m";
pub const HTTP_BODY_1M: usize = 1 << 20;
/// Largest HTTP request head the server accepts.
const MAX_HEAD: usize = 16 * 1024;
/// Read buffer of the sink.
const SINK_BUFFER: usize = 256 * 1024;

/// A running upstream server; dropping it stops accepting (open connections end with their
/// clients).
pub struct Upstream {
    pub addr: SocketAddr,
    /// The CA (PEM) that signed the HTTPS mode's certificate.
    pub ca_pem: String,
    stop: Arc<Notify>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.notify_one();
    }
}

/// Binds 127.0.0.1:0 and serves until dropped.
pub async fn start() -> Result<Upstream> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(Notify::new());
    let stopped = stop.clone();
    let response = Responses {
        small: http_response(HTTP_BODY).into(),
        large: http_response(HTTP_BODY_1M).into(),
    };
    let ca = tether_proto::tls::CertificateAuthority::generate("bench upstream")
        .context("generating the upstream CA")?;
    let leaf = ca
        .issue_server(
            &["127.0.0.1".into(), "localhost".into()],
            std::time::Duration::from_secs(3600),
        )
        .context("issuing the upstream certificate")?;
    let tls = tether_proto::tls::server_config(&leaf.cert_pem, &leaf.key_pem, &[b"http/1.1"], None)
        .context("upstream TLS configuration")?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stopped.notified() => return,
            };
            match accepted {
                Ok((tcp, _)) => {
                    let (response, acceptor) = (response.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        let _ = serve(tcp, response, acceptor).await;
                    });
                }
                // Out of file descriptors or similar: back off briefly, keep serving.
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    });
    Ok(Upstream {
        addr,
        ca_pem: ca.cert_pem().to_string(),
        stop,
    })
}

/// The two fixed HTTP responses (headers and body), built once.
#[derive(Clone)]
struct Responses {
    small: Arc<[u8]>,
    large: Arc<[u8]>,
}

impl Responses {
    /// The answer to the request whose head is `head`: the large object when the path's last
    /// segment is [`PATH_1M`].
    fn for_head(&self, head: &[u8]) -> &[u8] {
        let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
        let path = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
        let path = path.split(|&b| b == b'?').next().unwrap_or_default();
        if path.ends_with(PATH_1M.as_bytes()) {
            &self.large
        } else {
            &self.small
        }
    }
}

/// A fixed HTTP response: headers and a body of `len` bytes.
fn http_response(len: usize) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\r\n"
    )
    .into_bytes();
    r.extend((0..len).map(|i| b'a' + (i % 26) as u8));
    r
}

async fn serve(
    mut tcp: TcpStream,
    response: Responses,
    acceptor: TlsAcceptor,
) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    // Peek, so that a TLS handshake reaches the acceptor whole.
    if tcp.peek(&mut mode).await? == 0 {
        return Ok(());
    }
    if mode[0] == MODE_TLS {
        let tls = acceptor.accept(tcp).await?;
        return http(tls, Vec::with_capacity(4096), response).await;
    }
    tcp.read_exact(&mut mode).await?;
    match mode[0] {
        MODE_SINK => sink(tcp).await,
        MODE_ECHO => echo(tcp).await,
        b'G' => {
            let mut buf = Vec::with_capacity(4096);
            buf.push(b'G');
            http(tcp, buf, response).await
        }
        _ => Ok(()),
    }
}

async fn sink(mut tcp: TcpStream) -> std::io::Result<()> {
    let want = tcp.read_u64_le().await?;
    let mut buf = vec![0u8; SINK_BUFFER];
    let mut got = 0u64;
    while got < want {
        let cap = (want - got).min(buf.len() as u64) as usize;
        let n = tcp.read(&mut buf[..cap]).await?;
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    tcp.write_all(&got.to_le_bytes()).await?;
    tcp.shutdown().await
}

async fn echo(mut tcp: TcpStream) -> std::io::Result<()> {
    tcp.write_all(&[MODE_ECHO]).await?;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        tcp.write_all(&buf[..n]).await?;
    }
}

/// Serves GET requests (no request bodies) on a keep-alive connection, `buf` holding what was
/// already read of it; pipelined requests are answered in order.
async fn http<S: AsyncRead + AsyncWrite + Unpin>(
    mut tcp: S,
    mut buf: Vec<u8>,
    response: Responses,
) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    loop {
        // Answer every complete request head in the buffer.
        let mut start = 0;
        while let Some(end) = find_head_end(&buf[start..]) {
            tcp.write_all(response.for_head(&buf[start..start + end]))
                .await?;
            start += end;
        }
        if start > 0 {
            buf.drain(..start);
            // A TLS stream may hold the records back until flushed.
            tcp.flush().await?;
        }
        if buf.len() > MAX_HEAD {
            return Ok(());
        }
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The length of the request head at the start of `buf` (through `\r\n\r\n`), if complete.
pub fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn modes_work() {
        let up = start().await.unwrap();
        // Sink.
        let mut c = TcpStream::connect(up.addr).await.unwrap();
        c.write_all(&[MODE_SINK]).await.unwrap();
        c.write_u64_le(100_000).await.unwrap();
        c.write_all(&vec![7u8; 100_000]).await.unwrap();
        assert_eq!(c.read_u64_le().await.unwrap(), 100_000);
        // Echo.
        let mut c = TcpStream::connect(up.addr).await.unwrap();
        c.write_all(b"Ehello").await.unwrap();
        let mut back = [0u8; 6];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"Ehello");
        // HTTP, two pipelined requests.
        let mut c = TcpStream::connect(up.addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let one = http_response(HTTP_BODY).len();
        let mut back = vec![0u8; 2 * one];
        c.read_exact(&mut back).await.unwrap();
        assert!(back.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert!(back[one..].starts_with(b"HTTP/1.1 200 OK\r\n"));
        // HTTPS.
        let cfg = tether_proto::tls::client_config(&up.ca_pem, &[b"http/1.1"], None).unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tcp = TcpStream::connect(up.addr).await.unwrap();
        let mut c = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        c.write_all(b"GET /clusters/x/object HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        c.flush().await.unwrap();
        let mut back = vec![0u8; one];
        c.read_exact(&mut back).await.unwrap();
        assert!(back.starts_with(b"HTTP/1.1 200 OK\r\n"));
        // The large object, over HTTPS, then a small one on the same connection.
        c.write_all(
            b"GET /clusters/x/object-1m HTTP/1.1\r\nHost: x\r\n\r\nGET /object HTTP/1.1\r\n\r\n",
        )
        .await
        .unwrap();
        c.flush().await.unwrap();
        let big = http_response(HTTP_BODY_1M).len();
        let mut back = vec![0u8; big + one];
        c.read_exact(&mut back).await.unwrap();
        assert!(back.starts_with(b"HTTP/1.1 200 OK\r\n"));
        assert!(std::str::from_utf8(&back[..200])
            .unwrap()
            .contains(&format!("Content-Length: {HTTP_BODY_1M}\r\n")));
        assert!(back[big..].starts_with(b"HTTP/1.1 200 OK\r\n"));
    }
}
