#!/usr/bin/env bash
# What the GPU check needs that the lent device's image lacks (ray, openai, pydantic and the
# few of their dependencies it does not hold), packed here under the device tool's 64 MiB
# carry limit, installed there without a network. docs/results.md, "GPU check", has the calls:
#   bash scripts/gpu_check_bundle.sh pack                 # here: writes .device-bundle/ (git-ignored)
#   bash scripts/gpu_check_bundle.sh install && PYTHONPATH=.device-bundle/site python3 scripts/gpu_check.py --out "$OUT/gpu-check"
# Ray's wheel (79 MB) is repacked without the parts a client-actor run never imports (Java
# jars, RLlib, Serve, Data, LLM, the dashboard's web client) and compressed with xz.
set -euo pipefail
cd "$(dirname "$0")/.."
B=.device-bundle
case "${1:-}" in
pack)
  rm -rf "$B" && mkdir -p "$B/wheels" "$B/ray"
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$B/wheels" \
    "ray==$(python -c 'import ray; print(ray.__version__)')" openai pydantic pydantic-core annotated-types typing-inspection distro jiter sniffio
  ray_wheel=$(ls "$B"/wheels/ray-*.whl)
  python -m zipfile -e "$ray_wheel" "$B/ray"
  rm -rf "$ray_wheel" "$B"/ray/ray/{jars,rllib,serve,data,llm} "$B/ray/ray/dashboard/client"
  chmod +x "$B"/ray/ray/core/src/ray/*/* 2>/dev/null || true  # zipfile drops the exec bits of raylet and gcs_server
  tar -C "$B/ray" -cf - . | xz -6 -T0 > "$B/ray.tar.xz"
  rm -rf "$B/ray"
  du -sh "$B" ;;
install)
  mkdir -p "$B/site"
  tar -C "$B/site" -xJf "$B/ray.tar.xz"
  python3 -m pip install -q --no-index --no-deps --target "$B/site" "$B"/wheels/*.whl
  PYTHONPATH="$B/site" python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .  # registers the methods' entry points
  PYTHONPATH="$B/site" python3 -c "import ray, openai, pydantic, bench.api; print('gpu-check bundle: ray', ray.__version__, 'methods', len(bench.api.available_methods()))" ;;
*)
  echo "usage: $0 pack | install" >&2; exit 2 ;;
esac
