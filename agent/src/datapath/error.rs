//! What can go wrong managing the datapath, with the context a user needs.

use std::{io, path::PathBuf};

/// A datapath operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// Pins need a bpffs mount.
    #[error("{path} is not on a bpffs mount: mount one (`mount -t bpf bpf /sys/fs/bpf`) or set bpffs-dir")]
    NotBpffs { path: PathBuf },

    /// A pinned map from an earlier run does not fit the configuration.
    #[error(
        "pinned map {map} ({path}) has {found}, the configuration wants {wanted}: restart with \
         --recreate-mismatched-maps to rebuild it (what it holds is lost), or restore map-sizes.{key}"
    )]
    MapMismatch { map: &'static str, key: &'static str, path: PathBuf, found: String, wanted: String },

    /// A map has no room for another entry.
    #[error("map {map} is full ({max_entries} entries): raise map-sizes.{key}")]
    MapFull { map: &'static str, key: &'static str, max_entries: u32 },

    /// The kernel refused an object (the verifier's log is in the source).
    #[error("loading BPF object {object}: {source}")]
    Load { object: &'static str, source: Box<aya::EbpfError> },

    /// A program could not be loaded, attached or pinned.
    #[error("program {program}: {source}")]
    Program { program: String, source: Box<aya::programs::ProgramError> },

    /// A map operation failed for another reason than being full.
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: Box<aya::maps::MapError> },

    /// An interface is missing or unusable.
    #[error("interface {ifname}: {source}")]
    Interface { ifname: String, source: io::Error },

    /// A file, link or namespace operation failed.
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },

    /// An `ip` or similar command failed.
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },

    /// Map sizes the kernel would refuse.
    #[error(transparent)]
    MapSizes(#[from] super::config::MapSizeError),

    /// A request the datapath cannot represent.
    #[error("{0}")]
    Invalid(String),
}

impl DatapathError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        DatapathError::Io { what: what.into(), source }
    }

    pub(crate) fn program(program: &str, source: aya::programs::ProgramError) -> Self {
        DatapathError::Program { program: program.to_owned(), source: Box::new(source) }
    }
}

/// Result of datapath operations.
pub type Result<T, E = DatapathError> = std::result::Result<T, E>;
