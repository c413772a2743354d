//! `weft`: observe flows and the agent's state. See `weft --help`.
//!
//! The command line ([`Cli`]) and the runtime; each command is a module:
//! [`observe`] (with [`filters`], the filter flags as Hubble's CLI reads
//! them) and [`status`]. Everything about the flow API itself (its types,
//! names, printing, the connection) comes from `weft-flow`.

mod args;
mod filters;
mod observe;
mod status;

use clap::{Parser, Subcommand};

/// Observe what traffic is doing on weft's nodes.
#[derive(Debug, Parser)]
#[command(name = "weft", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show flows: forwarded, redirected and dropped packets, and HTTP requests through Envoy.
    Observe(Box<observe::ObserveArgs>),
    /// Show the flow API's and the agent's state.
    Status(status::StatusArgs),
}

fn main() -> std::process::ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Observe(a) => observe::observe(*a, &argv).await,
            Command::Status(a) => status::status(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // The error and its causes: `--since: "x" is neither a duration ...`.
            eprintln!("weft: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
