//! Every frontend message is checked before pgwire decodes it, and a connection's messages
//! are served by a loop of our own around pgwire's `process_message`.
//!
//! Why: pgwire 0.42 decodes a message's body from the whole read buffer, trusting the body to
//! be well formed. A Bind whose counts run past its end, a Parse cut short or a length under 4
//! made it panic (`advance out of bounds`), which ended the connection with no answer, and a
//! body read past its own length would take the next message's bytes. Found by the protocol
//! fuzz test (`tests/e2e/fuzz.rs`).
//!
//! The loop also ends a connection right after a FATAL error, with no ReadyForQuery after it
//! (pgwire's `process_error` sends one, which told a client refused a password that it was
//! ready for queries just before the connection closed).
//!
//! What: [`Checked`] sits between the socket (plain or TLS) and pgwire's framing. It hands on
//! only whole messages whose bodies have exactly the layout the protocol defines, and turns
//! anything else into an error naming what was wrong, which the loop sends to the client as a
//! FATAL error with SQLSTATE 08P01 (protocol violation), as PostgreSQL does, before closing.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures::{SinkExt, StreamExt};
use pgwire::api::{ClientInfo, ErrorHandler, PgWireConnectionState, PgWireServerHandlers};
use pgwire::error::{ErrorInfo, PgWireError};
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::tokio::server::{negotiate_tls, process_error, process_message};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::codec::{Framed, FramedParts};

/// How long a connection has to finish its startup and authentication (pgwire's own).
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest message pgwire takes (its `LARGE_PACKET_SIZE_LIMIT`, as PostgreSQL's 1 GiB).
const MAX_MESSAGE: usize = 0x3fff_fffe;

/// The largest startup packet (PostgreSQL's `MAX_STARTUP_PACKET_LENGTH`).
const MAX_STARTUP: usize = 10_000;

/// Serves one connection: TLS negotiation, startup, then messages until the client leaves,
/// sends Terminate, or breaks the protocol.
pub(super) async fn process_socket<H: PgWireServerHandlers>(
    socket: TcpStream,
    tls: Option<TlsAcceptor>,
    handlers: Arc<H>,
) -> io::Result<()> {
    let startup_timeout = tokio::time::sleep(STARTUP_TIMEOUT);
    tokio::pin!(startup_timeout);
    let negotiated = tokio::select! {
        _ = &mut startup_timeout => return Ok(()),
        socket = negotiate_tls(socket, tls) => socket?,
    };
    // (None: a direct TLS handshake without TLS configured.)
    let Some(socket) = negotiated else {
        return Ok(());
    };
    // From here every byte is checked, also those the negotiation had already read.
    let old = socket.into_parts();
    let mut parts = FramedParts::new(Checked::new(old.io, old.read_buf), old.codec);
    parts.write_buf = old.write_buf;
    let mut socket = Framed::from_parts(parts);

    let startup = handlers.startup_handler();
    let simple = handlers.simple_query_handler();
    let extended = handlers.extended_query_handler();
    let copy = handlers.copy_handler();
    let cancel = handlers.cancel_handler();
    let errors = handlers.error_handler();
    loop {
        let next = if matches!(
            socket.state(),
            PgWireConnectionState::AwaitingStartup
                | PgWireConnectionState::AuthenticationInProgress
        ) {
            tokio::select! {
                _ = &mut startup_timeout => None,
                next = socket.next() => next,
            }
        } else {
            socket.next().await
        };
        let message = match next {
            None => break,
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                // A message that is not one: say why, then close (the stream cannot be
                // trusted to be in step any more).
                let reason = match e {
                    PgWireError::IoError(e) if e.kind() == io::ErrorKind::InvalidData => {
                        e.to_string()
                    }
                    PgWireError::IoError(e) => return Err(e),
                    other => other.to_string(),
                };
                let info = ErrorInfo::new("FATAL".into(), "08P01".into(), reason);
                let _ = socket
                    .send(PgWireBackendMessage::ErrorResponse(info.into()))
                    .await;
                break;
            }
        };
        // Terminate: the client is leaving, and some wait for the server to close first.
        if matches!(message, PgWireFrontendMessage::Terminate(_)) {
            break;
        }
        let is_extended = match socket.state() {
            PgWireConnectionState::CopyInProgress(extended) => extended,
            _ => message.is_extended_query(),
        };
        let is_cancel = matches!(message, PgWireFrontendMessage::CancelRequest(_));
        if let Err(mut e) = process_message(
            message,
            &mut socket,
            Arc::clone(&startup),
            Arc::clone(&simple),
            Arc::clone(&extended),
            Arc::clone(&copy),
            Arc::clone(&cancel),
        )
        .await
        {
            errors.on_error(&socket, &mut e);
            if e.is_fatal() {
                // The error, then the end: no ReadyForQuery after a FATAL (pgwire's
                // process_error sends one), as in PostgreSQL.
                let info: ErrorInfo = e.into();
                let _ = socket
                    .send(PgWireBackendMessage::ErrorResponse(info.into()))
                    .await;
                break;
            }
            process_error(&mut socket, e, is_extended).await?;
        }
        if is_cancel {
            break;
        }
    }
    Ok(())
}

