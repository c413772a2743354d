//! Envoy's access log, received over its gRPC access-log service (the
//! bootstrap points Envoy's `weft-als` cluster at the agent): each HTTP
//! exchange becomes an [`L7Entry`] for the pipeline, which joins it with the
//! datapath's view of the same connections.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    sync::Arc,
};

use envoy_types::pb::envoy::{
    config::core::v3::{Address, RequestMethod, address, socket_address},
    data::accesslog::v3::{HttpAccessLogEntry, ResponseFlags, http_access_log_entry::HttpVersion},
    service::accesslog::v3::{
        StreamAccessLogsMessage, StreamAccessLogsResponse,
        access_log_service_server::{AccessLogService, AccessLogServiceServer},
        stream_access_logs_message::LogEntries,
    },
};
use tonic::{Request, Response, Status, Streaming};
use weft_flow::time::ns_of_parts;

use super::{
    Pipeline,
    record::{Http, L7Entry},
};

/// Request headers Envoy is asked to log with each entry.
pub const LOGGED_REQUEST_HEADERS: &[&str] = &["traceparent", "tracestate"];

fn socket_addr(a: Option<&Address>) -> Option<SocketAddrV4> {
    let Some(address::Address::SocketAddress(s)) = a?.address.as_ref() else { return None };
    let ip: Ipv4Addr = s.address.parse().ok()?;
    let port = match s.port_specifier {
        Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p).ok()?,
        _ => 0,
    };
    Some(SocketAddrV4::new(ip, port))
}

fn ns_of(d: Option<&envoy_types::pb::google::protobuf::Duration>) -> u64 {
    d.map(|d| ns_of_parts(d.seconds, d.nanos)).unwrap_or(0)
}

/// Envoy's short names for the response flags that are set (`UF,URX`).
pub fn response_flags(f: &ResponseFlags) -> String {
    let all = [
        (f.failed_local_healthcheck, "LH"),
        (f.no_healthy_upstream, "UH"),
        (f.upstream_request_timeout, "UT"),
        (f.local_reset, "LR"),
        (f.upstream_remote_reset, "UR"),
        (f.upstream_connection_failure, "UF"),
        (f.upstream_connection_termination, "UC"),
        (f.upstream_overflow, "UO"),
        (f.no_route_found, "NR"),
        (f.delay_injected, "DI"),
        (f.fault_injected, "FI"),
        (f.rate_limited, "RL"),
        (f.unauthorized_details.is_some(), "UAEX"),
        (f.downstream_connection_termination, "DC"),
        (f.upstream_retry_limit_exceeded, "URX"),
        (f.stream_idle_timeout, "SI"),
        (f.downstream_protocol_error, "DPE"),
        (f.upstream_protocol_error, "UPE"),
        (f.no_cluster_found, "NC"),
        (f.overload_manager, "OM"),
        (f.downstream_remote_reset, "DR"),
    ];
    all.iter().filter(|(on, _)| *on).map(|(_, n)| *n).collect::<Vec<_>>().join(",")
}

/// An access-log entry as an [`L7Entry`].
pub fn entry(e: &HttpAccessLogEntry) -> L7Entry {
    let c = e.common_properties.clone().unwrap_or_default();
    let req = e.request.clone().unwrap_or_default();
    let resp = e.response.clone().unwrap_or_default();
    let start_ns = c.start_time.as_ref().map(|t| ns_of_parts(t.seconds, t.nanos)).unwrap_or(0);
    let duration_ns = match ns_of(c.duration.as_ref()) {
        0 => ns_of(c.time_to_last_downstream_tx_byte.as_ref()),
        d => d,
    };
    let header = |k: &str| req.request_headers.get(k).cloned().unwrap_or_default();
    let method = RequestMethod::try_from(req.request_method)
        .ok()
        .filter(|m| *m != RequestMethod::MethodUnspecified)
        .map(|m| m.as_str_name().to_owned())
        .unwrap_or_default();
    let http = Http {
        method,
        scheme: req.scheme.clone(),
        authority: req.authority.clone(),
        path: req.path.clone(),
        protocol: match HttpVersion::try_from(e.protocol_version).unwrap_or(HttpVersion::ProtocolUnspecified) {
            HttpVersion::Http10 => "HTTP/1.0",
            HttpVersion::Http11 => "HTTP/1.1",
            HttpVersion::Http2 => "HTTP/2",
            HttpVersion::Http3 => "HTTP/3",
            HttpVersion::ProtocolUnspecified => "HTTP",
        },
        code: resp.response_code.map(|c| c.value).unwrap_or(0),
        start_ns,
        duration_ns,
        request_id: req.request_id.clone(),
        traceparent: header("traceparent"),
        tracestate: header("tracestate"),
        user_agent: req.user_agent.clone(),
        route: c.route_name.clone(),
        upstream_cluster: c.upstream_cluster.clone(),
        upstream: socket_addr(c.upstream_remote_address.as_ref()),
        upstream_local: socket_addr(c.upstream_local_address.as_ref()),
        response_flags: c.response_flags.as_ref().map(response_flags).unwrap_or_default(),
        downstream_link: None,
        upstream_link: None,
    };
    L7Entry {
        http,
        client: socket_addr(c.downstream_remote_address.as_ref()),
        server: socket_addr(c.downstream_local_address.as_ref()),
    }
}

/// The access-log service: hands every HTTP entry to the pipeline.
pub struct Als {
    pipeline: Arc<Pipeline>,
}

#[tonic::async_trait]
impl AccessLogService for Als {
    async fn stream_access_logs(
        &self,
        request: Request<Streaming<StreamAccessLogsMessage>>,
    ) -> Result<Response<StreamAccessLogsResponse>, Status> {
        let mut stream = request.into_inner();
        while let Some(msg) = stream.message().await? {
            match msg.log_entries {
                Some(LogEntries::HttpLogs(logs)) => {
                    for e in &logs.log_entry {
                        self.pipeline.submit_l7(entry(e));
                    }
                }
                Some(LogEntries::TcpLogs(_)) | None => {}
            }
        }
        Ok(Response::new(StreamAccessLogsResponse {}))
    }
}

/// Serves the access-log service on a unix socket (only `access` may
/// connect: what arrives becomes flows) until the process ends.
pub async fn serve_unix(pipeline: Arc<Pipeline>, path: &Path, access: weft_flow::socket::Access) -> anyhow::Result<()> {
    let listener = access.bind(path)?;
    tonic::transport::Server::builder()
        .add_service(AccessLogServiceServer::new(Als { pipeline }))
        .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
        .await?;
    Ok(())
}
