//! The flow API: Hubble's `observer.Observer` served over gRPC ([`server`]),
//! stored flows turned into `flow.Flow` only for a reader that asks
//! ([`convert`]), and Hubble's flow filters evaluated on stored flows without
//! building the wire format ([`filter`]); its TLS, renewed while it runs
//! ([`tls`]).

pub mod convert;
pub mod filter;
pub mod server;
pub mod tls;
