//! Finds the protobuf descriptors of Envoy's API that the envoy-types crate
//! ships (src/generated/types.bin, a FileDescriptorSet) so the agent can
//! decode EnvoyConfig resources by reflection. The crate is located through
//! `cargo metadata`, which also works for vendored sources.

use std::{env, path::PathBuf, process::Command};

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("envoy_descriptors.bin");
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let meta = Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(env::var("CARGO_MANIFEST_DIR").unwrap())
        .output()
        .expect("running cargo metadata");
    assert!(meta.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&meta.stderr));
    let v: serde_json::Value = serde_json::from_slice(&meta.stdout).expect("cargo metadata JSON");
    let manifest = v["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .expect("envoy-types in the dependency graph");
    let src = PathBuf::from(manifest).parent().unwrap().join("src/generated/types.bin");
    std::fs::copy(&src, &out).unwrap_or_else(|e| panic!("copying {}: {e}", src.display()));
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed=build.rs");
}