/// A byte stream that lets through only whole, well-formed frontend messages (see the
/// module's docs); its writes go straight to the socket.
pub(super) struct Checked<S> {
    inner: S,
    /// Read from the socket, not yet checked.
    raw: BytesMut,
    /// Checked, not yet handed on.
    ready: BytesMut,
    /// Whether the startup packet (which has no type byte) has been through.
    started: bool,
    /// Why the stream broke the protocol, once it has.
    broken: Option<String>,
}

impl<S> Checked<S> {
    pub(super) fn new(inner: S, already_read: BytesMut) -> Self {
        Self {
            inner,
            raw: already_read,
            ready: BytesMut::new(),
            started: false,
            broken: None,
        }
    }

    /// The length of the next whole message at the front of `raw`, once it is all there
    /// and checked; an error saying why it is not a message.
    fn next_message(&mut self) -> Result<Option<usize>, String> {
        let raw = &self.raw[..];
        if !self.started {
            // Startup, SSLRequest, GSSENCRequest or CancelRequest: a length and a code.
            let Some(len) = raw
                .get(..4)
                .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            else {
                return Ok(None);
            };
            let len = usize::try_from(len).unwrap_or(0);
            if !(8..=MAX_STARTUP).contains(&len) {
                return Err(format!("invalid length {len} of a startup packet"));
            }
            if raw.len() < len {
                return Ok(None);
            }
            let code = i32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
            // After a refused SSL or GSS request the client sends its startup packet.
            const SSL_REQUEST: i32 = 80_877_103;
            const GSSENC_REQUEST: i32 = 80_877_104;
            self.started = !(len == 8 && (code == SSL_REQUEST || code == GSSENC_REQUEST));
            return Ok(Some(len));
        }
        let Some(&[kind, a, b, c, d]) = raw.get(..5) else {
            return Ok(None);
        };
        let len = i32::from_be_bytes([a, b, c, d]);
        let len = match usize::try_from(len) {
            Ok(n) if (4..=MAX_MESSAGE).contains(&n) => n,
            _ => {
                return Err(format!(
                    "invalid length {len} of a message of type {}",
                    printable(kind)
                ));
            }
        };
        if raw.len() < 1 + len {
            return Ok(None);
        }
        check_body(kind, &raw[5..1 + len])
            .map_err(|e| format!("invalid message of type {}: {e}", printable(kind)))?;
        Ok(Some(1 + len))
    }
}

fn printable(kind: u8) -> String {
    if kind.is_ascii_graphic() {
        format!("'{}'", kind as char)
    } else {
        format!("0x{kind:02x}")
    }
}

/// Whether `body` has the layout of a frontend message of type `kind`, to its last byte.
fn check_body(kind: u8, body: &[u8]) -> Result<(), String> {
    let mut r = Reader(body);
    match kind {
        // Parse: name, query, parameter types.
        b'P' => {
            r.cstring("statement name")?;
            r.cstring("query")?;
            for _ in 0..r.count("parameter types")? {
                r.take(4, "a parameter type")?;
            }
        }
        // Bind: portal, statement, parameter formats, parameters, result formats.
        b'B' => {
            r.cstring("portal name")?;
            r.cstring("statement name")?;
            for _ in 0..r.count("parameter formats")? {
                r.take(2, "a parameter format")?;
            }
            for _ in 0..r.count("parameters")? {
                let len = r.i32("a parameter's length")?;
                match usize::try_from(len) {
                    Ok(n) => {
                        r.take(n, "a parameter's value")?;
                    }
                    Err(_) if len == -1 => {} // NULL
                    Err(_) => return Err(format!("a parameter's length is {len}")),
                }
            }
            for _ in 0..r.count("result formats")? {
                r.take(2, "a result format")?;
            }
        }
        // Describe, Close: a statement or a portal, by name.
        b'D' | b'C' => {
            let target = r.take(1, "what to describe or close")?[0];
            if target != b'S' && target != b'P' {
                return Err(format!("{} is neither 'S' nor 'P'", printable(target)));
            }
            r.cstring("name")?;
        }
        // Execute: portal, row limit.
        b'E' => {
            r.cstring("portal name")?;
            r.i32("row limit")?;
        }
        // Query, CopyFail: one string.
        b'Q' | b'f' => {
            r.cstring("text")?;
        }
        // Sync, Flush, Terminate, CopyDone: nothing.
        b'S' | b'H' | b'X' | b'c' => {}
        // CopyData, and the password family (its layout depends on the authentication
        // under way; pgwire reads it as raw bytes).
        b'd' | b'p' => return Ok(()),
        _ => return Err("no such message".into()),
    }
    if !r.0.is_empty() {
        return Err(format!("{} bytes after its end", r.0.len()));
    }
    Ok(())
}

