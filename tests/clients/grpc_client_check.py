"""A grpcio client generated with grpcio-tools from proto/allam/v1 against a running router.

Usage: python grpc_client_check.py REPO_ROOT HOST:PORT
"""
import os
import sys
import tempfile

from grpc_tools import protoc
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

repo, target = sys.argv[1], sys.argv[2]
out = tempfile.mkdtemp()
rc = protoc.main(["protoc", f"-I{repo}/proto", f"--python_out={out}", f"--grpc_python_out={out}",
                  f"{repo}/proto/allam/v1/generation.proto"])
assert rc == 0, "protoc failed"
sys.path.insert(0, out)
from allam.v1 import generation_pb2 as pb, generation_pb2_grpc as pb_grpc  # noqa: E402

channel = grpc.insecure_channel(target)
stub = pb_grpc.GenerationStub(channel)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1
    print(f"ok: {what}")


health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
check(health.status == health_pb2.HealthCheckResponse.SERVING, "grpc.health.v1 says SERVING")

for content in ["How do I prepare a cup of tea?", "كيف أجهز كوب شاهي؟"]:
    request = pb.ChatRequest(messages=[pb.Message(role="user", content=content)],
                             params=pb.SamplingParams(do_sample=False, max_new_tokens=12))
    unary = stub.Chat(request, timeout=60)
    check(len(unary.token_ids) == unary.usage.completion_tokens > 0, f"unary chat ({content})")
    chunks = list(stub.ChatStream(request, timeout=60))
    text = "".join(c.text for c in chunks)
    ids = [t for c in chunks for t in c.token_ids]
    check(text == unary.text and ids == list(unary.token_ids), "stream equals unary (greedy)")
    check(chunks[-1].usage.completion_tokens == unary.usage.completion_tokens, "usage on the last chunk")

try:
    stub.Chat(pb.ChatRequest(messages=[pb.Message(role="user", content="hi")],
                             params=pb.SamplingParams(top_p=1.5)), timeout=30)
    check(False, "top_p=1.5 must be rejected")
except grpc.RpcError as err:
    check(err.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in err.details(),
          f"INVALID_ARGUMENT names top_p: {err.details()}")

print(f"{checks} passed, 0 failed")
