#!/usr/bin/env bash
# scripts/gpu-check.sh: the one command to run on a GPU machine (H100/H200, driver 580,
# CUDA 13, PyTorch + transformers in python3, NCCL wheel; no Rust, no internet).
# Prepare on the build machine with scripts/gpu-prep.sh, which fills the ignored folder .gpu/:
#     .gpu/allam            release binary (or .gpu/allam.gz, unpacked here)
#     .gpu/fixtures/        copy of ../shared/fixtures (tiny models + goldens)
#     .gpu/hf_baseline.py   copy of ../shared/bench/hf_baseline.py
# Then, on the GPU machine, from the repository root:   bash scripts/gpu-check.sh
# Whole run is capped at 6 minutes (GPU_CHECK_BUDGET_S, default 350 s); results go to
# ${GPU_CHECK_OUT:-${OUT:-.gpu/out}}/ (report.md, JSON, logs; $OUT is the device runner's
# folder that comes back) and the Markdown report to stdout.
#
# Stages (each logs to its own file; a failing stage does not stop the next):
#   0. environment: GPU, driver, CUDA libraries found (ldconfig, python nvidia wheels),
#      libnccl.so symlink, LD_LIBRARY_PATH, NVRTC + CUDA headers for the kernel compiler.
#   a. kernels vs the CPU twin on random inputs (bf16 tolerances are printed per op):
#          .gpu/allam gpu-selftest --device cuda:0 --json OUT
#      = allam_backend_cuda::selftest(0); exit 0 iff every OpCheck passed; --json writes the
#        OpChecks as a JSON array of {op, case, max_abs_err, worst_ratio, tolerance, passed, detail}.
#   b. goldens on the GPU, through the existing offline generator (no extra CLI needed):
#          .gpu/allam generate --device cuda --model .gpu/fixtures/<model> --requests R.jsonl
#      one request per golden case (greedy, 24 new tokens, logprobs 5, prompt_logprobs).
#      Checked here in Python: prompt ids exact; first-step top-5 logprobs (the last prompt
#      position's distribution) and prompt logprobs within 0.5 of the fp32 reference; greedy
#      ids identical up to the first step whose golden margin is < 0.5 (there the GPU token
#      must be in the golden top-5, and comparison stops). The same requests on --device cpu
#      are checked at 1e-3 / exact ids, which separates pipeline bugs from CUDA numerics.
#   n. NCCL with one rank (world size 1; the lent machines have one GPU, so more ranks cannot
#      run here): the stage-b golden requests again through a one-rank NCCL group,
#          .gpu/allam generate --device cuda --dist-backend nccl --model ... --requests R.jsonl
#      which joins NCCL (non-blocking init), runs every all-reduce through ncclAllReduce and
#      waits for each step under the NCCL watchdog. Checked against stage b's plain CUDA
#      output: prompt ids and greedy ids identical, logprobs within the same 0.5 (a one-rank
#      sum is the identity, so the printed difference should be 0).
#   g. CUDA graphs (--cuda-graphs, off by default until this stage passes): the stage-b golden
#      requests again with decode steps replayed from graphs, checked against stage b's plain
#      CUDA output like stage n (ids identical, logprobs within 0.5; graphs change only the
#      split-K partitioning, so the printed difference should be tiny), alone and in a
#      one-rank NCCL group (all-reduces captured inside the graphs); then, after stage c,
#      a short allam-7b run with graphs (batch-1 decode, concurrency 1,8,64) for the table.
#   c. benchmark, allam-7b dummy preset, then transformers on the same GPU in the same run:
#          .gpu/allam bench-engine --preset allam-7b --device cuda --ttft 128,512,2048 \
#              --decode-tokens 256 --concurrency 1,8,64,256 --input-len 512 --output-len 128 \
#              --json OUT
#      expected JSON: {"ttft_ms": {"128": ms, ...}, "batch1_decode_tok_s": x,
#                      "throughput_out_tok_s": {"1": x, "8": x, ...}}   (numbers or "OOM")
#          python3 .gpu/hf_baseline.py --preset allam-7b --out OUT
#      and a Markdown table: metric | allam-serve | transformers | ratio, plus the HBM roofline.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
GPU_DIR=$ROOT/.gpu
RES=${GPU_CHECK_OUT:-${OUT:-$GPU_DIR/out}}
BUDGET=${GPU_CHECK_BUDGET_S:-350}
mkdir -p "$RES"
START=$SECONDS
ALLAM=$GPU_DIR/allam
FIX=$GPU_DIR/fixtures
STATUS=()   # "stage: result" lines for the summary

