//! Kubernetes for the tests: a real control plane started once per test
//! binary ([`control_plane`]), and an in-process API server kept only for the
//! faults a real one cannot be made to produce on demand ([`fake`]).

pub mod control_plane;
pub mod deploy;
pub mod fake;
pub mod relay;

pub use control_plane::{AuditEvent, Component, ControlPlane, Exclusive, Shared, TestNamespace};
pub use relay::{ApiRelay, NODE_API_PORT};
