#!/usr/bin/env bash
# The wheels benchmarks/gpu.py needs on a GPU machine that has torch, transformers, accelerate, pyarrow, pandas,
# numpy, huggingface-hub, tokenizers, psutil, jinja2, xxhash, tqdm and pyyaml but no TRL, DuckDB or datasets, and
# reaches no package index: downloaded here, for that machine's Python (3.12, x86-64 manylinux), into
# benchmarks/out/wheels/ (ignored by git, so it travels only when named), plus a wheel of this checkout's forkwatch.
#
#     benchmarks/gpu_wheels.sh                 # or: make gpu-wheels
#     PYTHON_VERSION=3.11 benchmarks/gpu_wheels.sh
#
# --no-deps and an explicit list: each name below is one that machine lacks, at the version the tests ran with
# (pyproject.toml's ranges: trl 1.16; datasets and its pins dill < 0.4.2, multiprocess < 0.70.20,
# fsspec <= 2026.9.0). The total must stay under what may travel with the working tree (64 MiB, the tree included).
set -euo pipefail

cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/python -m pip}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
DEST=${DEST:-benchmarks/out/wheels}
LIMIT_MIB=${LIMIT_MIB:-56}  # 64 MiB, less room for the working tree (about 1 MiB) and margin
WHEELS=(
  trl==1.16.0
  datasets==5.2.0
  duckdb==2.0.1
  dill==0.4.1
  multiprocess==0.70.19
  fsspec==2026.9.0
)

rm -rf "$DEST"
mkdir -p "$DEST"
# pip matches a manylinux tag exactly: every tag a wheel of these packages may carry is named
platforms=()
for tag in manylinux_2_17 manylinux2014 manylinux_2_24 manylinux_2_27 manylinux_2_28 manylinux_2_31 manylinux_2_34; do
  platforms+=(--platform "${tag}_x86_64")
done
$PIP download --quiet --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  "${platforms[@]}" -d "$DEST" "${WHEELS[@]}"
# forkwatch itself, from this checkout (pure Python: one wheel for every platform)
$PIP wheel --quiet --no-deps --no-build-isolation -w "$DEST" .
rm -rf build  # setuptools' staging folder

count=$(find "$DEST" -name '*.whl' | wc -l)
if [ "$count" -ne $((${#WHEELS[@]} + 1)) ]; then
  echo "expected $((${#WHEELS[@]} + 1)) wheels in $DEST, found $count:" >&2
  ls "$DEST" >&2
  exit 1
fi
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"
echo "$count wheels, $((total / 1024)) KiB in $DEST"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "over the ${LIMIT_MIB} MiB that may travel: carry fewer wheels (LIMIT_MIB overrides)" >&2
  exit 1
fi
