#!/usr/bin/env bash
# Installs NVRTC (+ the CUDA headers it needs, + ptxas) from PyPI so that the kernels can be
# compiled to PTX on a machine with no GPU and no CUDA toolkit (CI, laptops).
#
# Where: ${ALLAM_CACHE:-$HOME/.cache/allam-serve}/cuda/13.0 (a `pip install --target` dir).
# Idempotent: if libnvrtc.so.13, cuda_bf16.h and ptxas are already there it installs nothing.
#
# Output (stdout) is shell `export` lines, so a CI runner can do
#     eval "$(scripts/install-nvrtc.sh)"
# and then `cargo test -p allam-kernels`. The variables:
#     ALLAM_NVRTC_LIB_DIR     directory holding libnvrtc.so.13 (+ libnvrtc-builtins)
#     ALLAM_CUDA_INCLUDE_DIR  directory holding cuda_bf16.h, cuda_fp16.h, ...
#     ALLAM_PTXAS             path of ptxas (optional stronger check: assemble for sm_90)
#     LD_LIBRARY_PATH         prefixed with ALLAM_NVRTC_LIB_DIR (the dynamic loader reads it at
#                             process start; allam-kernels also preloads by full path)
# Progress messages go to stderr.
set -euo pipefail

CUDA_SERIES="13.0"
root="${ALLAM_CACHE:-$HOME/.cache/allam-serve}/cuda/${CUDA_SERIES}"
# cu13 wheels put everything under nvidia/cu13/{lib,include,bin}.
lib_dir="$root/nvidia/cu13/lib"
inc_dir="$root/nvidia/cu13/include"
ptxas="$root/nvidia/cu13/bin/ptxas"

have_all() {
    [[ -e "$lib_dir/libnvrtc.so.13" && -e "$inc_dir/cuda_bf16.h" && -x "$ptxas" ]]
}

if have_all; then
    echo "install-nvrtc: already present in $root" >&2
else
    echo "install-nvrtc: installing NVRTC ${CUDA_SERIES} wheels into $root" >&2
    mkdir -p "$root"
    py="${PYTHON:-python3}"
    "$py" -m pip install --quiet --disable-pip-version-check --no-deps --upgrade \
        --target "$root" \
        "nvidia-cuda-nvrtc==${CUDA_SERIES}.*" \
        "nvidia-cuda-runtime==${CUDA_SERIES}.*" \
        "nvidia-cuda-nvcc==${CUDA_SERIES}.*" >&2
    if ! have_all; then
        echo "install-nvrtc: wheels installed but expected files are missing:" >&2
        echo "  $lib_dir/libnvrtc.so.13, $inc_dir/cuda_bf16.h, $ptxas" >&2
        find "$root/nvidia" -maxdepth 3 >&2 || true
        exit 1
    fi
    chmod +x "$ptxas" 2>/dev/null || true
fi

# NVRTC's loader name list (cudarc) starts with the unversioned name; give it one.
[[ -e "$lib_dir/libnvrtc.so" ]] || ln -sf libnvrtc.so.13 "$lib_dir/libnvrtc.so"

echo "export ALLAM_NVRTC_LIB_DIR='$lib_dir'"
echo "export ALLAM_CUDA_INCLUDE_DIR='$inc_dir'"
echo "export ALLAM_PTXAS='$ptxas'"
echo "export LD_LIBRARY_PATH='$lib_dir'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
