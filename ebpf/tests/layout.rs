//! The Rust mirrors in `src/abi.rs` against the C structs, as clang laid them
//! out: read from the BTF in the compiled objects, so a field added, moved or
//! resized on one side only fails here.

use std::collections::HashMap;

use weft_ebpf::{OBJECTS, abi::shared_layouts};

/// Finds a section of a little-endian ELF64 object by name.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    let u16_at = |o: usize| u16::from_le_bytes(elf[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap()) as usize;
    assert_eq!(&elf[..4], b"\x7fELF");
    let (shoff, shentsize, shnum, shstrndx) = (u64_at(0x28), u16_at(0x3a), u16_at(0x3c), u16_at(0x3e));
    let header = |i: usize| shoff + i * shentsize;
    let names = u64_at(header(shstrndx) + 24);
    (0..shnum).find_map(|i| {
        let h = header(i);
        let name_start = names + u32_at(h);
        let name_end = name_start + elf[name_start..].iter().position(|&b| b == 0)?;
        (&elf[name_start..name_end] == wanted.as_bytes()).then(|| {
            let (off, size) = (u64_at(h + 24), u64_at(h + 32));
            &elf[off..off + size]
        })
    })
}

/// Struct name -> (size, [(member, byte offset)]) from a .BTF section.
fn btf_structs(btf: &[u8]) -> HashMap<String, (usize, Vec<(String, usize)>)> {
    let u32_at = |o: usize| u32::from_le_bytes(btf[o..o + 4].try_into().unwrap());
    assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xeb9f, "BTF magic");
    let hdr_len = u32_at(4) as usize;
    let (type_off, type_len) = (u32_at(8) as usize, u32_at(12) as usize);
    let str_off = u32_at(16) as usize;
    let strings = hdr_len + str_off;
    let name = |off: u32| {
        let start = strings + off as usize;
        let end = start + btf[start..].iter().position(|&b| b == 0).unwrap();
        String::from_utf8_lossy(&btf[start..end]).into_owned()
    };

    let mut out = HashMap::new();
    let mut pos = hdr_len + type_off;
    let end = pos + type_len;
    while pos < end {
        let (name_off, info, size) = (u32_at(pos), u32_at(pos + 4), u32_at(pos + 8));
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        pos += 12;
        let trailing = match kind {
            1 | 14 | 17 => 4,     // INT, VAR, DECL_TAG
            3 => 12,              // ARRAY
            4 | 5 => 12 * vlen,   // STRUCT, UNION
            6 | 13 => 8 * vlen,   // ENUM, FUNC_PROTO
            15 | 19 => 12 * vlen, // DATASEC, ENUM64
            _ => 0,               // PTR, FWD, TYPEDEF, qualifiers, FUNC, FLOAT, TYPE_TAG
        };
        if kind == 4 && name_off != 0 {
            let members = (0..vlen)
                .map(|i| {
                    let m = pos + 12 * i;
                    let bits = u32_at(m + 8);
                    let bits = if kind_flag { bits & 0x00ff_ffff } else { bits };
                    (name(u32_at(m)), (bits / 8) as usize)
                })
                .collect();
            out.insert(name(name_off), (size as usize, members));
        }
        pos += trailing;
    }
    out
}

#[test]
fn rust_mirrors_match_the_c_layout() {
    let mut c_structs = HashMap::new();
    for (object, bytes) in OBJECTS {
        let btf = elf_section(bytes, ".BTF").unwrap_or_else(|| panic!("{object} has no .BTF"));
        c_structs.extend(btf_structs(btf));
    }
    for (c_name, rust_size, rust_fields) in shared_layouts() {
        let (c_size, c_fields) =
            c_structs.get(c_name).unwrap_or_else(|| panic!("struct {c_name} is not in any object's BTF"));
        assert_eq!(rust_size, *c_size, "size of struct {c_name}");
        let rust: Vec<(String, usize)> =
            rust_fields.iter().map(|(n, o)| (n.trim_start_matches("r#").to_string(), *o)).collect();
        let named = |fields: &[(String, usize)]| -> Vec<(String, usize)> {
            fields.iter().filter(|(n, _)| !n.starts_with('_')).cloned().collect()
        };
        assert_eq!(named(&rust), named(c_fields), "fields of struct {c_name}");
    }
}