log() { printf '[gpu-check %3ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
left() { echo $((BUDGET - (SECONDS - START))); }
# Seconds a stage may take: its cap, but never past the overall budget (keep 5 s for the report).
stage_limit() { local cap=$1 l; l=$(( $(left) - 5 )); (( l < cap )) && cap=$l; (( cap < 1 )) && cap=1; echo "$cap"; }

# ------------------------------------------------------------------------------------------
# 0. environment
log "machine: $(hostname) $(uname -m)"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | tee "$RES/gpu.txt" >&2
    GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
else
    log "nvidia-smi not found"
    GPU_NAME=unknown-gpu
fi
log "CUDA libraries known to ldconfig:"
ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|libcublas(Lt)?\.so|libnvrtc\.so|libnccl\.so|libcudart\.so' | sed 's/^/    /' >&2
PY_NVIDIA=$(python3 -c 'import nvidia, os; print("\n".join(nvidia.__path__))' 2>/dev/null || true)
log "python nvidia wheel roots: ${PY_NVIDIA:-none}"
command -v nvcc >/dev/null && log "nvcc: $(nvcc --version | tail -1)"

# Library dirs: python wheels (cu13 layout nvidia/cu13/lib, older nvidia/<pkg>/lib), toolkit.
LIBDIRS=()
for root in $PY_NVIDIA; do
    for d in "$root"/*/lib "$root"/cu13/lib; do [[ -d $d ]] && LIBDIRS+=("$d"); done
done
for d in /usr/local/cuda/lib64 /usr/local/cuda-13.0/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    [[ -d $d ]] && LIBDIRS+=("$d")
done
# cudarc looks for libnccl.so; the wheel ships only libnccl.so.2.
mkdir -p "$GPU_DIR/lib"
if ! ldconfig -p | grep -q 'libnccl\.so '; then
    for d in "${LIBDIRS[@]}"; do
        if [[ -e $d/libnccl.so.2 ]]; then ln -sf "$d/libnccl.so.2" "$GPU_DIR/lib/libnccl.so"; log "symlinked $GPU_DIR/lib/libnccl.so -> $d/libnccl.so.2"; break; fi
    done
fi
LD_PATHS=$GPU_DIR/lib
for d in "${LIBDIRS[@]}"; do LD_PATHS+=":$d"; done
export LD_LIBRARY_PATH="$LD_PATHS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

# NVRTC and the headers it needs (cuda_bf16.h), for the kernels compiled at start-up.
if [[ -z ${ALLAM_NVRTC_LIB_DIR:-} ]]; then
    for d in /usr/local/cuda/lib64 "${LIBDIRS[@]}"; do
        [[ -e $d/libnvrtc.so.13 ]] && { export ALLAM_NVRTC_LIB_DIR=$d; break; }
    done
fi
if [[ -z ${ALLAM_CUDA_INCLUDE_DIR:-} ]]; then
    cands=(/usr/local/cuda/include /usr/local/cuda-13.0/include /usr/local/cuda/targets/x86_64-linux/include)
    command -v nvcc >/dev/null && cands=("$(dirname "$(command -v nvcc)")/../include" "${cands[@]}")
    for root in $PY_NVIDIA; do cands+=("$root"/cu13/include "$root"/cuda_runtime/include); done
    for d in "${cands[@]}"; do
        [[ -e $d/cuda_bf16.h ]] && { export ALLAM_CUDA_INCLUDE_DIR=$(cd "$d" && pwd); break; }
    done
fi
export ALLAM_PTX_CACHE_DIR=${ALLAM_PTX_CACHE_DIR:-$GPU_DIR/ptx-cache}
log "ALLAM_NVRTC_LIB_DIR=${ALLAM_NVRTC_LIB_DIR:-NOT FOUND}"
log "ALLAM_CUDA_INCLUDE_DIR=${ALLAM_CUDA_INCLUDE_DIR:-NOT FOUND}"
for lib in libcuda.so.1 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libnccl.so; do
    found=$(python3 - "$lib" <<'PY' 2>/dev/null
import ctypes, sys
try:
    ctypes.CDLL(sys.argv[1]); print("loadable")
except OSError as e:
    print("MISSING (%s)" % e)
PY
)
    log "  $lib: ${found:-unknown}"
done

if [[ ! -x $ALLAM && -e $ALLAM.gz ]]; then gunzip -kf "$ALLAM.gz" && chmod +x "$ALLAM"; fi
if [[ ! -x $ALLAM ]]; then
    log "no $ALLAM: run scripts/gpu-prep.sh on the build machine first"
    STATUS+=("binary: MISSING .gpu/allam")
fi
has_cmd() { [[ -x $ALLAM ]] && "$ALLAM" "$1" --help >/dev/null 2>&1; }

# ------------------------------------------------------------------------------------------
# a. kernel self-check
if has_cmd gpu-selftest; then
    lim=$(stage_limit 100)
    log "stage a: allam gpu-selftest (limit ${lim}s)"
    timeout "$lim" "$ALLAM" gpu-selftest --device cuda:0 --json "$RES/selftest.json" >"$RES/selftest.log" 2>&1
    rc=$?
    grep -E '^(PASS|FAIL)' "$RES/selftest.log" >&2 || tail -20 "$RES/selftest.log" >&2
    STATUS+=("a. kernels vs CPU twin: $([[ $rc == 0 ]] && echo PASS || echo "FAIL (exit $rc, see selftest.log)")")
else
    STATUS+=("a. kernels vs CPU twin: NOT RUN (allam gpu-selftest not wired into the CLI)")
fi

# ------------------------------------------------------------------------------------------
# b. goldens
golden_requests() {  # $1 = goldens.json -> request lines on stdout
    python3 - "$1" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))
for c in g["cases"]:
    line = {"max_new_tokens": c["greedy"]["max_new_tokens"], "greedy": True, "logprobs": 5, "prompt_logprobs": True}
    if c["messages"] is not None:
        line["messages"] = c["messages"]
    else:
        line["prompt"] = c["prompt"]
    print(json.dumps(line, ensure_ascii=False))
PY
}
check_goldens() {  # $1 goldens.json, $2 generate output (JSON lines), $3 device label
    python3 - "$1" "$2" "$3" <<'PY'
import json, sys
g = json.load(open(sys.argv[1]))
outs = [json.loads(l) for l in open(sys.argv[2]) if l.strip().startswith("{")]
cpu = sys.argv[3] == "cpu"
tol = 1e-3 if cpu else 0.5
ok_all = True
if len(outs) != len(g["cases"]):
    print(f"  {len(outs)} results for {len(g['cases'])} cases"); sys.exit(1)
for c, o in zip(g["cases"], outs):
    msgs = []
    gr = c["greedy"]
    if o["prompt_token_ids"] != c["input_ids"]:
        msgs.append("prompt ids differ")
    # Distribution at the last prompt position = first generated step's top-5.
    first = o["logprobs"][0] if o["logprobs"] else None
    top_err = max(abs(t["logprob"] - r["logprob"]) for t, r in zip(first["top"], gr["top5"][0])) if first else float("inf")
    top_ids_ok = first is not None and [t["id"] for t in first["top"]] == [r["id"] for r in gr["top5"][0]]
    if top_err > tol or (cpu and not top_ids_ok):
        msgs.append(f"last-position top-5 logprobs off by {top_err:.4f}")
    pl = o.get("prompt_logprobs") or []
    pl_err = 0.0
    for t, ref in enumerate(c["prompt_logprobs"]):
        if ref is None or t >= len(pl) or pl[t] is None:
            continue
        pl_err = max(pl_err, abs(pl[t]["logprob"] - ref))
    if pl_err > tol:
        msgs.append(f"prompt logprobs off by {pl_err:.4f}")
    ids = o["token_ids"]
    step_note = ""
    for s, ref in enumerate(gr["ids"]):
        if s >= len(ids):
            msgs.append(f"only {len(ids)} tokens"); break
        if ids[s] == ref:
            if abs(o["logprobs"][s]["logprob"] - gr["logprobs"][s]) > tol:
                msgs.append(f"step {s} logprob off by {abs(o['logprobs'][s]['logprob'] - gr['logprobs'][s]):.4f}")
                break
            continue
        in_top5 = ids[s] in [t["id"] for t in gr["top5"][s]]
        if not cpu and gr["margins"][s] < 0.5 and in_top5:
            step_note = f" (diverged at step {s}, golden margin {gr['margins'][s]:.3f}: accepted)"
        else:
            msgs.append(f"greedy id differs at step {s}: {ids[s]} vs {ref} (margin {gr['margins'][s]:.3f})")
        break
    ok = not msgs
    ok_all &= ok
    print(f"  {'PASS' if ok else 'FAIL'} {c['id']:<16} top5 err {top_err:.4f} prompt-lp err {pl_err:.4f}{step_note} {'; '.join(msgs)}")
sys.exit(0 if ok_all else 1)
PY
}
if [[ -x $ALLAM && -d $FIX ]]; then
    gold_ok=1
    for model in tiny-allam tiny-allam-gqa; do
        gold=$FIX/$model/goldens.json
        [[ -e $gold ]] || { log "missing $gold"; gold_ok=0; continue; }
        golden_requests "$gold" >"$RES/goldens-$model.jsonl"
        for dev in cuda cpu; do
            lim=$(stage_limit 60)
            log "stage b: goldens $model on $dev (limit ${lim}s)"
            timeout "$lim" "$ALLAM" generate --device "$dev" --model "$FIX/$model" \
                --requests "$RES/goldens-$model.jsonl" >"$RES/goldens-$model-$dev.out" 2>"$RES/goldens-$model-$dev.log"
            rc=$?
            if [[ $rc != 0 ]]; then
                log "generate on $dev failed (exit $rc):"; tail -5 "$RES/goldens-$model-$dev.log" >&2
                gold_ok=0; continue
            fi
            check_goldens "$gold" "$RES/goldens-$model-$dev.out" "$dev" | tee "$RES/goldens-$model-$dev.check" >&2
            [[ ${PIPESTATUS[0]} == 0 ]] || gold_ok=0
        done
    done
    STATUS+=("b. goldens (tiny-allam, tiny-allam-gqa; cuda + cpu): $([[ $gold_ok == 1 ]] && echo PASS || echo FAIL)")
else
    STATUS+=("b. goldens: NOT RUN (no binary or no .gpu/fixtures)")
fi

# ------------------------------------------------------------------------------------------
# n. NCCL, one rank, against stage b's plain CUDA run
compare_runs() {  # $1 plain cuda output, $2 other output (JSON lines), $3 label
    python3 - "$1" "$2" "${3:-NCCL}" <<'PY'
import json, sys
def load(path):
    return [json.loads(l) for l in open(path) if l.strip().startswith("{")]
plain, nccl = load(sys.argv[1]), load(sys.argv[2])
label = sys.argv[3]
tol = 0.5
if not plain or len(plain) != len(nccl):
    print(f"  {len(nccl)} {label} results for {len(plain)} plain CUDA results"); sys.exit(1)
ok_all, worst = True, 0.0
for i, (p, n) in enumerate(zip(plain, nccl)):
    msgs = []
    if p["prompt_token_ids"] != n["prompt_token_ids"]:
        msgs.append("prompt ids differ")
    if p["token_ids"] != n["token_ids"]:
        s = next((k for k, (a, b) in enumerate(zip(p["token_ids"], n["token_ids"])) if a != b), min(len(p["token_ids"]), len(n["token_ids"])))
        msgs.append(f"greedy ids differ from step {s}")
    err = 0.0
    for a, b in zip(p.get("logprobs") or [], n.get("logprobs") or []):
        err = max(err, abs(a["logprob"] - b["logprob"]))
        err = max([err] + [abs(x["logprob"] - y["logprob"]) for x, y in zip(a["top"], b["top"])])
    for a, b in zip(p.get("prompt_logprobs") or [], n.get("prompt_logprobs") or []):
        if a is not None and b is not None:
            err = max(err, abs(a["logprob"] - b["logprob"]))
    if err > tol:
        msgs.append(f"logprobs differ by {err:.4f}")
    worst = max(worst, err)
    ok_all &= not msgs
    print(f"  {'PASS' if not msgs else 'FAIL'} request {i:<3} max logprob diff {err:.6f} {'; '.join(msgs)}")
print(f"  largest logprob difference {label} vs plain CUDA: {worst:.6f}")
sys.exit(0 if ok_all else 1)
PY
}
# Reruns stage b's golden requests for one model with other generate flags and compares the
# output with stage b's plain CUDA run (stages n and g).
#   $1 label, $2 model, $3 file stem, $4 cap (s), $5 log lines to echo (ERE, or ''),
#   then the generate flags. Non-zero when the run or the comparison fails.
rerun_against_plain() {
    local label=$1 model=$2 stem=$3 cap=$4 pattern=$5 lim rc
    shift 5
    local req=$RES/goldens-$model.jsonl plain=$RES/goldens-$model-cuda.out
    local out=$RES/$stem-$model
    [[ -s $req && -s $plain ]] || { log "$label: no stage-b CUDA output for $model to compare with"; return 1; }
    lim=$(stage_limit "$cap")
    log "$label: $model, generate $* (limit ${lim}s)"
    timeout "$lim" "$ALLAM" generate "$@" --model "$FIX/$model" --requests "$req" >"$out.out" 2>"$out.log"
    rc=$?
    [[ -n $pattern ]] && grep -E "$pattern" "$out.log" | sort | uniq -c | head -8 >&2
    if [[ $rc != 0 ]]; then
        log "generate $* failed (exit $rc):"; tail -5 "$out.log" >&2
        return 1
    fi
    compare_runs "$plain" "$out.out" "$label" | tee "$out.check" >&2
    return "${PIPESTATUS[0]}"
}
generate_has() { [[ -x $ALLAM && -d $FIX ]] && "$ALLAM" generate --help 2>/dev/null | grep -q -- "$1"; }
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

if generate_has --dist-backend; then
    nccl_ok=1
    for model in tiny-allam tiny-allam-gqa; do
        rerun_against_plain NCCL "$model" nccl 15 'NCCL (communicator|version)|NCCL INFO|NCCL WARN' \
            --device cuda --dist-backend nccl || nccl_ok=0
    done
    STATUS+=("n. NCCL world size 1 (tiny-allam, tiny-allam-gqa) vs plain CUDA: $([[ $nccl_ok == 1 ]] && echo PASS || echo FAIL)")
else
    STATUS+=("n. NCCL world size 1: NOT RUN (no binary, no fixtures, or no --dist-backend in this build)")
fi

# ------------------------------------------------------------------------------------------
# g. CUDA graphs against stage b's plain CUDA run, alone and with the all-reduces of a
# one-rank NCCL group captured inside the graphs
if generate_has --cuda-graphs; then
    graphs_ok=1
    for model in tiny-allam tiny-allam-gqa; do
        RUST_LOG=${RUST_LOG:-allam_backend_cuda=debug,info} rerun_against_plain "CUDA graphs" "$model" graphs 20 \
            'decode graph' --device cuda --cuda-graphs || graphs_ok=0
        if generate_has --dist-backend; then
            rerun_against_plain "CUDA graphs + NCCL" "$model" graphs-nccl 20 '' \
                --device cuda --cuda-graphs --dist-backend nccl || graphs_ok=0
        fi
    done
    STATUS+=("g. CUDA graphs, alone and with NCCL (tiny-allam, tiny-allam-gqa) vs plain CUDA: $([[ $graphs_ok == 1 ]] && echo PASS || echo FAIL)")
else
    STATUS+=("g. CUDA graphs: NOT RUN (no binary, no fixtures, or no --cuda-graphs in this build)")
fi

# ------------------------------------------------------------------------------------------
# c. benchmark: allam-serve, then transformers on the same GPU
if has_cmd bench-engine; then
    lim=$(stage_limit 150)
    log "stage c: allam bench allam-7b (limit ${lim}s)"
    timeout "$lim" "$ALLAM" bench-engine --preset allam-7b --device cuda --kv-cache-memory 40Gi --max-num-seqs 256 --ttft 128,512,2048 --decode-tokens 256 \
        --concurrency 1,8,64,256 --input-len 512 --output-len 128 --json "$RES/bench-allam.json" \
        >"$RES/bench-allam.log" 2>&1
    rc=$?
    STATUS+=("c. allam bench: $([[ $rc == 0 ]] && echo done || echo "FAIL (exit $rc, see bench-allam.log)")")
else
    STATUS+=("c. allam bench: NOT RUN (allam bench not wired into the CLI)")
fi
if [[ -e $GPU_DIR/hf_baseline.py ]]; then
    lim=$(stage_limit 150)
    batches=1,8,64,256
    # Leave room: at under two minutes drop the largest batches rather than time out.
    (( lim < 120 )) && batches=1,8
    log "stage c: transformers baseline (batches $batches, limit ${lim}s)"
    timeout "$lim" python3 "$GPU_DIR/hf_baseline.py" --preset allam-7b --batches "$batches" \
        --out "$RES/bench-hf.json" >"$RES/bench-hf.log" 2>&1
    rc=$?
    STATUS+=("c. transformers baseline: $([[ $rc == 0 ]] && echo done || echo "FAIL (exit $rc, see bench-hf.log)")")
else
    STATUS+=("c. transformers baseline: NOT RUN (no .gpu/hf_baseline.py)")
fi

if has_cmd bench-engine && "$ALLAM" bench-engine --help 2>/dev/null | grep -q -- '--cuda-graphs'; then
    lim=$(stage_limit 60)
    log "stage g: allam bench allam-7b with CUDA graphs (limit ${lim}s)"
    timeout "$lim" "$ALLAM" bench-engine --preset allam-7b --device cuda --cuda-graphs --kv-cache-memory 40Gi \
        --max-num-seqs 64 --ttft 128 --decode-tokens 256 --concurrency 1,8,64 --input-len 512 --output-len 128 \
        --json "$RES/bench-allam-graphs.json" >"$RES/bench-allam-graphs.log" 2>&1
    rc=$?
    STATUS+=("g. allam bench with CUDA graphs: $([[ $rc == 0 ]] && echo done || echo "FAIL (exit $rc, see bench-allam-graphs.log)")")
fi

# ------------------------------------------------------------------------------------------
# report
python3 - "$RES" "$GPU_NAME" "$(date -u +%Y-%m-%d)" "${STATUS[@]}" >"$RES/report.md" <<'PY'
import json, os, sys
out, gpu, date, status = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:
        return {}
a, h = load("bench-allam.json"), load("bench-hf.json")
def num(v):
    return v if isinstance(v, (int, float)) else None
def fmt(v, unit=""):
    if v is None: return "n/a"
    if isinstance(v, str): return v
    return f"{v:.1f}{unit}" if v < 100 else f"{v:.0f}{unit}"
def row(name, av, hv, higher_better=True, unit=""):
    an, hn = num(av), num(hv)
    ratio = "n/a"
    if an and hn:
        ratio = f"{(an / hn) if higher_better else (hn / an):.2f}x"
    return f"| {name} | {fmt(av, unit)} | {fmt(hv, unit)} | {ratio} |"
print(f"## GPU check {date}: {gpu}\n")
for s in status:
    print(f"- {s}")
print()
print(f"| metric ({gpu}) | allam-serve | transformers {h.get('torch', '')} eager+sdpa | allam / transformers |")
print("|---|---|---|---|")
bw = h.get("copy_bandwidth_GBps")
roof = h.get("roofline_decode_tok_s")
print(f"| HBM copy bandwidth (read+write, torch) | | {fmt(bw, ' GB/s')} | |")
print(f"| batch-1 decode roofline (weights / bandwidth) | {fmt(roof, ' tok/s')} | {fmt(roof, ' tok/s')} | |")
ad, hd = a.get("batch1_decode_tok_s"), h.get("batch1_decode_tok_s")
print(row("batch-1 decode tok/s", ad, hd))
if num(ad) and num(roof):
    print(f"| batch-1 decode, % of roofline | {100 * ad / roof:.0f}% | {100 * hd / roof:.0f}% | |" if num(hd) else f"| batch-1 decode, % of roofline | {100 * ad / roof:.0f}% | n/a | |")
for n in ("128", "512", "2048"):
    print(row(f"TTFT {n}-token prompt (ms, lower is better)", a.get("ttft_ms", {}).get(n), h.get("ttft_ms", {}).get(n), higher_better=False))
for b in ("1", "8", "64", "256"):
    print(row(f"output tok/s, concurrency {b}, 512 in / 128 out", a.get("throughput_out_tok_s", {}).get(b), h.get("throughput_out_tok_s", {}).get(b)))
g = load("bench-allam-graphs.json")
if g:
    print(row("batch-1 decode tok/s, CUDA graphs", g.get("batch1_decode_tok_s"), hd))
    for b in ("1", "8", "64"):
        print(row(f"output tok/s, concurrency {b}, CUDA graphs", g.get("throughput_out_tok_s", {}).get(b), h.get("throughput_out_tok_s", {}).get(b)))
PY
cat "$RES/report.md"
log "done in $((SECONDS - START))s; results in $RES"
# Exit status: 1 if a stage failed, 2 if a correctness stage (a, b) could not run, else 0.
for s in "${STATUS[@]}"; do [[ $s == *FAIL* ]] && exit 1; done
for s in "${STATUS[@]}"; do [[ $s == binary:* || ( $s == [ab].* && $s == *"NOT RUN"* ) ]] && exit 2; done
exit 0
