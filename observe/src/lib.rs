//! weft's flow pipeline: from the datapath's ring buffer and Envoy's access
//! log to flows that users read, and the clients that read them.

pub mod als;
pub mod cli;
pub mod client;
pub mod convert;
pub mod enrich;
pub mod filter;
pub mod join;
pub mod metrics;
pub mod names;
pub mod otlp;
pub mod pipeline;
pub mod print;
pub mod proto;
pub mod record;
pub mod ringbuf;
pub mod server;
pub mod store;
pub mod timefmt;
