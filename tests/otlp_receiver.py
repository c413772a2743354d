#!/usr/bin/env python3
"""Minimal OTLP receiver for weft's tests.

weft exports flow logs and spans over OTLP. The tests start this receiver in place
of a real OpenTelemetry collector and then read what arrived. It serves:

* OTLP/gRPC: LogsService.Export and TraceService.Export on --grpc-port;
* OTLP/HTTP with protobuf bodies (optional, --http-port): POST /v1/logs and
  POST /v1/traces with content-type application/x-protobuf (gzip bodies accepted).

Every log record and span received is appended to --out as one JSON object per
line, flushed at once, so a test can poll the file. Once both servers listen it
prints "READY grpc=<port> http=<port>" (http=0 when HTTP is off; a port given as
0 is reported as the one actually bound). SIGTERM or SIGINT stops it cleanly.

To exercise client behaviour:
  --delay-ms N    sleep N ms before answering each export (a slow collector);
  --fail-first N  answer the first N export calls, counted across logs and traces
                  and across gRPC and HTTP, with UNAVAILABLE (gRPC) or 503 (HTTP);
                  nothing from a refused call is recorded;
  --reject N,M,...  answer export calls with an OTLP partial success claiming N (then M,
                  ..., cycling; any integer, also negative or more than were sent) log
                  records or spans rejected; the first that many (as far as they exist)
                  are not recorded.

To exercise TLS and headers:
  --tls-cert F --tls-key F   serve HTTPS with this certificate and key (PEM; OTLP/HTTP only);
  --record-header NAME       add the request's NAME header (HTTP) or metadata (gRPC) to
                             each record, under "headers" (repeatable);
  --require-header NAME=VALUE  refuse calls without exactly this header (an API key, as a
                             vendor endpoint does): 401 (HTTP) or UNAUTHENTICATED (gRPC),
                             counted in the file as {"kind": "refused", ...} lines.

Needs the PyPI packages opentelemetry-proto, grpcio and protobuf.
"""

import argparse
import gzip
import json
import signal
import ssl
import socket
import sys
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2 as logs_pb
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2_grpc as logs_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc


