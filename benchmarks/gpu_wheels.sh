#!/usr/bin/env bash
# Here, with the package registry: the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no network
# (Python 3.12, x86-64; its own torch is used): pytest for the CUDA tests, pi0's small dependencies, and LeRobot 0.6.1
# with the pure-Python part of what its pi0 imports (22 MB), for the side-by-side LeRobot eager number. LeRobot's pi0
# also imports numpy, pillow, torchvision (built for the machine's torch) and gymnasium: 40 MB more than a device run
# carries beside the repository, so they must be the machine's own; where one is missing, the check's report says
# which import failed. Into .gpu_wheels/ (git-ignored; carry it).
#   bash benchmarks/gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.gpu_wheels}
mkdir -p "$dir"
PIP=${PIP:-.venv/bin/pip}
$PIP download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 -d "$dir" \
  pytest pluggy iniconfig packaging \
  "safetensors>=0.4.3" "sentencepiece>=0.2" "msgpack>=1.0.5" \
  lerobot==0.6.1 "transformers>=5.4,<5.6" "tokenizers>=0.22,<=0.23.0" "huggingface-hub>=1.6,<2" "einops>=0.8,<0.9" \
  "draccus>=0.11.6,<0.12" "mergedeep" "pyyaml" "pyyaml-include" "toml" "typing-inspect" "mypy-extensions" "regex" "tqdm" \
  "termcolor" "filelock" "fsspec" "httpx" "httpcore" "anyio" "h11" "sniffio" "certifi" "idna" "typer-slim" \
  "click" "shellingham"
du -sh "$dir"
