//! The xDS control plane: EnvoyConfig objects translated into validated Envoy
//! resources, served to the node's Envoy over ADS.

pub mod acks;
pub mod envoyconfig;
pub mod groups;
pub mod model;
pub mod policy;
pub mod ports;
pub mod protojson;
pub mod rules;
pub mod server;
pub mod tenancy;
pub mod translate;
pub mod visibility;
