//! Flows sent as bytes encoded once: what makes a flow cheap to send.
//!
//! A `GetFlowsResponse` carrying a flow depends only on the flow, the
//! agent's names and whether the reader is one of weft's own clients (the
//! connection link). So the first stream to send a flow writes it
//! (`wire`), into one buffer with the other flows of its chunk
//! ([`SharedEncodings`]); every other stream sending the same flow copies a
//! pointer. The gRPC encoder then only copies those bytes into its frame
//! ([`FlowCodec`]), and a stream hands the server whole chunks of responses
//! ([`Batches`]), which tonic encodes into one HTTP/2 data frame while they
//! last, instead of one wake-up and one frame per flow.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use prost::{Message, bytes::Bytes};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::{
    Status,
    codec::{Codec, EncodeBuf, Encoder},
};
use weft_flow::proto::observer::{GetFlowsRequest, GetFlowsResponse};

use crate::pipeline::enrich::Names;

/// One `GetFlowsResponse`, already encoded (a flow's share the buffer of
/// the chunk it was written with).
#[derive(Clone, Debug)]
pub struct Encoded(Bytes);

impl Encoded {
    /// Encodes a response (for what only one stream sends: loss notices).
    pub fn of(r: &GetFlowsResponse) -> Encoded {
        Encoded(r.encode_to_vec().into())
    }

    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// About what one flow's response takes (datapath flows with named pods:
/// 400-600 bytes), to size a chunk's buffer.
const BYTES_PER_FLOW: usize = 512;

/// How many recent flows keep their encodings: followers this close to each
/// other in the store share them (a follower further behind encodes its own).
const SLOTS: usize = 1024;

/// One store position's encodings, per kind of reader.
#[derive(Default)]
struct Slot {
    seq: u64,
    /// The names the encodings were made with.
    names: Option<Arc<Names>>,
    /// Without and with weft's connection link.
    encoded: [Option<Encoded>; 2],
}

/// See the module doc. Shared by every stream of one flow API.
pub struct SharedEncodings {
    slots: Mutex<Vec<Slot>>,
}

impl Default for SharedEncodings {
    fn default() -> Self {
        SharedEncodings { slots: Mutex::new((0..SLOTS).map(|_| Slot::default()).collect()) }
    }
}

impl SharedEncodings {
    /// The encoded responses of the flows at `seqs` (store positions, in
    /// order), for readers with (`with_link`) or without the link, made with
    /// `names`: those another stream encoded already are copied, the others
    /// are written by `encode(index into seqs, buffer)` (outside the lock),
    /// all into one buffer, and kept.
    pub fn get_or_encode(
        &self,
        names: &Arc<Names>,
        with_link: bool,
        seqs: &[u64],
        mut encode: impl FnMut(usize, &mut Vec<u8>),
    ) -> Vec<Encoded> {
        let kind = with_link as usize;
        let mut found: Vec<Option<Encoded>> = {
            let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            seqs.iter()
                .map(|&seq| {
                    let s = &slots[slot_of(seq)];
                    let same = s.seq == seq && s.names.as_ref().is_some_and(|n| Arc::ptr_eq(n, names));
                    if same { s.encoded[kind].clone() } else { None }
                })
                .collect()
        };
        let missing = found.iter().filter(|f| f.is_none()).count();
        let mut made = Vec::with_capacity(missing);
        if missing > 0 {
            let mut buf = Vec::with_capacity(missing * BYTES_PER_FLOW);
            let mut ends = Vec::with_capacity(missing);
            for (i, f) in found.iter().enumerate() {
                if f.is_none() {
                    encode(i, &mut buf);
                    ends.push((i, buf.len()));
                }
            }
            let buf = Bytes::from(buf);
            let mut start = 0;
            for (i, end) in ends {
                let e = Encoded(buf.slice(start..end));
                start = end;
                made.push((seqs[i], e.clone()));
                found[i] = Some(e);
            }
        }
        if !made.is_empty() {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            for (seq, e) in made {
                let s = &mut slots[slot_of(seq)];
                if s.seq != seq || !s.names.as_ref().is_some_and(|n| Arc::ptr_eq(n, names)) {
                    *s = Slot { seq, names: Some(names.clone()), encoded: [None, None] };
                }
                s.encoded[kind] = Some(e);
            }
        }
        found.into_iter().flatten().collect()
    }
}

fn slot_of(seq: u64) -> usize {
    (seq % SLOTS as u64) as usize
}

/// The GetFlows codec: requests decoded as protobuf, responses sent as the
/// bytes they were encoded to.
#[derive(Clone, Copy, Debug, Default)]
pub struct FlowCodec;

/// Writes [`Encoded`] responses into gRPC frames.
#[derive(Clone, Copy, Debug, Default)]
pub struct EncodedEncoder;

impl Encoder for EncodedEncoder {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use prost::bytes::BufMut;
        dst.put_slice(item.bytes());
        Ok(())
    }
}

impl Codec for FlowCodec {
    type Encode = Encoded;
    type Decode = GetFlowsRequest;
    type Encoder = EncodedEncoder;
    type Decoder = tonic_prost::ProstDecoder<GetFlowsRequest>;

    fn encoder(&mut self) -> EncodedEncoder {
        EncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::default()
    }
}

/// A stream's responses, handed over a chunk at a time and yielded one by
/// one (all ready at once, so the server frames them together).
pub struct Batches {
    rx: mpsc::Receiver<Vec<Result<Encoded, Status>>>,
    current: std::vec::IntoIter<Result<Encoded, Status>>,
}

impl Batches {
    pub fn new(rx: mpsc::Receiver<Vec<Result<Encoded, Status>>>) -> Self {
        Batches { rx, current: Vec::new().into_iter() }
    }
}

impl Stream for Batches {
    type Item = Result<Encoded, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(r) = self.current.next() {
                return Poll::Ready(Some(r));
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(batch)) => self.current = batch.into_iter(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
