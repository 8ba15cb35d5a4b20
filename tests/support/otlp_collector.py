"""An OTLP/HTTP trace collector stand-in for the tests: decodes every
POST /v1/traces with the OpenTelemetry project's own protobuf definitions
(the `opentelemetry-proto` package) and prints one JSON line per span.

usage: otlp_collector.py MODE   (MODE: ok | fail | slow)
Prints `listening PORT` first.
"""
import http.server
import json
import sys
import threading
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

MODE = sys.argv[1] if len(sys.argv) > 1 else "ok"
# Requests are handled on threads: one line is written whole, under a
# lock (print() writes the text and the newline separately).
OUT = threading.Lock()


def emit(doc):
    with OUT:
        sys.stdout.write(json.dumps(doc) + "\n")
        sys.stdout.flush()


def value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        if MODE == "slow":
            time.sleep(30)
        if MODE == "fail":
            self.send_response(503)
            self.end_headers()
            return
        req = ExportTraceServiceRequest()
        req.ParseFromString(body)
        for rs in req.resource_spans:
            service = {a.key: value(a.value) for a in rs.resource.attributes}.get("service.name")
            for ss in rs.scope_spans:
                for s in ss.spans:
                    emit({
                        "service": service,
                        "scope": ss.scope.name,
                        "content_type": self.headers.get("content-type"),
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "status": s.status.code,
                        "events": [e.name for e in s.events],
                        "attributes": {a.key: value(a.value) for a in s.attributes},
                    })
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
