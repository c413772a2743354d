//! Kubernetes for the tests: a real control plane started once per test
//! binary ([`control_plane`]), deploy/ applied to it ([`deploy`]), the lab
//! as a cluster on it ([`lab`]: Nodes, Pods, agents and operators with their
//! ServiceAccounts), and an in-process API server kept only for the faults a
//! real one cannot be made to produce on demand ([`fake`]).

pub mod control_plane;
pub mod deploy;
pub mod fake;
pub mod lab;
pub mod relay;

pub use control_plane::{AuditEvent, Component, ControlPlane, Exclusive, Shared, TestNamespace};
pub use relay::{ApiRelay, NODE_API_PORT};
