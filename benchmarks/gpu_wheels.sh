#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its image has torch, lightning, torchmetrics, onnx, onnxruntime, but no MLflow),
# for its Python 3.12, into .whl/ (git-ignored via .git/info/exclude). Then, with the device tool:
#   run(carry=[".whl"], command="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD && make gpu-check PY=python3 STAMP=")
set -euo pipefail
cd "$(dirname "$0")/.."
ex="$(git rev-parse --git-common-dir)/info/exclude"; grep -qx "/.whl/" "$ex" 2>/dev/null || echo "/.whl/" >> "$ex"
rm -rf .whl /tmp/gpu-wheels && mkdir -p .whl /tmp/gpu-wheels
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
  -d /tmp/gpu-wheels "mlflow==3.17.2" "jsonargparse[signatures]>=4.27" "pycocotools>=2.0.7"
# captum needs torch, which the image has: fetch it alone
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d /tmp/gpu-wheels "captum>=0.7"
# drop what the GPU image already has (device/KINDS.md) so the carried tree stays under 64 MiB
have='torch|torchvision|torchaudio|triton|nvidia_|cuda_|numpy|scipy|pandas|pyarrow|matplotlib|scikit_learn|lightning|pytorch_lightning|torchmetrics|onnx|onnxruntime|pillow|protobuf|requests|urllib3|certifi|idna|charset_normalizer|packaging|pyyaml|PyYAML|jinja2|Jinja2|markupsafe|MarkupSafe|sympy|mpmath|networkx|fsspec|filelock|typing_extensions|six|python_dateutil|pytz|tzdata|kiwisolver|fonttools|cycler|contourpy|pyparsing|joblib|threadpoolctl|click|werkzeug|psutil|aiohttp|multidict|yarl|frozenlist|aiosignal|attrs|propcache|aiohappyeyeballs|anyio|h11|httpx|httpcore|pydantic_core_never'
for w in /tmp/gpu-wheels/*.whl; do
  base=$(basename "$w"); name=${base%%-*}
  if echo "$name" | grep -Eqix "($have)"; then continue; fi
  cp "$w" .whl/
done
du -sh .whl; ls .whl | wc -l
