//! Flags more than one command takes: where the flow API is and how to
//! trust it, and the output format.

use anyhow::Context;
use clap::{Args, ValueEnum};
use weft_flow::client::{self, Address};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// One line per flow, like `hubble observe`.
    Compact,
    /// One JSON object per line, with Hubble's field names.
    Json,
    /// Same as json.
    Jsonpb,
    /// Aligned columns.
    Table,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

/// Flags shared by the commands that talk to a flow API.
#[derive(Debug, Args)]
pub struct ServerArgs {
    /// The flow API: host:port, tls://host:port or unix:///path.
    #[arg(long, env = "WEFT_SERVER", default_value = "localhost:4244")]
    pub server: String,
    /// CA certificate (PEM) the server's certificate must chain to (tls://).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Name to check the server's certificate against (default: the host).
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    /// Client certificate and key (PEM) for servers that require one.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

impl ServerArgs {
    /// The address and TLS settings; errors name the flag and the file.
    pub fn target(&self) -> anyhow::Result<(Address, client::TlsClient)> {
        let read =
            |flag: &str, p: &std::path::Path| std::fs::read(p).with_context(|| format!("--{flag} {}", p.display()));
        let tls = client::TlsClient {
            ca_pem: self.tls_ca.as_deref().map(|p| read("tls-ca", p)).transpose()?,
            server_name: self.tls_server_name.clone(),
            identity: match (&self.tls_cert, &self.tls_key) {
                (Some(c), Some(k)) => Some((read("tls-cert", c)?, read("tls-key", k)?)),
                _ => None,
            },
        };
        Ok((Address::parse(&self.server)?, tls))
    }
}
