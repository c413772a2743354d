//! Connecting to a flow API (weft's, or any Hubble-compatible server) over
//! TCP or a unix socket, and reading the agent's HTTP API.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::proto::observer::observer_client::ObserverClient;

/// Where a server is: `unix:///path`, `host:port` or `http://host:port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    Unix(std::path::PathBuf),
    Tcp(String),
}

impl Address {
    pub fn parse(s: &str) -> Result<Address, String> {
        if let Some(p) = s.strip_prefix("unix://") {
            if p.is_empty() {
                return Err(format!("server {s:?}: no socket path after unix://"));
            }
            return Ok(Address::Unix(p.into()));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s);
        if hostport.starts_with("https://") || s.starts_with("tls://") {
            return Err(format!("server {s:?}: TLS is not supported by this client yet"));
        }
        if !hostport.contains(':') {
            return Err(format!("server {s:?}: expected host:port or unix:///path"));
        }
        Ok(Address::Tcp(format!("http://{hostport}")))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
            Address::Tcp(u) => f.write_str(u.trim_start_matches("http://")),
        }
    }
}

/// A gRPC channel to the server.
pub async fn channel(addr: &Address) -> Result<Channel, String> {
    let timeout = Duration::from_secs(5);
    match addr {
        Address::Tcp(url) => Endpoint::from_shared(url.clone())
            .map_err(|e| format!("{addr}: {e}"))?
            .connect_timeout(timeout)
            .connect()
            .await
            .map_err(|e| format!("cannot reach the flow API at {addr}: {e}")),
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
                .map_err(|e| format!("cannot reach the flow API at {addr}: {e}"))
        }
    }
}

/// An Observer client.
pub async fn observer(addr: &Address) -> Result<ObserverClient<Channel>, String> {
    Ok(ObserverClient::new(channel(addr).await?).max_decoding_message_size(64 << 20))
}

/// GETs `http://host:port/path`; the status and body.
pub async fn http_get(url: &str) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Empty};
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let get = async {
        let stream = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::get(crate::otlp::origin_form(&uri))
            .header("host", format!("{host}:{port}"))
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let code = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((code, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(5), get)
        .await
        .map_err(|_| format!("{url}: no answer within 5 s"))?
        .map_err(|e| format!("{url}: {e}"))
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
    }
}
