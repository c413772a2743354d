//! How one signal's export requests reach the collector: OTLP/gRPC on tonic
//! (the generated clients of `opentelemetry-proto`) or OTLP/HTTP with
//! protobuf bodies on reqwest, both with pooled keep-alive connections, TLS
//! (the system's roots plus a configured CA; a client certificate for mutual
//! TLS), the configured headers on every request, and gzip when asked.

use std::{io::Write, time::Duration};

use opentelemetry_proto::tonic::collector::{
    logs::v1::{ExportLogsServiceRequest, logs_service_client::LogsServiceClient},
    trace::v1::{ExportTraceServiceRequest, trace_service_client::TraceServiceClient},
};
use prost::Message;
use tonic::{
    codec::CompressionEncoding,
    metadata::{AsciiMetadataValue, MetadataKey, MetadataMap},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use weft_flow::client::{error_chain, http_client};

use super::{Compression, OtlpError, Protocol, Transport};

/// Why a request failed, and whether trying again may help.
#[derive(Debug)]
pub struct Failure {
    pub retry: bool,
    pub message: String,
}

/// One signal's client; owned by the export loop.
pub struct Client {
    kind: Kind,
}

/// Owned by the loop, one per signal: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Kind {
    /// The headers as gRPC metadata, built once, copied into each request.
    Grpc {
        logs: LogsServiceClient<Channel>,
        traces: TraceServiceClient<Channel>,
        metadata: MetadataMap,
    },
    Http {
        http: reqwest::Client,
        url: String,
        gzip: bool,
    },
}

impl Client {
    /// Builds the client; connections are made when the first request goes.
    pub fn new(t: &Transport) -> Result<Client, OtlpError> {
        let fail = |reason: String| OtlpError::Client { signal: t.signal, reason };
        let kind = match t.protocol {
            Protocol::Grpc => {
                let mut ep = Endpoint::from_shared(t.endpoint.clone())
                    .map_err(|e| fail(format!("endpoint {}: {e}", t.endpoint)))?
                    .connect_timeout(Duration::from_secs(2))
                    .timeout(t.timeout);
                if t.endpoint.starts_with("https://") {
                    let mut tls = ClientTlsConfig::new().with_native_roots();
                    if let Some(ca) = &t.ca_pem {
                        tls = tls.ca_certificate(Certificate::from_pem(ca));
                    }
                    if let Some((cert, key)) = &t.client_identity {
                        tls = tls.identity(Identity::from_pem(cert, key));
                    }
                    ep = ep.tls_config(tls).map_err(|e| fail(format!("TLS: {}", error_chain(&e))))?;
                }
                let ch = ep.connect_lazy();
                let (mut logs, mut traces) = (LogsServiceClient::new(ch.clone()), TraceServiceClient::new(ch));
                if t.compression == Compression::Gzip {
                    // Collectors answer in the request's encoding.
                    logs = logs.send_compressed(CompressionEncoding::Gzip).accept_compressed(CompressionEncoding::Gzip);
                    traces =
                        traces.send_compressed(CompressionEncoding::Gzip).accept_compressed(CompressionEncoding::Gzip);
                }
                let mut metadata = MetadataMap::new();
                for (k, v) in &t.headers {
                    let (Ok(key), Ok(mut value)) =
                        (MetadataKey::from_bytes(k.as_bytes()), AsciiMetadataValue::try_from(v.as_str()))
                    else {
                        return Err(fail(format!("header {k:?} cannot be sent (its value is not shown)")));
                    };
                    value.set_sensitive(true);
                    metadata.insert(key, value);
                }
                Kind::Grpc { logs, traces, metadata }
            }
            Protocol::HttpProtobuf => {
                let mut headers = reqwest::header::HeaderMap::new();
                for (k, v) in &t.headers {
                    let (Ok(name), Ok(mut value)) = (
                        reqwest::header::HeaderName::from_bytes(k.as_bytes()),
                        reqwest::header::HeaderValue::from_str(v),
                    ) else {
                        return Err(fail(format!("header {k:?} cannot be sent (its value is not shown)")));
                    };
                    // Credentials, often: kept out of debug output.
                    value.set_sensitive(true);
                    headers.append(name, value);
                }
                let mut b =
                    http_client().timeout(t.timeout).connect_timeout(Duration::from_secs(2)).default_headers(headers);
                if let Some(pem) = &t.ca_pem {
                    let certs = reqwest::Certificate::from_pem_bundle(pem)
                        .map_err(|e| fail(format!("CA certificates: {}", error_chain(&e))))?;
                    b = b.tls_certs_merge(certs);
                }
                if let Some((cert, key)) = &t.client_identity {
                    let id = reqwest::Identity::from_pem(&[cert.as_slice(), b"\n", key.as_slice()].concat())
                        .map_err(|e| fail(format!("client certificate and key: {}", error_chain(&e))))?;
                    b = b.identity(id);
                }
                let http = b.build().map_err(|e| fail(format!("HTTP client: {}", error_chain(&e))))?;
                Kind::Http { http, url: t.endpoint.clone(), gzip: t.compression == Compression::Gzip }
            }
        };
        Ok(Client { kind })
    }

