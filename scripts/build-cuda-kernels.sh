#!/usr/bin/env bash
# Compiles native/kernels/cuda/*.cu into the fat binary the addon embeds (native/kernels/cuda/
# decoder_kernels.fatbin): cubins for Ampere (sm_80) and Hopper (sm_90), and PTX of the
# oldest so the driver can compile it for newer ones. Run it after changing a .cu file; the
# fat binary is committed, so building the addon never needs nvcc. The source's SHA-256 is written
# beside it, and a test fails when the two disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
source_file=native/kernels/cuda/decoder_kernels.cu
target=native/kernels/cuda/decoder_kernels.fatbin
arches=()
for sm in 80 90; do arches+=(-gencode "arch=compute_${sm},code=sm_${sm}"); done
arches+=(-gencode "arch=compute_80,code=compute_80")
"$NVCC" -fatbin -O3 --std=c++17 "${arches[@]}" -o "$target" "$source_file"
sha256sum "$source_file" | cut -d' ' -f1 > "$target.sha256"
# The addon embeds it with .incbin, which make does not track: mark its includer changed.
touch native/kernels/device_kernels.cc
echo "wrote $target ($(stat -c %s "$target") bytes)"
