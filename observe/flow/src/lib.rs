//! The flow API as both of its ends see it: the server in the agent's
//! pipeline (weft-observe) and the `weft` CLI (weft-cli). What both need lives
//! here, so the CLI links none of the pipeline (its threads, the ring-buffer
//! reader, the eBPF objects) and the pipeline none of the CLI.
//!
//! - [`proto`]: weft's protobuf types of Hubble's Observer API and their gRPC
//!   stubs, generated from `proto/`, and the compiled descriptors.
//! - [`names`]: Hubble's names for the datapath's numbers (observation
//!   points, drop reasons, identities...), both ways.
//! - [`print`] and [`json`]: flows as text (compact, table) and as JSON with
//!   Hubble's field names, and FlowFilters read from that JSON.
//! - [`time`]: times as flows print them and as users give them.
//! - [`client`]: connecting to a flow API (TCP, TLS, unix socket).
//! - [`socket`]: the unix sockets the agent serves on, closed to all but
//!   root (or one group).

pub mod client;
pub mod json;
pub mod names;
pub mod print;
pub mod proto;
pub mod socket;
pub mod time;
