//! weft's flow pipeline: from the datapath's ring buffer to flows that users
//! read, and the clients that read them.

pub mod names;
pub mod proto;
pub mod ringbuf;
