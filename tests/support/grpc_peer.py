"""A real gRPC server and client (grpcio) for the end-to-end tests.

No generated code: methods take and return raw bytes.

  grpc_peer.py server          → prints "PORT <n>", serves until stdin closes
  grpc_peer.py client TARGET   → calls through TARGET, prints one JSON line
"""
import json
import sys
import threading

import grpc


def unary(request, context):
    context.set_trailing_metadata((("x-served-by", "grpc-peer"),))
    return b"echo:" + request


def stream(request, context):
    for i in range(int(request.decode())):
        yield b"msg-%d" % i


def server():
    handler = grpc.method_handlers_generic_handler(
        "demo.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    from concurrent import futures

    s = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    s.add_generic_rpc_handlers((handler,))
    port = s.add_insecure_port("127.0.0.1:0")
    s.start()
    print("PORT %d" % port, flush=True)
    # Serve until the test closes our stdin (or kills us).
    threading.Thread(target=lambda: (sys.stdin.read(), s.stop(0)), daemon=True).start()
    s.wait_for_termination()


def client(target, authority):
    out = {}
    ch = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
    u = ch.unary_unary("/demo.Echo/Unary")
    resp, call = u.with_call(b"hello", timeout=10)
    out["unary"] = resp.decode()
    out["trailer"] = dict(call.trailing_metadata()).get("x-served-by")
    st = ch.unary_stream("/demo.Echo/Stream")
    out["stream"] = [m.decode() for m in st(b"5", timeout=10)]
    try:
        ch.unary_unary("/demo.Echo/Missing")(b"x", timeout=10)
        out["missing"] = "OK"
    except grpc.RpcError as e:
        out["missing"] = e.code().name
    print(json.dumps(out), flush=True)


def client_error(target, authority, method="Unary"):
    ch = grpc.insecure_channel(target, options=[("grpc.default_authority", authority)])
    try:
        ch.unary_unary("/demo.Echo/" + method)(b"x", timeout=10)
        print(json.dumps({"code": "OK"}))
    except grpc.RpcError as e:
        print(json.dumps({"code": e.code().name, "details": e.details()}), flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        server()
    elif mode == "client":
        client(sys.argv[2], sys.argv[3])
    elif mode == "hang":
        # For an app that never answers: the call waits on the proxy.
        client_error(sys.argv[2], sys.argv[3], "Hang")
    else:
        client_error(sys.argv[2], sys.argv[3])
