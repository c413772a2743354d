"""Adds a catch-all `Unknown` variant (serde `other`, the enum's default) to
every enum kopium generated: reads Rust on stdin, writes it on stdout."""

import re
import sys

lines = sys.stdin.read().split("\n")
out = []
in_enum = False
for i, line in enumerate(lines):
    if line.startswith("pub enum "):
        in_enum = True
        # The derive line above the enum (doc comments may sit between).
        for j in range(len(out) - 1, -1, -1):
            if out[j].startswith("#[derive("):
                if "Default" not in out[j]:
                    out[j] = out[j].replace(")]", ", Default)]", 1)
                break
            if not (out[j].startswith("///") or out[j].startswith("#[")):
                break
    if in_enum and line == "}":
        out.append("    /// A value these types do not know (a newer API version's, or another channel's).")
        out.append("    #[serde(other)]")
        out.append("    #[default]")
        out.append("    Unknown,")
        in_enum = False
    out.append(line)
sys.stdout.write("\n".join(out))
