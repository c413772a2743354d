//! What the agent's integration tests share.

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
