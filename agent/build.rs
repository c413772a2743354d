//! Finds the protobuf descriptors of Envoy's API that the envoy-types crate
//! ships (src/generated/types.bin, a FileDescriptorSet) so the agent can
//! decode EnvoyConfig resources by reflection. The crate is located through
//! `cargo metadata`, which also works for vendored sources. Each file's
//! `source_code_info` (the .proto files' comments and spans: 79 % of the
//! set's bytes) is left out: nothing reads it, and the agent's descriptor
//! pool kept it decoded (27 of its 28 MiB, heaptrack, debug).

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
    let set = std::fs::read(&src).unwrap_or_else(|e| panic!("reading {}: {e}", src.display()));
    let stripped =
        without_source_code_info(&set).unwrap_or_else(|| panic!("{} is not a FileDescriptorSet", src.display()));
    std::fs::write(&out, stripped).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed=build.rs");
}

/// A protobuf varint at `b[*i..]`, and `i` moved past it.
fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// One field of a message: its number, its whole encoding, and the payload
/// of a length-delimited field.
type Field<'a> = (u64, &'a [u8], &'a [u8]);

/// The fields of one message; None if it is not protobuf.
fn fields(b: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let start = i;
        let key = varint(b, &mut i)?;
        let payload = match key & 7 {
            0 => {
                varint(b, &mut i)?;
                &b[i..i]
            }
            1 => {
                i += 8;
                b.get(i - 8..i)?
            }
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                i += len;
                b.get(i - len..i)?
            }
            5 => {
                i += 4;
                b.get(i - 4..i)?
            }
            _ => return None,
        };
        out.push((key >> 3, b.get(start..i)?, payload));
    }
    Some(out)
}

/// The FileDescriptorSet `set` with each file's `source_code_info` (field
/// 9 of FileDescriptorProto) left out; every other byte as it was.
fn without_source_code_info(set: &[u8]) -> Option<Vec<u8>> {
    const FILE: u64 = 1;
    const SOURCE_CODE_INFO: u64 = 9;
    let mut out = Vec::with_capacity(set.len());
    for (number, whole, file) in fields(set)? {
        if number != FILE {
            out.extend_from_slice(whole);
            continue;
        }
        let mut kept = Vec::with_capacity(file.len());
        for (n, whole, _) in fields(file)? {
            if n != SOURCE_CODE_INFO {
                kept.extend_from_slice(whole);
            }
        }
        put_varint(&mut out, FILE << 3 | 2);
        put_varint(&mut out, kept.len() as u64);
        out.extend_from_slice(&kept);
    }
    Some(out)
}
