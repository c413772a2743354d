//! How one signal's export requests reach the collector: OTLP/gRPC on tonic
//! (the generated clients of `opentelemetry-proto`) or OTLP/HTTP with
//! protobuf bodies on reqwest, both with pooled keep-alive connections, TLS
//! (the system's roots plus a configured CA; a client certificate for mutual
//! TLS), the configured headers on every request, and gzip when asked.

use std::{io::Write, time::Duration};

use opentelemetry_proto::tonic::collector::{
    logs::v1::{ExportLogsServiceRequest, ExportLogsServiceResponse, logs_service_client::LogsServiceClient},
    trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse, trace_service_client::TraceServiceClient},
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

/// A request the collector took: all of it, or all but `rejected` items
/// (OTLP's partial success, which must not be retried).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Log records or spans the collector refused, never more than were sent.
    pub rejected: u64,
    /// The collector's reason, cut to [`MAX_MESSAGE_CHARS`].
    pub message: Option<String>,
}

/// The most of a collector's partial-success message that is kept.
pub const MAX_MESSAGE_CHARS: usize = 256;

impl Accepted {
    /// From a response's partial-success fields: a negative or too large
    /// count (a broken or hostile collector) is held to what was sent.
    pub fn from_partial(rejected: i64, message: &str, sent: usize) -> Accepted {
        let rejected = u64::try_from(rejected).unwrap_or(0).min(sent as u64);
        let message = (!message.is_empty()).then(|| message.chars().take(MAX_MESSAGE_CHARS).collect());
        Accepted { rejected, message }
    }

    fn of_logs(r: &ExportLogsServiceResponse, sent: usize) -> Accepted {
        r.partial_success
            .as_ref()
            .map_or_else(Accepted::default, |p| Accepted::from_partial(p.rejected_log_records, &p.error_message, sent))
    }

    fn of_spans(r: &ExportTraceServiceResponse, sent: usize) -> Accepted {
        r.partial_success
            .as_ref()
            .map_or_else(Accepted::default, |p| Accepted::from_partial(p.rejected_spans, &p.error_message, sent))
    }
}

/// Log records in a request.
pub fn log_count(req: &ExportLogsServiceRequest) -> usize {
    req.resource_logs.iter().flat_map(|r| &r.scope_logs).map(|s| s.log_records.len()).sum()
}

/// Spans in a request.
pub fn span_count(req: &ExportTraceServiceRequest) -> usize {
    req.resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum()
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

    pub async fn send_logs(&mut self, req: ExportLogsServiceRequest) -> Result<Accepted, Failure> {
        let sent = log_count(&req);
        let response = match &mut self.kind {
            Kind::Grpc { logs, metadata, .. } => {
                logs.export(with_metadata(req, metadata)).await.map(|r| r.into_inner()).map_err(grpc_failure)?
            }
            Kind::Http { http, url, gzip } => response_of(&post(http, url, req.encode_to_vec(), *gzip).await?),
        };
        Ok(Accepted::of_logs(&response, sent))
    }

    pub async fn send_spans(&mut self, req: ExportTraceServiceRequest) -> Result<Accepted, Failure> {
        let sent = span_count(&req);
        let response = match &mut self.kind {
            Kind::Grpc { traces, metadata, .. } => {
                traces.export(with_metadata(req, metadata)).await.map(|r| r.into_inner()).map_err(grpc_failure)?
            }
            Kind::Http { http, url, gzip } => response_of(&post(http, url, req.encode_to_vec(), *gzip).await?),
        };
        Ok(Accepted::of_spans(&response, sent))
    }
}

/// A successful OTLP/HTTP response body as the signal's response message;
/// one that does not decode (or was cut at [`MAX_RESPONSE_BYTES`]) counts as
/// a full success, which is what its 2xx status says.
fn response_of<M: Message + Default>(body: &[u8]) -> M {
    M::decode(body).unwrap_or_default()
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

/// The most of an OTLP/HTTP response body the exporter reads (the status
/// and a partial success fit in far less).
pub const MAX_RESPONSE_BYTES: usize = 64 << 10;

/// POSTs one protobuf body and gives the response body of a 2xx; 429 and
/// 5xx may be retried (OTLP/HTTP's rule).
async fn post(http: &reqwest::Client, url: &str, body: Vec<u8>, gzip: bool) -> Result<Vec<u8>, Failure> {
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
    let mut read = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        if read.len() + chunk.len() > MAX_RESPONSE_BYTES {
            read.clear();
            break;
        }
        read.extend_from_slice(&chunk);
    }
    if status.is_success() {
        Ok(read)
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

    /// A partial success's count is held to what was sent, whatever the
    /// collector claims, and its message is cut.
    #[test]
    fn a_partial_success_counts_at_most_what_was_sent() {
        assert_eq!(Accepted::from_partial(2, "", 5), Accepted { rejected: 2, message: None });
        assert_eq!(Accepted::from_partial(-3, "odd", 5).rejected, 0);
        assert_eq!(Accepted::from_partial(i64::MAX, "", 5).rejected, 5);
        let long = Accepted::from_partial(1, &"é".repeat(10_000), 5);
        assert_eq!(long.message.map(|m| m.chars().count()), Some(MAX_MESSAGE_CHARS));
    }

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