    pub async fn send_logs(&mut self, req: ExportLogsServiceRequest) -> Result<(), Failure> {
        match &mut self.kind {
            Kind::Grpc { logs, metadata, .. } => {
                logs.export(with_metadata(req, metadata)).await.map(drop).map_err(grpc_failure)
            }
            Kind::Http { http, url, gzip } => post(http, url, req.encode_to_vec(), *gzip).await,
        }
    }

    pub async fn send_spans(&mut self, req: ExportTraceServiceRequest) -> Result<(), Failure> {
        match &mut self.kind {
            Kind::Grpc { traces, metadata, .. } => {
                traces.export(with_metadata(req, metadata)).await.map(drop).map_err(grpc_failure)
            }
            Kind::Http { http, url, gzip } => post(http, url, req.encode_to_vec(), *gzip).await,
        }
    }
}

fn with_metadata<T>(msg: T, metadata: &MetadataMap) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    *req.metadata_mut() = metadata.clone();
    req
}

/// OTLP's retryable gRPC codes (the specification's list, plus the ones a
/// broken connection shows up as).
fn grpc_failure(s: tonic::Status) -> Failure {
    use tonic::Code::*;
    let retry = matches!(
        s.code(),
        Unavailable | DeadlineExceeded | ResourceExhausted | Aborted | Cancelled | Unknown | Internal
    );
    let detail = std::error::Error::source(&s).map(|e| format!(" ({})", error_chain(e))).unwrap_or_default();
    Failure { retry, message: format!("gRPC {:?}: {}{detail}", s.code(), s.message()) }
}

/// The most of an OTLP/HTTP response body the exporter reads (it needs
/// only the status: a partial success is not acted on).
pub const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// POSTs one protobuf body; 429 and 5xx may be retried (OTLP/HTTP's rule).
async fn post(http: &reqwest::Client, url: &str, body: Vec<u8>, gzip: bool) -> Result<(), Failure> {
    let mut req = http.post(url).header(reqwest::header::CONTENT_TYPE, "application/x-protobuf");
    let body = if gzip {
        req = req.header(reqwest::header::CONTENT_ENCODING, "gzip");
        gzipped(&body)
    } else {
        body
    };
    let resp = req.body(body).send().await.map_err(|e| Failure { retry: !e.is_builder(), message: error_chain(&e) })?;
    let status = resp.status();
    // Read to the end, so the connection goes back to the pool; a collector
    // that answers with more than a response should hold is not read further
    // (its connection is dropped instead).
    let mut resp = resp;
    let mut read = 0usize;
    while let Ok(Some(chunk)) = resp.chunk().await {
        read = read.saturating_add(chunk.len());
        if read > MAX_RESPONSE_BYTES {
            break;
        }
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(Failure { retry: status.as_u16() == 429 || status.is_server_error(), message: format!("HTTP {status}") })
    }
}

fn gzipped(body: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::with_capacity(body.len() / 4), flate2::Compression::fast());
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(body);
    enc.finish().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A collector that answers with an endless body (a hostile or broken
    /// one): the exporter takes the status, reads a bounded part, and drops
    /// the connection instead of reading (and holding) the rest.
    #[tokio::test]
    async fn an_endless_collector_response_is_not_read_to_its_end() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let collector = tokio::spawn(async move {
            let (mut c, _) = listener.accept().await.unwrap();
            let mut request = vec![0u8; 4096];
            let _ = c.read(&mut request).await;
            c.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").await.unwrap();
            let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
            let mut sent = 0usize;
            while sent < 1 << 30 && c.write_all(chunk.as_bytes()).await.is_ok() {
                sent += 0x4000;
            }
            sent
        });
        let http = weft_flow::client::http_client().timeout(Duration::from_secs(20)).build().unwrap();
        post(&http, &format!("http://{addr}/v1/logs"), vec![1, 2, 3], false).await.unwrap();
        drop(http);
        let sent = collector.await.unwrap();
        assert!(sent < 64 << 20, "the exporter kept reading: {sent} bytes");
    }
}