/// Reads a message body front to back, with an error instead of a read past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("it ends inside {what}"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn cstring(&mut self, what: &str) -> Result<&'a [u8], String> {
        let Some(end) = self.0.iter().position(|&b| b == 0) else {
            return Err(format!("its {what} has no terminating NUL"));
        };
        let s = &self.0[..end];
        self.0 = &self.0[end + 1..];
        Ok(s)
    }

    fn i32(&mut self, what: &str) -> Result<i32, String> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count of what follows (an Int16 that may not be negative).
    fn count(&mut self, what: &str) -> Result<usize, String> {
        let b = self.take(2, what)?;
        let n = i16::from_be_bytes([b[0], b[1]]);
        usize::try_from(n).map_err(|_| format!("the number of {what} is {n}"))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Checked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.ready.is_empty() {
                let n = this.ready.len().min(out.remaining());
                out.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                return Poll::Ready(Ok(()));
            }
            if let Some(reason) = &this.broken {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    reason.clone(),
                )));
            }
            match this.next_message() {
                Ok(Some(n)) => {
                    let message = this.raw.split_to(n);
                    this.ready.unsplit(message);
                    continue;
                }
                Ok(None) => {}
                Err(reason) => {
                    this.broken = Some(reason);
                    continue;
                }
            }
            // More bytes are needed.
            let mut chunk = [0u8; 8192];
            let mut buf = ReadBuf::new(&mut chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                // The end: a message cut short by it is simply not handed on.
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.raw.extend_from_slice(buf.filled()),
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Checked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn checked(bytes: &[u8]) -> Result<Vec<usize>, String> {
        let mut c = Checked::new((), BytesMut::from(bytes));
        c.started = true;
        let mut lens = Vec::new();
        while let Some(n) = c.next_message()? {
            c.raw.advance(n);
            lens.push(n);
        }
        Ok(lens)
    }

    #[test]
    fn well_formed_messages_pass_whole_and_in_step() {
        let mut bytes = message(b'P', b"s1\0SELECT $1\0\x00\x01\x00\x00\x00\x14");
        bytes.extend(message(
            b'B',
            b"\0s1\0\x00\x01\x00\x00\x00\x02\x00\x00\x00\x0242\xff\xff\xff\xff\x00\x00",
        ));
        bytes.extend(message(b'E', b"\0\x00\x00\x00\x00"));
        bytes.extend(message(b'S', b""));
        assert_eq!(checked(&bytes).unwrap(), [24, 27, 10, 5]);
        // Half a message waits for the rest.
        assert_eq!(checked(&bytes[..30]).unwrap(), [24]);
    }

    #[test]
    fn malformed_messages_are_named_not_decoded() {
        for (bytes, why) in [
            (b"P\x00\x00\x00\x00".to_vec(), "invalid length 0"),
            (b"P\xff\xff\xff\xff".to_vec(), "invalid length -1"),
            (
                message(b'P', b"s1\0SELECT 1\0\x00\x05"),
                "ends inside a parameter type",
            ),
            (
                message(b'P', b"s1\0SELECT 1"),
                "query has no terminating NUL",
            ),
            (
                message(b'B', b"\0\0\x00\x00\x00\x01\xff\xff\xff\xfe"),
                "length is -2",
            ),
            (
                message(b'B', b"\0\0\x00\x00\x00\x01\x00\x00\x00\x09ab"),
                "inside a parameter's value",
            ),
            (message(b'B', b"\0\0\xff\xff"), "parameter formats is -1"),
            (message(b'D', b"Xname\0"), "'X' is neither"),
            (message(b'E', b"\0\x00\x00"), "ends inside row limit"),
            (message(b'S', b"x"), "1 bytes after its end"),
            (message(b'Q', b"SELECT 1\0\0"), "1 bytes after its end"),
            (message(b'F', b"\x00\x00\x00\x01"), "no such message"),
        ] {
            let err = checked(&bytes).unwrap_err();
            assert!(err.contains(why), "{bytes:?}: {err}");
        }
    }

    #[test]
    fn startup_packets_are_framed_by_their_length() {
        let mut startup = 196_608i32.to_be_bytes().to_vec();
        startup.extend_from_slice(b"user\0u\0\0");
        let mut packet = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
        packet.extend(startup);
        let mut c = Checked::new((), BytesMut::from(&packet[..]));
        assert_eq!(c.next_message(), Ok(Some(packet.len())));
        assert!(c.started);
        // An SSL request keeps the stream at its startup.
        let mut c = Checked::new((), BytesMut::from(&b"\x00\x00\x00\x08\x04\xd2\x16\x2f"[..]));
        assert_eq!(c.next_message(), Ok(Some(8)));
        assert!(!c.started);
        let mut c = Checked::new((), BytesMut::from(&b"\x00\x00\x00\x03abcd"[..]));
        assert!(c.next_message().unwrap_err().contains("startup packet"));
    }
}
