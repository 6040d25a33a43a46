#!/usr/bin/env bash
# Builds .whl/site312.tar.xz: this package's dependencies for Python 3.12 on x86-64 Linux, for a GPU
# machine that has PyTorch (and numpy, scipy, pandas, pyarrow, matplotlib) but no package index.
# Ray's Java jars, RLlib, the LLM library and MLflow's web UI are left out to fit a 64 MiB transfer
# (about 51 MB). On the GPU machine:
#   mkdir -p /tmp/site && tar -xJf .whl/site312.tar.xz -C /tmp/site && PYTHONPATH=/tmp/site bash jobs/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
platforms=(--only-binary=:all: --python-version 3.12 --implementation cp --platform any)
for p in manylinux1 manylinux2014 manylinux_2_5 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28; do
  platforms+=(--platform "${p}_x86_64")
done
pip download -q "${platforms[@]}" -d "$work/wheels" 'ray[default,train,tune]==2.60.0' mlflow==3.17.2 pydantic pyyaml
# On the GPU image already, in versions that work with these.
for p in pyarrow scipy numpy pandas matplotlib scikit_learn pillow fonttools kiwisolver contourpy setuptools \
         py_spy virtualenv distlib joblib threadpoolctl narwhals cycler pyparsing python_dateutil six tzdata; do
  rm -f "$work/wheels/${p}"-*.whl
done
pip install -q --no-deps --no-compile "${platforms[@]}" --target "$work/site" "$work"/wheels/*.whl
rm -rf "$work"/site/ray/{jars,rllib,llm,tests} "$work"/site/mlflow/server/js "$work/site/bin"
find "$work/site" -name '*.js.map' -delete
mkdir -p .whl
tar -cf - -C "$work/site" . | xz -T0 -6 > .whl/site312.tar.xz
rm -rf "$work"
ls -l .whl/site312.tar.xz
