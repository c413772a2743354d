//! What the agent's integration tests share.
// Each test binary uses some of these.
#![allow(dead_code)]

use std::path::PathBuf;

/// Cilium's public examples (shared/conformance/cilium-examples): from
/// $WEFT_CONFORMANCE, or the `shared` directory beside the repository.
pub fn examples() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_CONFORMANCE") {
        return p.into();
    }
    [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/cilium-examples"),
        PathBuf::from("/work/shared/conformance/cilium-examples"),
    ]
    .into_iter()
    .find(|p| p.is_dir())
    .expect("Cilium's examples (shared/conformance/cilium-examples) not found: set WEFT_CONFORMANCE")
}

/// The Gateway API's CRDs and conformance objects (shared/conformance/gateway-api):
/// from $WEFT_GATEWAY_API, or the `shared` directory beside the repository;
/// `None` when absent (the tests that need them skip).
pub fn gateway_api() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_GATEWAY_API") {
        return Some(p.into());
    }
    [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/conformance/gateway-api"),
        PathBuf::from("/work/shared/conformance/gateway-api"),
    ]
    .into_iter()
    .find(|p| p.is_dir())
}
