//! Any `:authority` on the unix socket.
//!
//! Older gRPC clients on a unix socket send their whole dial target as the HTTP/2
//! `:authority`: Hubble Relay of Cilium 1.9 (grpc-go 1.29) sends `unix:///var/run/weft/flows.sock`.
//! The h2 crate under tonic answers a request whose authority does not parse with RST_STREAM
//! PROTOCOL_ERROR before any service sees it, and no option turns that check off. On a unix
//! socket the authority names nothing, so each connection there reads its client through
//! [`AnyAuthority`]:
//! - every request header block (HEADERS and its CONTINUATIONs) is decoded with an HPACK
//!   decoder that mirrors the client's dynamic table (clients index the authority and send it
//!   Huffman-coded, so rewriting bytes in place cannot work);
//! - an authority that does not parse becomes `localhost`;
//! - the block is encoded again for the server with literals only, never indexed, so the
//!   server's dynamic table stays empty and never has to follow the client's;
//! - every other frame, and everything the server writes, passes unchanged.
//!
//! A connection that does not start with the HTTP/2 preface passes unchanged too (the server
//! refuses it as before). Broken header blocks end the connection, as h2 would.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
const PRIORITY_BYTES: usize = 5;
/// The dynamic table the client's encoder may use: HTTP/2's default, since the flow API's
/// server announces no SETTINGS_HEADER_TABLE_SIZE.
const TABLE_SIZE: usize = 4096;
/// The largest header block accepted, encoded (all its frames) and decoded (HPACK's size: name,
/// value and 32 per field). A gRPC request's headers are a few hundred bytes; the decoded bound
/// matters because one byte of a block can name a 4 KiB table entry.
pub const MAX_BLOCK_BYTES: usize = 64 * 1024;
/// Frames toward the server are at most this long: the least SETTINGS_MAX_FRAME_SIZE there is.
const MAX_FRAME: usize = 16_384;
/// Processing pauses while this much is waiting for the server.
const OUTPUT_HIGH: usize = 256 * 1024;
const READ_CHUNK: usize = 8 * 1024;
/// What replaces an authority that does not parse.
pub const REPLACEMENT: &[u8] = b"localhost";

/// Why a client's connection ended.
#[derive(Debug, thiserror::Error)]
pub enum HeaderBlockError {
    #[error("a header block of stream {stream} was interrupted by a frame of type {kind} on stream {on}")]
    Interrupted { stream: u32, kind: u8, on: u32 },
    #[error("a CONTINUATION frame on stream {stream} follows no HEADERS")]
    StrayContinuation { stream: u32 },
    #[error("a header block of stream {stream} is larger than {MAX_BLOCK_BYTES} bytes")]
    TooLarge { stream: u32 },
    #[error("the HEADERS frame of stream {stream} is shorter than its padding or priority")]
    Short { stream: u32 },
    #[error("the header block of stream {stream} does not decode: {problem}")]
    Hpack { stream: u32, problem: String },
}

/// A client connection whose request header blocks carry an authority the server accepts.
pub struct AnyAuthority<S> {
    inner: S,
    /// Read from the client, not processed yet.
    input: Vec<u8>,
    /// Processed, not handed to the server yet (from `sent` on).
    output: Vec<u8>,
    sent: usize,
    phase: Phase,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    eof: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    Preface,
    /// At a frame header.
    Frames,
    /// Inside a frame that passes unchanged: this many bytes of it are still to come.
    Payload(usize),
    /// Not HTTP/2: everything passes.
    Raw,
}

/// A decoded header field: name and value.
type Field = (Vec<u8>, Vec<u8>);

/// A header block whose END_HEADERS has not come yet.
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; PRIORITY_BYTES]>,
    fragment: Vec<u8>,
}

