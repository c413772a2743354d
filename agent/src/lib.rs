//! The weft node agent: desired state, the eBPF datapath manager, the xDS
//! control plane and Envoy supervision. [`run`] puts them together as the
//! named components of the agent process.

pub mod config;
pub mod controller;
pub mod datapath;
pub mod envoy;
pub mod hash;
pub mod identity;
pub mod k8s;
pub mod lean;
pub mod limits;
pub mod netns;
pub mod operator;
pub mod par;
pub mod pidfd;
#[cfg(test)]
mod profile_memory;
pub mod reconcile;
pub mod requirements;
pub mod run;
pub mod state;
#[cfg(test)]
mod test_alloc;
pub mod validate;
pub mod xds;
