//! weft's CNI plugin, chained after a primary plugin that gives the pod a
//! veth (ptp, bridge, Calico...): the primary plugin owns addresses and
//! routes; weft-cni only tells the node's agent which host-side device is
//! which pod's, so that the agent attaches its datapath to it before the pod
//! starts (ADD), and detaches it when the pod goes (DEL).
//!
//! The library holds what the plugin and the agent share: the request and
//! answer types of the agent's unix socket ([`proto`]), and the CNI
//! specification's types and error codes ([`spec`]), and how the plugin
//! puts itself on a node ([`install`], the DaemonSet's init container). The
//! binary (`src/main.rs`) speaks CNI to the container runtime.

pub mod install;
pub mod link;
pub mod proto;
pub mod spec;
