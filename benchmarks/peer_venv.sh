#!/usr/bin/env bash
# GPTQModel 7.7.0, the GPTQ peer that benchmarks/gptq.py and benchmarks/gptq_consumers.py compare
# against, in its own virtual environment: it needs a newer torch than compress is tested with, so it
# never goes into compress's own environment. CPU only: its CUDA extensions are not built.
# About 6 minutes on two quiet cores, 2 minutes of it CPU (torch 2.14.1 with its CUDA libraries is
# several GB to unpack); prints the environment's python on its last line. The first GPTQModel load
# after it compiles a small CPU extension (int4_qzero_group_scaled_cpu) into ~/.cache/gptqmodel.
#
#   bash benchmarks/peer_venv.sh [VENV]        # default /work/venvs/gptqmodel
#   python benchmarks/gptq.py --models smollm2 --peer "$(bash benchmarks/peer_venv.sh | tail -1)"
set -euo pipefail
# the checks run outside the repository, so that nothing in it can shadow a package of this environment

VENV="$(realpath -m "${1:-/work/venvs/gptqmodel}")"
TORCH="${PEER_TORCH_VERSION:-2.14.1}"
GPTQMODEL="${GPTQMODEL_VERSION:-7.7.0}"

if [ -x "$VENV/bin/python" ] && (cd / && GPTQMODEL_CPU_WORKERS=2 "$VENV/bin/python" -c \
    "import gptqmodel, optimum.gptq, safetensors, sys; sys.exit(gptqmodel.__version__ != '$GPTQMODEL')") >/dev/null 2>&1; then
  echo "$VENV/bin/python"
  exit 0
fi

python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install --quiet)
# torch first, pinned: gptqmodel accepts it, and pip would otherwise pick the newest release
nice -n 19 "${PIP[@]}" "torch==$TORCH"
# gptqmodel builds from its source distribution without build isolation, so its build tools must be
# in the environment already (setuptools comes with torch's install above)
nice -n 19 "${PIP[@]}" setuptools wheel ninja maturin
BUILD_CUDA_EXT=0 nice -n 19 "${PIP[@]}" "gptqmodel==$GPTQMODEL" --no-build-isolation
# it pulls transformers; optimum is what transformers' own GPTQ loader (from_pretrained) goes through
# to reach gptqmodel; safetensors for the consumers' logits files
nice -n 19 "${PIP[@]}" transformers optimum safetensors "torch==$TORCH"

# on a machine with few cores GPTQModel needs its worker count set, else it stops with
# "Virtual pool 'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"
(cd / && GPTQMODEL_CPU_WORKERS=2 "$VENV/bin/python" -c "from gptqmodel import GPTQModel") >/dev/null
echo "$VENV/bin/python"
