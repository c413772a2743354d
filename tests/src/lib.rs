//! weft's lab: network namespaces standing in for nodes and pods, traffic
//! helpers, and the glue the integration tests and the demo share.

pub mod bins;
pub mod cni;
pub mod dashboards;
pub mod demo;
pub mod envoylab;
pub mod flows;
pub mod follower;
pub mod fuzz;
pub mod h2;
pub mod hostile;
pub mod http;
pub mod k8s;
pub mod lab;
pub mod load;
pub mod node;
pub mod objects;
pub mod packet;
pub mod pki;
pub mod proxy;
pub mod scenario;
