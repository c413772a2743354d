//! weft's flow pipeline, as the agent links it: from the datapath's ring
//! buffer and Envoy's access log to flows that readers and exporters take.
//!
//! - [`pipeline`]: reading, enriching, joining and storing flows (threads and
//!   queues; every loss counted by source).
//! - [`api`]: the Hubble-compatible flow API server (`observer.Observer`) and
//!   what it needs: the conversion of stored flows to the wire format and
//!   Hubble's flow filters.
//! - [`export`]: the flows' Prometheus metrics and the OTLP exporter.
//!
//! The flow API's types, names, printing and client are in `weft-flow`
//! (`observe/flow`), shared with the `weft` CLI (`observe/cli`), which does
//! not link this crate.

pub mod api;
pub mod export;
pub mod pipeline;
