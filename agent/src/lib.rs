//! The weft node agent: desired state, the eBPF datapath manager, the xDS
//! control plane and Envoy supervision.

pub mod datapath;
pub mod identity;
pub mod netns;
