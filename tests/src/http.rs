//! A small HTTP/1.1 server and client for lab traffic. The server answers
//! with who it is and what addresses it saw, so a test can tell which backend
//! served a request and whether translation was transparent.
//!
//! Server paths: `/status/<code>` answers with that status; anything else 200.
//! With [`ServerOpts::echo`] the server plays the Gateway API conformance
//! suite's echo backend instead: a JSON description of the request it got
//! (path, host, method, headers) and of itself (namespace, pod), and the
//! response headers the request's `X-Echo-Set-Header` asks for, after the
//! delay its `delay` query parameter asks for (`?delay=1s`, `500ms`).

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::{Domain, Socket, Type};
use weft_agent::netns::{self, NetnsGuard};

/// How a server behaves.
#[derive(Clone, Debug, Default)]
pub struct ServerOpts {
    /// Reported in the `x-served-by` header and the body.
    pub name: String,
    /// Close after each response (the server closes first, so its side of
    /// each connection goes through TIME_WAIT).
    pub close_after_response: bool,
    /// IP_TRANSPARENT on the listener, like Envoy's `transparent: true`.
    pub transparent: bool,
    /// Answer like the conformance suite's echo backend, as this pod.
    pub echo: Option<EchoPod>,
}

/// Who an echo server says it is: the Pod it plays.
#[derive(Clone, Debug, Default)]
pub struct EchoPod {
    pub namespace: String,
    pub pod: String,
}

/// A running server; stops when dropped.
pub struct HttpServer {
    pub addr: SocketAddr,
    pub served: Arc<AtomicU64>,
    /// While above zero, each request is answered 503 and counts it down
    /// (to exercise retries).
    pub fail_next: Arc<AtomicU64>,
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Starts a server bound to `bind` inside the named network namespace.
    pub fn start(ns: &str, bind: SocketAddr, opts: ServerOpts) -> io::Result<Self> {
        let listener = listen_in(ns, bind, opts.transparent)?;
        let addr = listener.local_addr()?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let fail_next = Arc::new(AtomicU64::new(0));
        let thread = {
            let counters = Counters { served: served.clone(), fail_next: fail_next.clone() };
            let (listener, stop) = (listener.clone(), stop.clone());
            std::thread::spawn(move || accept_loop(&listener, &stop, &counters, &opts))
        };
        Ok(Self { addr, served, fail_next, listener, stop, thread: Some(thread) })
    }

