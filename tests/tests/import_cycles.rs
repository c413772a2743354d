//! No file-level import cycles inside any of the workspace's crates: a file
//! that imports another (through `crate::` or `super::` paths) must not be
//! imported back, directly or around a loop. Shared types go where both
//! sides can depend on them. Test modules at the end of a file
//! (`#[cfg(test)] mod tests`) do not count. The crates are the workspace's
//! members as `cargo metadata` lists them, so a new crate is checked from the
//! day it is added.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// Every workspace member with the source folders of its library and
/// binaries (`src/` usually): the folder of each target's root file. Binaries
/// that are one file under `src/bin/` are crates of one file, not checked.
fn workspace_crates() -> Vec<(String, BTreeSet<PathBuf>)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let out = std::process::Command::new(&cargo)
        .args(["metadata", "--no-deps", "--offline", "--format-version", "1", "--manifest-path"])
        .arg(&manifest)
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let members: BTreeSet<&str> =
        meta["workspace_members"].as_array().expect("workspace_members").iter().filter_map(|m| m.as_str()).collect();
    let mut crates = Vec::new();
    for package in meta["packages"].as_array().expect("packages") {
        if !package["id"].as_str().is_some_and(|id| members.contains(id)) {
            continue;
        }
        let mut dirs = BTreeSet::new();
        for t in package["targets"].as_array().expect("targets") {
            let code = t["kind"]
                .as_array()
                .expect("kind")
                .iter()
                .any(|k| matches!(k.as_str(), Some("lib" | "bin" | "proc-macro")));
            let Some(root) = t["src_path"].as_str().filter(|_| code).and_then(|p| Path::new(p).parent()) else {
                continue;
            };
            if root.file_name().is_some_and(|n| n == "bin") {
                continue;
            }
            dirs.insert(root.to_path_buf());
        }
        crates.push((package["name"].as_str().expect("name").to_owned(), dirs));
    }
    assert_eq!(crates.len(), members.len(), "every workspace member is found in cargo metadata's packages");
    crates
}

type Module = Vec<String>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            // Each file under src/bin/ is a crate of its own.
            if p.file_name().is_some_and(|n| n != "bin") {
                rust_files(&p, out);
            }
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are `a::b`; `lib.rs` and `main.rs` the root.
fn module_of(src: &Path, file: &Path) -> Module {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let mut parts: Module = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and without its trailing test module.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod ") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `a::b::c` paths that follow `prefix` in the code (not a longer word).
fn paths_after(code: &str, prefix: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices(prefix) {
        if code[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        let end = rest.find(|c: char| !(is_ident(c) || c == ':')).unwrap_or(rest.len());
        let path: Vec<String> = rest[..end].split("::").filter(|s| !s.is_empty()).map(str::to_owned).collect();
        out.push(path);
    }
    out
}

/// The items of `use crate::{...};` groups, flattened (`a::{b, c::d}` gives
/// `a::b` and `a::c::d`).
fn use_groups(code: &str) -> Vec<Vec<String>> {
    fn expand(prefix: &[String], group: &str, out: &mut Vec<Vec<String>>) {
        let mut depth = 0;
        let mut items = vec![String::new()];
        for c in group.chars() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if c == ',' && depth == 0 {
                items.push(String::new());
            } else if let Some(last) = items.last_mut() {
                last.push(c);
            }
        }
        for item in items {
            let item: String = item.split_whitespace().collect::<Vec<_>>().join(" ");
            let item = item.split(" as ").next().unwrap_or("").replace(' ', "");
            if item.is_empty() {
                continue;
            }
            match item.find('{') {
                Some(open) if item.ends_with('}') => {
                    let head: Vec<String> =
                        item[..open].split("::").filter(|s| !s.is_empty()).map(str::to_owned).collect();
                    let mut p = prefix.to_vec();
                    p.extend(head);
                    expand(&p, &item[open + 1..item.len() - 1], out);
                }
                _ => {
                    let mut p = prefix.to_vec();
                    p.extend(item.split("::").map(str::to_owned));
                    out.push(p);
                }
            }
        }
    }
    let mut out = Vec::new();
    for (at, _) in code.match_indices("use crate::{") {
        let body = &code[at + "use crate::{".len()..];
        let mut depth = 1;
        let Some(end) = body.char_indices().find_map(|(i, c)| {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            (depth == 0).then_some(i)
        }) else {
            continue;
        };
        expand(&[], &body[..end], &mut out);
    }
    out
}

/// The module a path names: its longest prefix that is a file of the crate.
fn target(path: &[String], modules: &BTreeSet<Module>) -> Option<Module> {
    (1..=path.len()).rev().map(|n| path[..n].to_vec()).find(|m| modules.contains(m))
}

/// Imports between the files of one crate.
fn edges(src: &Path) -> BTreeMap<Module, BTreeSet<Module>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<Module> = files.iter().map(|f| module_of(src, f)).collect();
    let mut out = BTreeMap::new();
    for f in &files {
        let me = module_of(src, f);
        let code = code(&std::fs::read_to_string(f).expect("readable source"));
        let mut paths = paths_after(&code, "crate::");
        paths.extend(use_groups(&code));
        for p in paths_after(&code, "super::") {
            // `super::` is relative to the file's module; each further `super` climbs one more.
            let mut base = me.clone();
            base.pop();
            let mut rest = p.as_slice();
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            base.extend(rest.iter().cloned());
            paths.push(base);
        }
        let deps: BTreeSet<Module> = paths.iter().filter_map(|p| target(p, &modules)).filter(|m| *m != me).collect();
        out.insert(me, deps);
    }
    out
}

