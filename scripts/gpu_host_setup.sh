#!/usr/bin/env bash
# On the GPU host (no package index), after the vLLM 0.26 bundle is staged
# (../shared/gpu-host/README.md): makes coral-vllm importable and visible to vLLM's plugin
# loader without pip, installs carried wheels (.whl/: accelerate, for GGUF loading), points
# the dataset loaders at carried dataset wheels (.gpu-data/), converts the default target from
# the staged GGUF. Source it: `source scripts/gpu_host_setup.sh`.
source /root/coral-site/env.sh
REPO=$(pwd)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /root/coral-site .whl/*.whl
fi
# A minimal dist-info is all importlib.metadata needs to find the vllm.general_plugins
# entry point; the code itself is imported from the checkout on PYTHONPATH.
DI=/root/coral-site/coral_vllm-0.1.0.dist-info
mkdir -p "$DI"
printf 'Metadata-Version: 2.1\nName: coral-vllm\nVersion: 0.1.0\n' > "$DI/METADATA"
printf '[vllm.general_plugins]\ncoral = coral_vllm.serving.plugin:register\n' > "$DI/entry_points.txt"
mkdir -p /root/coral-kernels-pkg && ln -sfn "$REPO/kernels" /root/coral-kernels-pkg/coral_kernels
export PYTHONPATH=$REPO:/root/coral-kernels-pkg:$PYTHONPATH
[ -d "$REPO/.gpu-data" ] && export CORAL_VLLM_WHEELS=$REPO/.gpu-data
python3 -m coral_vllm.cli fetch-model --gguf /root/models/SmolLM2-135M-Instruct.Q4_1.gguf