def any_value(v):
    """Turn an OTLP AnyValue into a plain Python value (None when unset)."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attrs(v.kvlist_value.values)
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which)


def attrs(key_values):
    return {kv.key: any_value(kv.value) for kv in key_values}


def body_text(v):
    value = any_value(v)
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def log_records(req):
    for rl in req.resource_logs:
        resource = attrs(rl.resource.attributes)
        for sl in rl.scope_logs:
            for r in sl.log_records:
                yield {
                    "kind": "log", "resource": resource, "scope": sl.scope.name,
                    "time_unix_nano": r.time_unix_nano,
                    "observed_time_unix_nano": r.observed_time_unix_nano,
                    "severity_number": r.severity_number,
                    "severity_text": r.severity_text,
                    "body": body_text(r.body),
                    "attributes": attrs(r.attributes),
                    "trace_id": r.trace_id.hex(), "span_id": r.span_id.hex(),
                }


def span_records(req):
    for rs in req.resource_spans:
        resource = attrs(rs.resource.attributes)
        for ss in rs.scope_spans:
            for s in ss.spans:
                yield {
                    "kind": "span", "resource": resource, "scope": ss.scope.name,
                    "name": s.name,
                    "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                    "parent_span_id": s.parent_span_id.hex(),
                    "span_kind": s.kind,
                    "start_time_unix_nano": s.start_time_unix_nano,
                    "end_time_unix_nano": s.end_time_unix_nano,
                    "attributes": attrs(s.attributes),
                    "status_code": s.status.code,
                }


class Receiver:
    """What both transports share: the output file, the delay and the failure budget."""

    def __init__(self, out_path, delay_ms, fail_first, record_headers=(), require=None, reject=()):
        self.reject = list(reject)
        self.calls = 0
        self.record_headers = list(record_headers)
        self.require = require
        self.out = open(out_path, "a", encoding="utf-8")
        self.delay = delay_ms / 1000.0
        self.fail_left = fail_first
        self.lock = threading.Lock()

    def should_fail(self):
        """Sleep the configured delay, then tell whether this call is to be refused."""
        if self.delay:
            time.sleep(self.delay)
        with self.lock:
            if self.fail_left > 0:
                self.fail_left -= 1
                return True
            return False

    def headers_of(self, get):
        """The recorded headers, given a lookup by lower-case name."""
        return {h: get(h) for h in self.record_headers} if self.record_headers else None

    def authorized(self, protocol, get):
        """Whether the call carries the required header; a refusal is written down."""
        if self.require is None or get(self.require[0]) == self.require[1]:
            return True
        with self.lock:
            self.out.write(json.dumps({"kind": "refused", "protocol": protocol}) + "\n")
            self.out.flush()
        return False

    def rejecting(self):
        """The rejected count this call claims (None: a full success)."""
        if not self.reject:
            return None
        with self.lock:
            n = self.reject[self.calls % len(self.reject)]
            self.calls += 1
            return n

    def record(self, protocol, records, headers=None, rejected=None):
        records = list(records)
        if rejected is not None:
            records = records[max(0, rejected):]
        with self.lock:
            for rec in records:
                rec = {"kind": rec["kind"], "protocol": protocol, **rec}
                if headers is not None:
                    rec["headers"] = headers
                self.out.write(json.dumps(rec) + "\n")
            self.out.flush()

    def close(self):
        with self.lock:
            self.out.close()


class GrpcLogs(logs_grpc.LogsServiceServicer):
    def __init__(self, rx):
        self.rx = rx

    def Export(self, request, context):
        md = dict(context.invocation_metadata())
        if not self.rx.authorized("grpc", md.get):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "otlp_receiver: --require-header")
        if self.rx.should_fail():
            context.abort(grpc.StatusCode.UNAVAILABLE, "otlp_receiver: --fail-first")
        rejected = self.rx.rejecting()
        self.rx.record("grpc", log_records(request), self.rx.headers_of(md.get), rejected)
        return logs_response(rejected)


class GrpcTraces(trace_grpc.TraceServiceServicer):
    def __init__(self, rx):
        self.rx = rx

    def Export(self, request, context):
        md = dict(context.invocation_metadata())
        if not self.rx.authorized("grpc", md.get):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "otlp_receiver: --require-header")
        if self.rx.should_fail():
            context.abort(grpc.StatusCode.UNAVAILABLE, "otlp_receiver: --fail-first")
        rejected = self.rx.rejecting()
        self.rx.record("grpc", span_records(request), self.rx.headers_of(md.get), rejected)
        return trace_response(rejected)


def logs_response(rejected):
    r = logs_pb.ExportLogsServiceResponse()
    if rejected is not None:
        r.partial_success.rejected_log_records = rejected
        r.partial_success.error_message = "otlp_receiver: --reject"
    return r


def trace_response(rejected):
    r = trace_pb.ExportTraceServiceResponse()
    if rejected is not None:
        r.partial_success.rejected_spans = rejected
        r.partial_success.error_message = "otlp_receiver: --reject"
    return r


# path -> (request type, response maker, record extractor)
HTTP_ROUTES = {
    "/v1/logs": (logs_pb.ExportLogsServiceRequest, logs_response, log_records),
    "/v1/traces": (trace_pb.ExportTraceServiceRequest, trace_response, span_records),
}


def make_http_handler(rx):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, code, body=b"", ctype="text/plain"):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            route = HTTP_ROUTES.get(self.path.split("?")[0])
            if route is None:
                return self.reply(404, b"unknown path\n")
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype != "application/x-protobuf":
                return self.reply(415, b"only application/x-protobuf is supported\n")
            request_type, response_of, extract = route
            try:
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                request = request_type.FromString(body)
            except (DecodeError, OSError) as e:
                return self.reply(400, f"bad request body: {e}\n".encode())
            if not rx.authorized("http", self.headers.get):
                return self.reply(401, b"otlp_receiver: --require-header\n")
            if rx.should_fail():
                return self.reply(503, b"otlp_receiver: --fail-first\n")
            rejected = rx.rejecting()
            rx.record("http", extract(request), rx.headers_of(self.headers.get), rejected)
            self.reply(200, response_of(rejected).SerializeToString(), "application/x-protobuf")

        def log_message(self, format, *args):  # keep test output quiet
            pass

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--http-port", type=int)
    p.add_argument("--out", required=True, help="JSON-lines file to append to")
    p.add_argument("--bind", default="127.0.0.1")
    p.add_argument("--delay-ms", type=int, default=0)
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--tls-cert")
    p.add_argument("--tls-key")
    p.add_argument("--record-header", action="append", default=[])
    p.add_argument("--require-header")
    p.add_argument("--reject", default="")
    args = p.parse_args()

    require = None
    if args.require_header:
        name, _, value = args.require_header.partition("=")
        require = (name.strip().lower(), value)
    rx = Receiver(args.out, args.delay_ms, args.fail_first,
                  [h.lower() for h in args.record_header], require,
                  [int(n) for n in args.reject.split(",") if n.strip()])
    ipv6 = ":" in args.bind

    # grpcio sets SO_REUSEPORT by default, which would let two receivers share a port.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.so_reuseport", 0)])
    logs_grpc.add_LogsServiceServicer_to_server(GrpcLogs(rx), server)
    trace_grpc.add_TraceServiceServicer_to_server(GrpcTraces(rx), server)
    host = f"[{args.bind}]" if ipv6 else args.bind
    try:
        grpc_port = server.add_insecure_port(f"{host}:{args.grpc_port}")
    except RuntimeError:  # newer grpcio raises, older ones return 0
        grpc_port = 0
    if grpc_port == 0:
        sys.exit(f"otlp_receiver: cannot listen on {host}:{args.grpc_port}")

    http_server, http_port = None, 0
    if args.http_port is not None:
        server_class = type("Server", (ThreadingHTTPServer,),
                            {"address_family": socket.AF_INET6 if ipv6 else socket.AF_INET,
                             "daemon_threads": True})
        try:
            http_server = server_class((args.bind, args.http_port),
                                       make_http_handler(rx))
        except OSError as e:
            sys.exit(f"otlp_receiver: cannot listen on {host}:{args.http_port}: {e}")
        if args.tls_cert:
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            tls.load_cert_chain(args.tls_cert, args.tls_key)
            http_server.socket = tls.wrap_socket(http_server.socket, server_side=True)
        http_port = http_server.server_address[1]
        threading.Thread(target=http_server.serve_forever, daemon=True).start()
    server.start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"READY grpc={grpc_port} http={http_port}", flush=True)
    while not stop.wait(0.5):
        pass

    if http_server is not None:
        http_server.shutdown()
        http_server.server_close()
    server.stop(grace=1).wait()
    rx.close()


if __name__ == "__main__":
    main()
