//! `weft`: observe flows and the agent's state. See `weft --help`.

use clap::Parser;
use weft_observe::cli::{self, Cli, Command};

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
            Command::Observe(a) => cli::observe(a, &argv).await,
            Command::Status(a) => cli::status(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
