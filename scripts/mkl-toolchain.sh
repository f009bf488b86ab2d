#!/usr/bin/env bash
# Unpacks Intel MKL's static libraries from PyPI (mkl-static, mkl-include) into ~/.cache/sdp-mkl once
# and prints the export for the optional `mkl` feature:
#   source <(bash scripts/mkl-toolchain.sh) && cargo build --release --features mkl
set -euo pipefail
VER=${MKL_VERSION:-2026.2.0}
DIR=${SDP_MKL_DIR:-$HOME/.cache/sdp-mkl}
ROOT=$DIR/mkl_static-$VER.data/data
if [ ! -f "$ROOT/lib/libmkl_core.a" ]; then
  mkdir -p "$DIR/wheels"
  python3 -m pip download --no-deps -d "$DIR/wheels" "mkl-static==$VER" "mkl-include==$VER" >&2
  for w in "$DIR"/wheels/mkl_static-"$VER"-*.whl "$DIR"/wheels/mkl_include-"$VER"-*.whl; do
    (cd "$DIR" && python3 -m zipfile -e "$w" .)
  done
  # Headers next to the libraries, so MKLROOT is one directory.
  cp -r "$DIR/mkl_include-$VER.data/data/include" "$ROOT/"
fi
echo "export MKLROOT=$ROOT"
