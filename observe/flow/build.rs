//! Compiles weft's own protobuf definitions of the Hubble flow API
//! (proto/) with protox, a protobuf compiler in Rust, and generates
//! the tonic server and client. The descriptor set is kept too: gRPC
//! reflection serves it, JSON output and the wire-contract test read it.

use std::{env, path::PathBuf};

use prost::Message;

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["observer/observer.proto", "peer/peer.proto", "weft/link.proto"], ["proto"])
        .expect("compiling observe/flow/proto");
    std::fs::write(out.join("hubble_descriptor.bin"), fds.encode_to_vec()).unwrap();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)
        .expect("generating gRPC code");
}
