//! What weft-cni and the agent say to each other over the agent's unix
//! socket: one JSON request per connection, one JSON line back. The plugin
//! finds the device; the agent decides what to do with it.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The largest request or answer either side reads (a GC request lists
/// every attachment of the node).
pub const MAX_MESSAGE: u64 = 4 << 20;

/// The pod an attachment is for (from the runtime's `CNI_ARGS`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

/// One pod interface as the primary plugin made it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The CNI network's name (`name` of the conflist).
    pub network: String,
    pub container_id: String,
    /// The interface inside the pod (`CNI_IFNAME`).
    pub ifname: String,
    pub pod: PodRef,
    /// The pod's IPv4 address on that interface.
    pub ip: Ipv4Addr,
    /// The veth's host side, in the node's network namespace.
    pub host_ifname: String,
    pub host_ifindex: u32,
}

/// What the plugin asks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Request {
    /// Register the attachment and attach the datapath to its device;
    /// answered once the datapath is attached (or it failed).
    Add(Attachment),
    /// Forget the attachment (if known) and detach its device; answered once
    /// detached.
    Del { network: String, container_id: String, ifname: String },
    /// Whether the attachment is registered and its device attached as it should be.
    Check(Attachment),
    /// Whether the agent is ready to wire pods.
    Status,
    /// Forget every attachment of `network` not in `valid` ((container id, ifname)).
    Gc { network: String, valid: Vec<(String, String)> },
}

/// What the agent answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Answer {
    /// None: done.
    pub error: Option<String>,
    /// The error may go away if the runtime tries again later (the agent is
    /// still starting, the pod is not known to it yet...).
    #[serde(default)]
    pub retry: bool,
}

impl Answer {
    pub fn ok() -> Self {
        Self { error: None, retry: false }
    }

    pub fn failed(error: impl Into<String>, retry: bool) -> Self {
        Self { error: Some(error.into()), retry }
    }
}

/// Reads one JSON message of at most [`MAX_MESSAGE`] bytes, up to a newline
/// or the end of the stream.
pub fn read_message<T: serde::de::DeserializeOwned>(r: impl Read) -> io::Result<T> {
    let mut line = Vec::new();
    BufReader::new(r.take(MAX_MESSAGE)).read_until(b'\n', &mut line)?;
    serde_json::from_slice(&line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Writes one message and a newline.
pub fn write_message<T: Serialize>(mut w: impl Write, msg: &T) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(msg).map_err(io::Error::other)?;
    bytes.push(b'\n');
    w.write_all(&bytes)?;
    w.flush()
}

/// Sends a request to the agent's socket and waits up to `timeout` for the answer.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> io::Result<Answer> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write_message(&stream, req)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    read_message(&stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_one_line_of_json() {
        let req = Request::Del { network: "k8s".into(), container_id: "abc".into(), ifname: "eth0".into() };
        let mut buf = Vec::new();
        write_message(&mut buf, &req).unwrap();
        assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(read_message::<Request>(&buf[..]).unwrap(), req);
    }

    #[test]
    fn an_oversized_message_is_refused_not_read_whole() {
        let big = vec![b' '; (MAX_MESSAGE + 10) as usize];
        assert!(read_message::<Request>(&big[..]).is_err());
    }
}
