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

/// A server address that is not one (`--server`, `WEFT_SERVER`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("server {0:?}: no socket path after unix://")]
    NoSocketPath(String),
    #[error("server {0:?}: expected tls://host:port")]
    NoTlsPort(String),
    #[error("server {0:?}: expected host:port, tls://host:port or unix:///path")]
    NoPort(String),
}

impl Address {
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(AddressError::NoSocketPath(s.into()));
            }
            return Ok(Address::Unix(p.into()));
        }
        if let Some(hostport) = s.strip_prefix("tls://").or_else(|| s.strip_prefix("https://")) {
            if !hostport.contains(':') {
                return Err(AddressError::NoTlsPort(s.into()));
            }
            return Ok(Address::Tls(format!("https://{hostport}")));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s);
        if !hostport.contains(':') {
            return Err(AddressError::NoPort(s.into()));
        }
        Ok(Address::Tcp(format!("http://{hostport}")))
    }
}

/// A flow API that could not be reached, by what failed: the address as a
/// URL, the TLS settings, or the connection. The message carries the
/// transport error's causes.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{address}: {}", error_chain(.error))]
    Url { address: Address, error: tonic::transport::Error },
    #[error("{address}: TLS settings: {}", error_chain(.error))]
    Tls { address: Address, error: tonic::transport::Error },
    #[error("cannot reach the flow API at {address}: {}", error_chain(.error))]
    Unreachable { address: Address, error: tonic::transport::Error },
}

/// An HTTP request that failed (no answer, or no body), with the URL.
#[derive(Debug, thiserror::Error)]
#[error("{url}: {}", error_chain(.error))]
pub struct HttpError {
    pub url: String,
    pub error: reqwest::Error,
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
pub async fn channel(addr: &Address) -> Result<Channel, ConnectError> {
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
pub async fn channel_tls(addr: &Address, tls: &TlsClient) -> Result<Channel, ConnectError> {
    let timeout = Duration::from_secs(5);
    let address = || addr.clone();
    let url = |url: &str| {
        Endpoint::from_shared(url.to_owned()).map_err(|error| ConnectError::Url { address: address(), error })
    };
    let unreachable = |error| ConnectError::Unreachable { address: address(), error };
    match addr {
        Address::Tls(u) => {
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
            url(u)?
                .tls_config(cfg)
                .map_err(|error| ConnectError::Tls { address: address(), error })?
                .connect_timeout(timeout)
                .connect()
                .await
                .map_err(unreachable)
        }
        Address::Tcp(u) => url(u)?.connect_timeout(timeout).connect().await.map_err(unreachable),
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
                .map_err(unreachable)
        }
    }
}

/// An Observer client.
pub async fn observer(addr: &Address) -> Result<ObserverClient<Channel>, ConnectError> {
    observer_tls(addr, &TlsClient::default()).await
}

/// An Observer client, with TLS settings for `tls://` addresses.
pub async fn observer_tls(addr: &Address, tls: &TlsClient) -> Result<ObserverClient<Channel>, ConnectError> {
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
pub async fn http_get(url: &str) -> Result<(u16, String), HttpError> {
    let failed = |error| HttpError { url: url.to_owned(), error };
    let client = http_client().timeout(Duration::from_secs(5)).build().map_err(failed)?;
    let resp = client.get(url).send().await.map_err(failed)?;
    let code = resp.status().as_u16();
    let body = resp.text().await.map_err(failed)?;
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
        assert_eq!(Address::parse("localhost"), Err(AddressError::NoPort("localhost".into())));
        assert_eq!(
            Address::parse("localhost").unwrap_err().to_string(),
            r#"server "localhost": expected host:port, tls://host:port or unix:///path"#
        );
        assert_eq!(Address::parse("unix://"), Err(AddressError::NoSocketPath("unix://".into())));
        assert_eq!(Address::parse("tls://flows"), Err(AddressError::NoTlsPort("tls://flows".into())));
        assert_eq!(Address::parse("tls://flows:4244").unwrap(), Address::Tls("https://flows:4244".into()));
        assert_eq!(Address::parse("tls://flows:4244").unwrap().to_string(), "tls://flows:4244");
    }
}
