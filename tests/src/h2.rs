//! HTTP/2 lab servers and a gRPC client, for the Gateway API cases the
//! HTTP/1.1 lab server cannot play: the conformance suite's gRPC echo
//! backend (`GrpcEcho`: `Echo` and `EchoTwo` answer with what the server
//! saw and who it is, `EchoThree` is unimplemented) and its echo backend on
//! an `appProtocol: kubernetes.io/h2c` port. Both speak HTTP/2 with prior
//! knowledge only, so a proxy that sends them HTTP/1.1 gets no answer: a
//! test through them shows that the proxy spoke h2c upstream.
//!
//! The messages are the suite's `grpcecho.proto` fields (names and numbers),
//! declared with prost's derive.

use std::{
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;

use crate::http::{EchoPod, connect_in, echo_json, listen_in};

/// The suite's gRPC echo service.
pub const ECHO_SERVICE: &str = "gateway_api_conformance.echo_basic.grpcecho.GrpcEcho";

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Header {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Context {
    #[prost(string, tag = "1")]
    pub namespace: String,
    #[prost(string, tag = "2")]
    pub ingress: String,
    #[prost(string, tag = "3")]
    pub service_name: String,
    #[prost(string, tag = "4")]
    pub pod: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Assertions {
    #[prost(string, tag = "1")]
    pub fully_qualified_method: String,
    #[prost(message, repeated, tag = "2")]
    pub headers: Vec<Header>,
    #[prost(string, tag = "3")]
    pub authority: String,
    #[prost(message, optional, tag = "4")]
    pub context: Option<Context>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoResponse {
    #[prost(message, optional, tag = "1")]
    pub assertions: Option<Assertions>,
    #[prost(message, optional, tag = "2")]
    pub request: Option<EchoRequest>,
}

impl EchoResponse {
    /// The pod that answered.
    pub fn pod(&self) -> &str {
        self.assertions.as_ref().and_then(|a| a.context.as_ref()).map_or("", |c| c.pod.as_str())
    }

    /// The namespace of the pod that answered.
    pub fn namespace(&self) -> &str {
        self.assertions.as_ref().and_then(|a| a.context.as_ref()).map_or("", |c| c.namespace.as_str())
    }
}

/// What an [`H2Server`] plays.
#[derive(Clone, Debug)]
pub enum H2Echo {
    /// The gRPC echo backend.
    Grpc(EchoPod),
    /// The HTTP echo backend (the JSON of [`crate::http`]'s echo), over h2c.
    Http(EchoPod),
}

type Body = BoxBody<Bytes, Infallible>;

/// A server speaking HTTP/2 with prior knowledge in a lab namespace; stops
/// when dropped.
pub struct H2Server {
    pub addr: SocketAddr,
    /// Requests answered (any status).
    pub served: Arc<AtomicU64>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl H2Server {
    /// Starts the server on `bind` inside network namespace `ns`.
    pub fn start(ns: &str, bind: SocketAddr, echo: H2Echo) -> io::Result<Self> {
        let listener = listen_in(ns, bind, false)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let counter = served.clone();
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                loop {
                    let stream = tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => match accepted {
                            Ok((s, _)) => s,
                            Err(_) => continue,
                        },
                    };
                    let (echo, counter) = (echo.clone(), counter.clone());
                    tokio::spawn(async move {
                        let service = service_fn(move |req| {
                            counter.fetch_add(1, Ordering::Relaxed);
                            answer(echo.clone(), req)
                        });
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        Ok(Self { addr, served, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for H2Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Every header of `req`, names in lower case, in arrival order.
fn headers_of(req: &Request<Incoming>) -> Vec<(String, String)> {
    req.headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
        .collect()
}

async fn answer(echo: H2Echo, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let authority = req.uri().authority().map(|a| a.to_string()).unwrap_or_default();
    let path = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let method = req.method().to_string();
    let headers = headers_of(&req);
    // The whole request first (a unary call's message), so the stream ends cleanly.
    let _ = req.into_body().collect().await;
    let response = match echo {
        H2Echo::Http(pod) => {
            let body = echo_json(&method, &path, &authority, &headers, &pod);
            Response::builder()
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(Bytes::from(body)).boxed())
        }
        H2Echo::Grpc(pod) => {
            let implemented = ["Echo", "EchoTwo"].iter().any(|m| path == format!("/{ECHO_SERVICE}/{m}"));
            if implemented {
                let reply = EchoResponse {
                    assertions: Some(Assertions {
                        fully_qualified_method: path.clone(),
                        headers: headers.into_iter().map(|(key, value)| Header { key, value }).collect(),
                        authority,
                        context: Some(Context {
                            namespace: pod.namespace.clone(),
                            pod: pod.pod.clone(),
                            ..Default::default()
                        }),
                    }),
                    request: Some(EchoRequest {}),
                };
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                let frames: Vec<Result<Frame<Bytes>, Infallible>> =
                    vec![Ok(Frame::data(grpc_frame(&reply))), Ok(Frame::trailers(trailers))];
                Response::builder()
                    .header("content-type", "application/grpc")
                    .body(StreamBody::new(tokio_stream::iter(frames)).boxed())
            } else {
                // A trailers-only answer: UNIMPLEMENTED (12).
                Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "12")
                    .body(http_body_util::Empty::new().boxed())
            }
        }
    };
    Ok(response.unwrap_or_else(|_| Response::new(http_body_util::Empty::new().boxed())))
}

/// A gRPC length-prefixed message (uncompressed).
fn grpc_frame(m: &impl Message) -> Bytes {
    let body = m.encode_to_vec();
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.put_u8(0);
    b.put_u32(u32::try_from(body.len()).unwrap_or(u32::MAX));
    b.put_slice(&body);
    b.freeze()
}

/// A gRPC client (tonic) on one HTTP/2 connection from a lab namespace.
pub struct GrpcClient {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

impl GrpcClient {
    /// Connects from inside namespace `ns` to `to`, with `timeout` for the
    /// connection and for each call.
    pub async fn connect(ns: &str, to: SocketAddr, timeout: Duration) -> Result<Self, tonic::Status> {
        let ns = ns.to_owned();
        let connector = tower::service_fn(move |_: hyper::Uri| {
            let ns = ns.clone();
            async move {
                let stream = connect_in(&ns, to, timeout)?;
                stream.set_nonblocking(true)?;
                Ok::<_, io::Error>(TokioIo::new(tokio::net::TcpStream::from_std(stream)?))
            }
        });
        let unavailable = |e: tonic::transport::Error| tonic::Status::unavailable(format!("{e:?}"));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{to}"))
            .map_err(unavailable)?
            .timeout(timeout)
            .connect_with_connector(connector)
            .await
            .map_err(unavailable)?;
        Ok(Self { grpc: tonic::client::Grpc::new(channel) })
    }

    /// Calls `method` of [`ECHO_SERVICE`] with these metadata entries.
    pub async fn echo(&mut self, method: &str, metadata: &[(&str, &str)]) -> Result<EchoResponse, tonic::Status> {
        self.grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let mut req = tonic::Request::new(EchoRequest {});
        for (k, v) in metadata {
            let key = tonic::metadata::AsciiMetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|e| tonic::Status::invalid_argument(format!("{k}: {e}")))?;
            let value = v.parse().map_err(|e| tonic::Status::invalid_argument(format!("{k}: {e:?}")))?;
            req.metadata_mut().insert(key, value);
        }
        let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!("/{ECHO_SERVICE}/{method}"))
            .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
        let codec = tonic_prost::ProstCodec::<EchoRequest, EchoResponse>::default();
        self.grpc.unary(req, path, codec).await.map(tonic::Response::into_inner)
    }
}
