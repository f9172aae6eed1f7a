#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine of this project's kind:
# etcd (real etcd in cluster tests), protoc (etcd-client and allam-proto build scripts), the
# NVRTC + CUDA headers wheels (kernel compile checks without a GPU) and the Python clients
# (openai SDK, grpcio-tools) used as real third-party clients. Idempotent and quiet when done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v etcd >/dev/null 2>&1 || need_apt+=(etcd-server etcd-client)
command -v protoc >/dev/null 2>&1 || need_apt+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || need_apt+=(libprotobuf-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

scripts/install-nvrtc.sh >/dev/null

# Python clients for the real-client tests, in a cached venv.
cache="${ALLAM_CACHE:-$HOME/.cache/allam-serve}"
venv="$cache/pyclients"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import openai, grpc_tools, grpc_health' 2>/dev/null; then
  echo "install-deps: python clients into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check openai==1.* grpcio-tools==1.* grpcio-health-checking==1.*
fi
