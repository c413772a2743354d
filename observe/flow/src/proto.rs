//! The flow API's protobuf types and gRPC stubs, generated from `proto/` by
//! build.rs.

#![allow(clippy::all, missing_docs)]

pub mod flow {
    include!(concat!(env!("OUT_DIR"), "/flow.rs"));
}
pub mod relay {
    include!(concat!(env!("OUT_DIR"), "/relay.rs"));
}
pub mod observer {
    include!(concat!(env!("OUT_DIR"), "/observer.rs"));
}
pub mod peer {
    include!(concat!(env!("OUT_DIR"), "/peer.rs"));
}
pub mod weft {
    include!(concat!(env!("OUT_DIR"), "/weft.rs"));
}

/// The compiled descriptors of every message of the API.
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/hubble_descriptor.bin"));

/// The service name `hubble status` (and `weft status`) health-checks.
pub const HEALTH_SERVICE: &str = "hubble.server.Observer";