impl<S> AnyAuthority<S> {
    pub fn new(inner: S) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        AnyAuthority {
            inner,
            input: Vec::new(),
            output: Vec::new(),
            sent: 0,
            phase: Phase::Preface,
            block: None,
            decoder,
            eof: false,
        }
    }

    /// Moves what `input` holds to `output`, rewriting header blocks, until it needs more
    /// input or enough waits for the server.
    fn process(&mut self) -> Result<(), HeaderBlockError> {
        while self.output.len() < OUTPUT_HIGH {
            match self.phase {
                Phase::Preface => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.phase = Phase::Raw;
                        continue;
                    }
                    if n < PREFACE.len() {
                        return Ok(());
                    }
                    self.output.extend(self.input.drain(..n));
                    self.phase = Phase::Frames;
                }
                Phase::Raw => {
                    self.output.append(&mut self.input);
                    return Ok(());
                }
                Phase::Payload(rest) => {
                    let n = rest.min(self.input.len());
                    self.output.extend(self.input.drain(..n));
                    if n < rest {
                        self.phase = Phase::Payload(rest - n);
                        return Ok(());
                    }
                    self.phase = Phase::Frames;
                }
                Phase::Frames => {
                    let Some(header) = self.input.get(..FRAME_HEADER) else { return Ok(()) };
                    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
                    let (kind, flags) = (header[3], header[4]);
                    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
                    if let Some(b) = &self.block
                        && (kind != CONTINUATION || stream != b.stream)
                    {
                        return Err(HeaderBlockError::Interrupted { stream: b.stream, kind, on: stream });
                    }
                    if kind != HEADERS && kind != CONTINUATION {
                        self.output.extend(self.input.drain(..FRAME_HEADER));
                        self.phase = Phase::Payload(len);
                        continue;
                    }
                    if len > MAX_BLOCK_BYTES {
                        return Err(HeaderBlockError::TooLarge { stream });
                    }
                    let Some(frame) = self.input.get(FRAME_HEADER..FRAME_HEADER + len) else { return Ok(()) };
                    let frame = frame.to_vec();
                    self.input.drain(..FRAME_HEADER + len);
                    self.header_frame(kind, flags, stream, &frame)?;
                }
            }
        }
        Ok(())
    }

    /// One HEADERS or CONTINUATION frame's payload.
    fn header_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Result<(), HeaderBlockError> {
        if kind == HEADERS {
            let mut p = payload;
            if flags & PADDED != 0 {
                let (&pad, rest) = p.split_first().ok_or(HeaderBlockError::Short { stream })?;
                let keep = rest.len().checked_sub(usize::from(pad)).ok_or(HeaderBlockError::Short { stream })?;
                p = &rest[..keep];
            }
            let mut priority = None;
            if flags & PRIORITY != 0 {
                let (fields, rest) =
                    p.split_first_chunk::<PRIORITY_BYTES>().ok_or(HeaderBlockError::Short { stream })?;
                priority = Some(*fields);
                p = rest;
            }
            self.block = Some(Block { stream, end_stream: flags & END_STREAM != 0, priority, fragment: p.to_vec() });
        } else {
            let block = self.block.as_mut().ok_or(HeaderBlockError::StrayContinuation { stream })?;
            block.fragment.extend_from_slice(payload);
            if block.fragment.len() > MAX_BLOCK_BYTES {
                return Err(HeaderBlockError::TooLarge { stream });
            }
        }
        if flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            let fields = self.decode(&block)?;
            write_block(&mut self.output, &block, &encode(&fields));
        }
        Ok(())
    }

    fn decode(&mut self, block: &Block) -> Result<Vec<Field>, HeaderBlockError> {
        let stream = block.stream;
        let mut fields = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                size = size.saturating_add(name.len()).saturating_add(value.len()).saturating_add(32);
                if size <= MAX_BLOCK_BYTES {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })
            .map_err(|e| HeaderBlockError::Hpack { stream, problem: e.to_string() })?;
        if size > MAX_BLOCK_BYTES {
            return Err(HeaderBlockError::TooLarge { stream });
        }
        Ok(fields)
    }
}

/// The block's fields as HPACK literals without indexing, with an authority the server takes.
fn encode(fields: &[Field]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        let value = match name.as_slice() {
            b":authority" if tonic::codegen::http::uri::Authority::try_from(value.as_slice()).is_err() => REPLACEMENT,
            _ => value.as_slice(),
        };
        out.push(0); // literal header field without indexing, new name
        for s in [name.as_slice(), value] {
            out.extend(loona_hpack::encoder::encode_integer(s.len(), 7)); // not Huffman-coded
            out.extend_from_slice(s);
        }
    }
    out
}

