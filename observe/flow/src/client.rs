//! Connecting to a flow API (weft's, or any Hubble-compatible server) over
//! TCP, TLS or a unix socket, and reading the agent's HTTP API.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::proto::observer::observer_client::ObserverClient;

/// Where a server is: `unix:///path`, `host:port`, `http://host:port`, or
/// `tls://host:port` (also `https://`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(std::path::PathBuf),
    Tcp(String),
    Tls(String),
}

/// How to check a TLS server, and who the client is (mutual TLS).
#[derive(Clone, Debug, Default)]
pub struct TlsClient {
    /// PEM of the CA the server's certificate must chain to (default: the
    /// system's roots are not loaded, so give one).
    pub ca_pem: Option<Vec<u8>>,
    /// The name to check the certificate against (default: the host).
    pub server_name: Option<String>,
    /// Client certificate and key (PEM).
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl Address {
    pub fn parse(s: &str) -> Result<Address, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(format!("server {s:?}: no socket path after unix://"));
            }
            return Ok(Address::Unix(p.into()));
        }
        if let Some(hostport) = s.strip_prefix("tls://").or_else(|| s.strip_prefix("https://")) {
            if !hostport.contains(':') {
                return Err(format!("server {s:?}: expected tls://host:port"));
            }
            return Ok(Address::Tls(format!("https://{hostport}")));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s);
        if !hostport.contains(':') {
            return Err(format!("server {s:?}: expected host:port, tls://host:port or unix:///path"));
        }
        Ok(Address::Tcp(format!("http://{hostport}")))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
            Address::Tcp(u) => f.write_str(u.trim_start_matches("http://")),
            Address::Tls(u) => write!(f, "tls://{}", u.trim_start_matches("https://")),
        }
    }
}

/// A gRPC channel to the server.
pub async fn channel(addr: &Address) -> Result<Channel, String> {
    channel_tls(addr, &TlsClient::default()).await
}

/// An error with its causes, outermost first.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(&format!(": {s}"));
        cur = s.source();
    }
    out
}

/// A gRPC channel to the server, with TLS settings for `tls://` addresses.
pub async fn channel_tls(addr: &Address, tls: &TlsClient) -> Result<Channel, String> {
    let timeout = Duration::from_secs(5);
    match addr {
        Address::Tls(url) => {
            let mut cfg = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = &tls.ca_pem {
                cfg = cfg.ca_certificate(tonic::transport::Certificate::from_pem(ca));
            }
            if let Some(name) = &tls.server_name {
                cfg = cfg.domain_name(name.clone());
            }
            if let Some((cert, key)) = &tls.identity {
                cfg = cfg.identity(tonic::transport::Identity::from_pem(cert, key));
            }
            Endpoint::from_shared(url.clone())
                .map_err(|e| format!("{addr}: {e}"))?
                .tls_config(cfg)
                .map_err(|e| format!("{addr}: TLS settings: {}", error_chain(&e)))?
                .connect_timeout(timeout)
                .connect()
                .await
                .map_err(|e| format!("cannot reach the flow API at {addr}: {}", error_chain(&e)))
        }
        Address::Tcp(url) => Endpoint::from_shared(url.clone())
            .map_err(|e| format!("{addr}: {e}"))?
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(|e| format!("cannot reach the flow API at {addr}: {}", error_chain(&e))),
        Address::Unix(path) => {
            let path = path.clone();
            Endpoint::from_static("http://localhost")
                .connect_timeout(timeout)
                .connect_with_connector(tower::service_fn(move |_| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await
                .map_err(|e| format!("cannot reach the flow API at {addr}: {}", error_chain(&e)))
        }
    }
}

/// An Observer client.
pub async fn observer(addr: &Address) -> Result<ObserverClient<Channel>, String> {
    observer_tls(addr, &TlsClient::default()).await
}

/// An Observer client, with TLS settings for `tls://` addresses.
pub async fn observer_tls(addr: &Address, tls: &TlsClient) -> Result<ObserverClient<Channel>, String> {
    Ok(ObserverClient::new(channel_tls(addr, tls).await?).max_decoding_message_size(64 << 20))
}

/// The start of every HTTP client in the workspace (reqwest over hyper,
/// rustls on ring): the agent's polls of Envoy's admin interface, `weft
/// status`, OTLP/HTTP export. No proxy from the environment (every peer is on
/// the node or named in config). reqwest is built without a TLS crypto
/// provider of its own (its default, aws-lc-rs, needs cmake): ring, which
/// kube and tonic use already, is installed as the process default.
pub fn http_client() -> reqwest::ClientBuilder {
    // Err only when a provider is installed already; then that one is used.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy()
}

/// GETs `url` (the agent's HTTP API); the status and body.
pub async fn http_get(url: &str) -> Result<(u16, String), String> {
    let client =
        http_client().timeout(Duration::from_secs(5)).build().map_err(|e| format!("{url}: {}", error_chain(&e)))?;
    let resp = client.get(url).send().await.map_err(|e| format!("{url}: {}", error_chain(&e)))?;
    let code = resp.status().as_u16();
    let body = resp.text().await.map_err(|e| format!("{url}: {}", error_chain(&e)))?;
    Ok((code, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            Address::parse("unix:///var/run/weft/observer.sock").unwrap(),
            Address::Unix("/var/run/weft/observer.sock".into())
        );
        assert_eq!(Address::parse("localhost:4244").unwrap(), Address::Tcp("http://localhost:4244".into()));
        assert_eq!(Address::parse("http://10.0.0.1:4244").unwrap().to_string(), "10.0.0.1:4244");
        assert!(Address::parse("localhost").is_err());
        assert!(Address::parse("unix://").is_err());
        assert_eq!(Address::parse("tls://flows:4244").unwrap(), Address::Tls("https://flows:4244".into()));
        assert_eq!(Address::parse("tls://flows:4244").unwrap().to_string(), "tls://flows:4244");
    }
}