    /// The listener (for handing its fd to the datapath's proxy map).
    pub fn listener(&self) -> &TcpListener {
        &self.listener
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocked accept().
        // SAFETY: shutdown on a valid socket fd.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A TCP listener bound to `bind` inside namespace `ns`, with IP_TRANSPARENT
/// if asked (as Envoy's `transparent: true` listeners have).
pub fn listen_in(ns: &str, bind: SocketAddr, transparent: bool) -> io::Result<TcpListener> {
    let _g = NetnsGuard::enter(&netns::named(ns))?;
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if transparent {
        set_transparent(&s)?;
    }
    s.bind(&bind.into())?;
    s.listen(1024)?;
    Ok(TcpListener::from(s))
}

fn set_transparent(s: &Socket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_TRANSPARENT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// What a server counts, shared with its owner.
#[derive(Clone)]
struct Counters {
    served: Arc<AtomicU64>,
    fail_next: Arc<AtomicU64>,
}

fn accept_loop(listener: &TcpListener, stop: &AtomicBool, counters: &Counters, opts: &ServerOpts) {
    while !stop.load(Ordering::SeqCst) {
        let Ok((stream, peer)) = listener.accept() else {
            continue;
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let (opts, counters) = (opts.clone(), counters.clone());
        std::thread::spawn(move || {
            let _ = serve(stream, peer, &opts, &counters);
        });
    }
}

fn serve(stream: TcpStream, peer: SocketAddr, opts: &ServerOpts, counters: &Counters) -> io::Result<()> {
    let local = stream.local_addr()?;
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some(req) = read_request(&mut reader)? else {
            return Ok(());
        };
        let failing = counters.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        let status = if failing {
            503
        } else {
            req.path.strip_prefix("/status/").and_then(|c| c.parse::<u16>().ok()).unwrap_or(200)
        };
        let mut extra = String::new();
        let (body, content_type) = match &opts.echo {
            Some(pod) => {
                if let Some(d) = echo_delay(&req.path) {
                    std::thread::sleep(d);
                }
                for (k, v) in echo_set_headers(&req) {
                    extra.push_str(&format!("{k}: {v}\r\n"));
                }
                (echo_body(&req, pod), "application/json")
            }
            None => (
                format!(
                    "name={} local={local} peer={peer} path={} version={}\n",
                    opts.name, req.path, req.header_version
                ),
                "text/plain",
            ),
        };
        let close = opts.close_after_response || req.close;
        let head = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nx-served-by: {}\r\n{extra}{}\r\n",
            reason(status),
            body.len(),
            opts.name,
            if close { "connection: close\r\n" } else { "" },
        );
        writer.write_all(head.as_bytes())?;
        writer.write_all(body.as_bytes())?;
        counters.served.fetch_add(1, Ordering::Relaxed);
        if close {
            writer.shutdown(Shutdown::Both)?;
            return Ok(());
        }
    }
}

/// The headers an echo backend is asked to answer with: the request's
/// `X-Echo-Set-Header`, comma-separated `Name:value` items.
fn echo_set_headers(req: &Request) -> Vec<(String, String)> {
    req.headers
        .iter()
        .filter(|(k, _)| k == "x-echo-set-header")
        .flat_map(|(_, v)| v.split(','))
        .filter_map(|item| item.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// How long an echo backend waits before answering: the request's `delay`
/// query parameter, a number of `ms` or `s` (at most a minute).
fn echo_delay(path: &str) -> Option<Duration> {
    let (_, query) = path.split_once('?')?;
    let value = query.split('&').find_map(|kv| kv.strip_prefix("delay="))?;
    let d = match value.strip_suffix("ms") {
        Some(ms) => Duration::from_millis(ms.parse().ok()?),
        None => Duration::from_secs(value.strip_suffix('s')?.parse().ok()?),
    };
    Some(d.min(Duration::from_secs(60)))
}

/// The echo backend's answer: the request as received, and the pod.
fn echo_body(req: &Request, pod: &EchoPod) -> String {
    let host = req.headers.iter().find(|(k, _)| k == "host").map(|(_, v)| v.as_str()).unwrap_or_default();
    echo_json(&req.method, &req.path, host, &req.headers, pod)
}

/// The JSON an echo backend answers with: the request (method, path with
/// query, host, headers by lower-case name with their values in arrival
/// order) and the pod. Shared by the HTTP/1.1 and HTTP/2 echo servers.
pub fn echo_json(method: &str, path: &str, host: &str, request_headers: &[(String, String)], pod: &EchoPod) -> String {
    let mut headers = serde_json::Map::new();
    for (k, v) in request_headers {
        let e = headers.entry(k.clone()).or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(a) = e {
            a.push(v.clone().into());
        }
    }
    serde_json::json!({
        "path": path,
        "host": host,
        "method": method,
        "headers": headers,
        "namespace": pod.namespace,
        "pod": pod.pod,
    })
    .to_string()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

struct Request {
    method: String,
    path: String,
    /// Every header, names in lower case, in arrival order.
    headers: Vec<(String, String)>,
    close: bool,
    /// The `x-version` header, echoed back (header-route tests).
    header_version: String,
}

fn read_request(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let method = line.split_whitespace().next().unwrap_or_default().to_owned();
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut headers = Vec::new();
    let mut close = line.contains("HTTP/1.0");
    let mut length = 0usize;
    let mut header_version = String::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            return Ok(None);
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "connection" {
                close = v.eq_ignore_ascii_case("close");
            } else if k == "content-length" {
                length = v.parse().unwrap_or(0);
            } else if k == "x-version" {
                header_version = v.to_owned();
            }
            headers.push((k, v.to_owned()));
        }
    }
    if length > 0 {
        let mut body = vec![0; length];
        r.read_exact(&mut body)?;
    }
    Ok(Some(Request { method, path, headers, close, header_version }))
}

/// A response as the client saw it.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// A header by (lower-case) name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Every value of a header (any case), joined by commas; None if absent.
    pub fn header_values(&self, name: &str) -> Option<String> {
        let name = name.to_ascii_lowercase();
        let values: Vec<&str> = self.headers.iter().filter(|(k, _)| *k == name).map(|(_, v)| v.as_str()).collect();
        (!values.is_empty()).then(|| values.join(","))
    }

    /// The body as JSON (an echo server's answer), or Null.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }

    /// A `key=value` field of the lab server's body.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.body.split_whitespace().find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
    }
}

/// An HTTP client connection.
pub struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Client {
    /// Connects from inside a namespace, optionally from a fixed source address.
    pub fn connect(ns: &str, to: SocketAddr, from: Option<SocketAddr>, timeout: Duration) -> io::Result<Self> {
        Self::from_stream(connect_from(ns, to, from, timeout)?, timeout)
    }

    /// Wraps an already connected stream.
    pub fn from_stream(stream: TcpStream, timeout: Duration) -> io::Result<Self> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// The peer address the kernel reports for this connection.
    pub fn peer(&self) -> io::Result<SocketAddr> {
        self.stream.peer_addr()
    }

    /// The local address of this connection.
    pub fn local(&self) -> io::Result<SocketAddr> {
        self.stream.local_addr()
    }

    /// Sends a GET and reads the response.
    pub fn get(&mut self, host: &str, path: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
        self.request("GET", host, path, headers)
    }

    /// Sends a request without a body and reads the response (a HEAD's has no body).
    pub fn request(&mut self, method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> io::Result<Response> {
        let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {host}\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        self.stream.write_all(req.as_bytes())?;
        read_response(&mut self.reader, method == "HEAD")
    }

    /// Ends the client's side (a FIN), as a client does after a response
    /// with `connection: close`.
    pub fn close_write(&self) -> io::Result<()> {
        self.stream.shutdown(std::net::Shutdown::Write)
    }

    /// Waits until the server closes its side (within the read timeout), so
    /// the server is the first to close whatever the scheduling.
    pub fn wait_closed(&mut self) -> io::Result<()> {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest)?;
        Ok(())
    }
}

/// A TCP connection to `to` made inside namespace `ns`.
pub fn connect_in(ns: &str, to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    connect_from(ns, to, None, timeout)
}

/// A TCP connection to `to` made inside namespace `ns`, optionally from a fixed source address.
fn connect_from(ns: &str, to: SocketAddr, from: Option<SocketAddr>, timeout: Duration) -> io::Result<TcpStream> {
    let _g = NetnsGuard::enter(&netns::named(ns))?;
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    if let Some(from) = from {
        s.set_reuse_address(true)?;
        s.bind(&from.into())?;
    }
    s.connect_timeout(&to.into(), timeout)?;
    Ok(TcpStream::from(s))
}

fn read_response(r: &mut impl BufRead, head: bool) -> io::Result<Response> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    let mut length = None;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
            if k == "content-length" {
                length = v.parse().ok();
            }
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
            headers.push((k, v));
        }
    }
    let body = if head {
        Vec::new()
    } else if chunked {
        let mut body = Vec::new();
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk size {size:?}")))?;
            let mut chunk = vec![0; n + 2]; // data and its CRLF
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
        body
    } else {
        let mut body = vec![0; length.unwrap_or(0)];
        r.read_exact(&mut body)?;
        body
    };
    Ok(Response { status, headers, body: String::from_utf8_lossy(&body).into_owned() })
}

/// One request on a new connection from a namespace: the response and the
/// client's view of the connection (local, peer).
pub fn get_once(
    ns: &str,
    to: SocketAddr,
    path: &str,
    timeout: Duration,
) -> io::Result<(Response, SocketAddr, SocketAddr)> {
    let mut c = Client::connect(ns, to, None, timeout)?;
    let (local, peer) = (c.local()?, c.peer()?);
    let r = c.get(&to.to_string(), path, &[("connection", "close")])?;
    Ok((r, local, peer))
}