/// A HEADERS frame (with the block's END_STREAM and priority) and as many CONTINUATIONs as the
/// encoded block needs.
fn write_block(out: &mut Vec<u8>, block: &Block, encoded: &[u8]) {
    let mut rest = encoded;
    let mut first = true;
    loop {
        let priority: &[u8] = match (first, &block.priority) {
            (true, Some(p)) => p,
            _ => &[],
        };
        let (chunk, more) = rest.split_at(rest.len().min(MAX_FRAME - priority.len()));
        let mut flags = if more.is_empty() { END_HEADERS } else { 0 };
        if first {
            flags |= if block.end_stream { END_STREAM } else { 0 };
            flags |= if priority.is_empty() { 0 } else { PRIORITY };
        }
        let len = (chunk.len() + priority.len()) as u32; // at most MAX_FRAME
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(if first { HEADERS } else { CONTINUATION });
        out.push(flags);
        out.extend_from_slice(&block.stream.to_be_bytes());
        out.extend_from_slice(priority);
        out.extend_from_slice(chunk);
        rest = more;
        first = false;
        if rest.is_empty() {
            return;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AnyAuthority<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.sent < this.output.len() {
                let n = buf.remaining().min(this.output.len() - this.sent);
                buf.put_slice(&this.output[this.sent..this.sent + n]);
                this.sent += n;
                if this.sent == this.output.len() {
                    this.output.clear();
                    this.sent = 0;
                }
                return Poll::Ready(Ok(()));
            }
            this.process().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            if !this.output.is_empty() {
                continue;
            }
            if this.eof {
                // What is left is an unfinished frame: the server sees it as the client sent it.
                if this.input.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.output.append(&mut this.input);
                continue;
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut read = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            if read.filled().is_empty() {
                this.eof = true;
            }
            this.input.extend_from_slice(read.filled());
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AnyAuthority<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: Connected> Connected for AnyAuthority<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The first request Hubble Relay 1.9 sends on `unix:///tmp/hubble-tap/tap.sock`, as captured
    /// (its authority is Huffman-coded and indexed), then its DATA frame.
    const RELAY_HEADERS: &str = "8386458d62b296c5f594b631a4e934bebf4197b6a379b8c30c269ad89ed8e3a0ab2475b091d6ba0e4ebf5f8b1d75d0620d263d4c4d65647a8a9acac8b4c7602b89f5c340027465864d833505b11f";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// Feeds `sent` through an AnyAuthority in reads of `step` bytes; returns what the server reads.
    async fn through(sent: &[u8], step: usize) -> io::Result<Vec<u8>> {
        let (mut client, server) = tokio::io::duplex(step);
        let sent = sent.to_vec();
        let writer = tokio::spawn(async move {
            for c in sent.chunks(step) {
                if client.write_all(c).await.is_err() {
                    return;
                }
            }
        });
        let mut out = Vec::new();
        let r = AnyAuthority::new(server).read_to_end(&mut out).await;
        writer.await.unwrap();
        r.map(|_| out)
    }

    /// Splits the server's bytes into frames after the preface and decodes each header block
    /// with a fresh decoder per block (the rewritten blocks must need no table).
    fn frames(out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(out.starts_with(PREFACE));
        let mut rest = &out[PREFACE.len()..];
        let mut v = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            v.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        v
    }

    fn fields(block: &[u8]) -> Vec<(String, String)> {
        let mut d = loona_hpack::Decoder::new();
        d.set_max_allowed_table_size(0);
        d.set_max_table_size(0);
        d.decode(block)
            .unwrap()
            .into_iter()
            .map(|(n, v)| (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap()))
            .collect()
    }

    fn authority(fields: &[(String, String)]) -> &str {
        &fields.iter().find(|(n, _)| n == ":authority").unwrap().1
    }

    #[tokio::test]
    async fn the_relays_unix_authority_becomes_localhost_in_a_block_without_table_references() {
        let settings = frame(4, 0, 0, &[]);
        let headers = frame(HEADERS, END_HEADERS, 1, &hex(RELAY_HEADERS));
        let data = frame(0, END_STREAM, 1, &[0; 5]);
        // The second request on the connection names the first one's fields from the table.
        let mut again = hex("8386");
        again.extend([0xbe, 0xbf, 0xc0, 0xc1, 0xc2]);
        let headers3 = frame(HEADERS, END_HEADERS, 3, &again);
        let sent = [PREFACE, &settings, &headers, &data, &headers3].concat();
        for step in [1, 7, 4096] {
            let got = frames(&through(&sent, step).await.unwrap());
            assert_eq!(got.len(), 4, "step {step}");
            assert_eq!((got[0].0, got[0].3.as_slice()), (4, &[][..]));
            assert_eq!((got[2].0, got[2].1, got[2].2, got[2].3.as_slice()), (0, END_STREAM, 1, &[0; 5][..]));
            let first = fields(&got[1].3);
            assert_eq!((got[1].0, got[1].1, got[1].2), (HEADERS, END_HEADERS, 1));
            assert_eq!(authority(&first), "localhost");
            assert!(first.contains(&(":path".into(), "/peer.Peer/Notify".into())), "{first:?}");
            assert!(first.contains(&("content-type".into(), "application/grpc".into())), "{first:?}");
            let second = fields(&got[3].3);
            assert_eq!(authority(&second), "localhost");
            assert!(second.contains(&(":path".into(), "/peer.Peer/Notify".into())), "{second:?}");
        }
    }

    #[tokio::test]
    async fn a_valid_authority_padding_priority_and_continuations_survive() {
        let mut enc = loona_hpack::Encoder::new();
        let long = "x".repeat(20_000);
        let block = enc.encode(
            [
                (":method", "POST"),
                (":authority", "node1.default.hubble-grpc.weft.io:4244"),
                (":path", "/observer.Observer/GetFlows"),
                ("x-long", long.as_str()),
            ]
            .map(|(n, v)| (n.as_bytes(), v.as_bytes())),
        );
        let (a, b) = block.split_at(10);
        let mut headers = vec![3u8]; // pad length
        headers.extend([0x80, 0, 0, 1, 15]); // priority: exclusive on stream 1, weight 15
        headers.extend(a);
        headers.extend([0; 3]);
        let sent = [
            PREFACE,
            &frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &headers),
            &frame(CONTINUATION, END_HEADERS, 5, b),
        ]
        .concat();
        let got = frames(&through(&sent, 1000).await.unwrap());
        assert_eq!(got.len(), 2, "20 KB of fields need a CONTINUATION toward the server");
        assert_eq!((got[0].0, got[0].1, got[0].2), (HEADERS, END_STREAM | PRIORITY, 5));
        assert_eq!(&got[0].3[..5], &[0x80, 0, 0, 1, 15]);
        assert_eq!((got[1].0, got[1].1, got[1].2), (CONTINUATION, END_HEADERS, 5));
        let all = fields(&[&got[0].3[5..], &got[1].3[..]].concat());
        assert_eq!(authority(&all), "node1.default.hubble-grpc.weft.io:4244");
        assert!(all.contains(&("x-long".into(), long)));
    }

    #[tokio::test]
    async fn hostile_blocks_end_the_connection() {
        let huge = frame(HEADERS, END_HEADERS, 1, &vec![0; MAX_BLOCK_BYTES + 1]);
        // One 4 KiB table entry named again and again decodes far past the bound.
        let mut bomb = vec![0x40, 0x01, b'a', 0x7f, 0xa1, 0x1e];
        bomb.extend(vec![b'v'; 4000]);
        bomb.extend(vec![0xbe; 40]);
        let bomb = frame(HEADERS, END_HEADERS, 1, &bomb);
        let interrupted = [frame(HEADERS, 0, 1, &[0x83]), frame(0, 0, 1, &[])].concat();
        let stray = frame(CONTINUATION, END_HEADERS, 1, &[0x83]);
        let bad = frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0x0f]);
        let short = frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0x83]);
        for (what, f) in [
            ("huge", huge),
            ("bomb", bomb),
            ("interrupted", interrupted),
            ("stray", stray),
            ("bad", bad),
            ("short", short),
        ] {
            let e = through(&[PREFACE, &f].concat(), 4096).await.expect_err(what);
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
        }
    }

    #[tokio::test]
    async fn what_is_not_http2_passes_unchanged() {
        let sent = b"GET / HTTP/1.1\r\nHost: unix:///x\r\n\r\n".to_vec();
        assert_eq!(through(&sent, 5).await.unwrap(), sent);
    }
}