/// Every cycle's members (strongly connected components of more than one file).
fn cycles(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Vec<Vec<Module>> {
    // Kosaraju: finish order on the graph, then components on its reverse.
    fn finish(
        v: &Module,
        g: &BTreeMap<Module, BTreeSet<Module>>,
        seen: &mut BTreeSet<Module>,
        order: &mut Vec<Module>,
    ) {
        if !seen.insert(v.clone()) {
            return;
        }
        for w in g.get(v).into_iter().flatten() {
            finish(w, g, seen, order);
        }
        order.push(v.clone());
    }
    let mut seen = BTreeSet::new();
    let mut order = Vec::new();
    for v in edges.keys() {
        finish(v, edges, &mut seen, &mut order);
    }
    let mut reverse: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for (v, ws) in edges {
        for w in ws {
            reverse.entry(w.clone()).or_default().insert(v.clone());
        }
    }
    let mut assigned = BTreeSet::new();
    let mut out = Vec::new();
    for v in order.iter().rev() {
        if assigned.contains(v) {
            continue;
        }
        let mut comp = Vec::new();
        let mut stack = vec![v.clone()];
        while let Some(x) = stack.pop() {
            if !assigned.insert(x.clone()) {
                continue;
            }
            stack.extend(reverse.get(&x).into_iter().flatten().filter(|w| !assigned.contains(*w)).cloned());
            comp.push(x);
        }
        if comp.len() > 1 {
            comp.sort();
            out.push(comp);
        }
    }
    out
}

fn show(m: &Module) -> String {
    if m.is_empty() { "lib".into() } else { m.join("/") }
}

#[test]
fn no_crate_has_a_file_level_import_cycle() {
    let crates = workspace_crates();
    let names: Vec<&str> = crates.iter().map(|(name, _)| name.as_str()).collect();
    // The members of today's workspace; more is fine, fewer means members are missed.
    for known in ["weft-agent", "weft-observe", "weft-flow", "weft-cli", "weft-cni", "weft-gateway-api", "weft-ebpf"] {
        assert!(names.contains(&known), "{known} is not among the workspace members read: {names:?}");
    }
    let mut found = Vec::new();
    let mut files = 0;
    for (name, dirs) in &crates {
        assert!(!dirs.is_empty(), "{name}: no library or binary source folder");
        for src in dirs {
            let e = edges(src);
            assert!(!e.is_empty(), "{name}: no Rust file under {}", src.display());
            files += e.len();
            for c in cycles(&e) {
                found.push(format!("{name}: {}", c.iter().map(show).collect::<Vec<_>>().join(" <-> ")));
            }
        }
    }
    assert!(files > 100, "only {files} files read: is the layout what this test expects?");
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn the_checker_sees_cycles_through_use_groups_super_and_paths() {
    let dir = std::env::temp_dir().join(format!("weft-import-cycles-{}", std::process::id()));
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("run")).unwrap();
    let write = |p: &str, text: &str| std::fs::write(src.join(p), text).unwrap();
    write("lib.rs", "pub mod a;\npub mod b;\npub mod c;\npub mod run;\n");
    write("a.rs", "use crate::{\n    b::{self, Thing as T},\n};\n");
    write("b.rs", "// crate::a in a comment does not count\nfn f() { crate::a::g() }\n");
    write("c.rs", "#[cfg(test)]\nmod tests {\n    use crate::a;\n}\n");
    write("run/mod.rs", "pub mod x;\npub mod y;\n");
    write("run/x.rs", "use super::y::Y;\n");
    write("run/y.rs", "fn f() -> super::super::run::x::X { todo!() }\n");
    let e = edges(&src);
    let _ = std::fs::remove_dir_all(&dir);
    let mut c: Vec<String> = cycles(&e).iter().map(|c| c.iter().map(show).collect::<Vec<_>>().join(" <-> ")).collect();
    c.sort();
    assert_eq!(c, vec!["a <-> b", "run/x <-> run/y"]);
}
