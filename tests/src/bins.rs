//! Where the workspace's binaries are, for the tests and the lab's helpers
//! that run them (a leaf: the lab, the CNI runner and the agent helpers all
//! use it).

use std::path::PathBuf;

/// A binary of the workspace built alongside the tests (or the program
/// running); `$WEFT_BIN_DIR` names another build's directory (the restart
/// probe measures an earlier build's agent that way).
pub fn workspace_binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("WEFT_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let up = if dir.ends_with("deps") { dir.parent().unwrap() } else { dir };
    let bin = up.join(name);
    assert!(bin.exists(), "{} is missing: build it first (cargo build --workspace --bins)", bin.display());
    bin
}
