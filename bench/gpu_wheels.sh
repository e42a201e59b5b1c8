#!/usr/bin/env bash
# The wheels a GPU session carries (the device machines have torch and triton but no
# diffusers): diffusers and the two packages it needs that those machines lack, for their
# Python 3.12, into .whl/ (ignored by git; bench/gpu_session.sh installs what it finds there).
#   bash bench/gpu_wheels.sh            # the versions installed here (else the pins below)
# Then name .whl in the device call's carry (docs/gpu.md, "A GPU session").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
version() {  # version DIST DEFAULT: the installed version, else DEFAULT
  $PY -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print(sys.argv[2])" "$1" "$2"
}
rm -rf .whl && mkdir .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
  "diffusers==$(version diffusers 0.42.1)" \
  "importlib_metadata==$(version importlib_metadata 10.2.0)" \
  "lazy-importer==$(version lazy-importer 0.1.0)"
ls -l .whl
