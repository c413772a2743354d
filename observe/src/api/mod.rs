//! The flow API: Hubble's `observer.Observer` served over gRPC ([`server`]),
//! stored flows turned into `flow.Flow` only for a reader that asks
//! ([`convert`]), and Hubble's flow filters evaluated on stored flows without
//! building the wire format ([`filter`]) and CEL filters over the flow as
//! the API sends it ([`cel`]); flows written as protobuf straight from the
//! stored records ([`wire`]), once for every stream that sends them
//! ([`encoded`]); its TLS, renewed while it runs ([`tls`]);
//! Hubble's Peer service, the nodes Relay reads flows from ([`peer`]).

pub mod authority;
pub mod cel;
pub mod convert;
pub mod encoded;
pub mod filter;
pub mod peer;
pub mod server;
pub mod tls;
pub mod wire;
