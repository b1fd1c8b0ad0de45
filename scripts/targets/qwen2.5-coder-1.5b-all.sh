# Qwen2.5-Coder-1.5B-Instruct on the `all` prompt mix (docs/qwen-target.md): the data lever.
# The code mix's 9,806 samples leave the drafter short (dev tau 2.26 after 5 epochs,
# flattening); the all mix (`coral-vllm train conversations`, 50,636 conversations, test
# sets excluded) holds the code mix's sources and the rest of the chat ones, ~5x the
# samples. Its own name, so its replies, runs and drafters never mix with the code run's.
: "${CORAL_NAME:=qwen2.5-coder-1.5b-all}"
: "${CORAL_CONVERSATIONS:=.gpu-data/up1/conversations.jsonl.xz}"
# The data (session 6, benchmarks/results/dataset_manifest_qwen2.5-coder-1.5b-all.json):
# 49,217 samples, 23.6M tokens an epoch. 2 epochs are 47.3M tokens, the code run's 44.8M:
# the same training budget over 5x the distinct samples, ~7 minutes at the code run's
# 109-124k tokens/s (computed), so features, training and the router stage fit one lease
# (a run's optimizer state is too large to travel between leases).
# The feature store is 23.6M x 1536 x 2 bytes = 72.6 GB: over the half of the free device
# memory that `auto` allows itself, so auto would put it on the host; on a 141 GB card it
# fits beside the target and a 32k-token step (the code run's store was 27.5 GB), so
# `device` keeps the gather off the host.
: "${CORAL_TRAIN_ARGS:=--epochs 2 --feature-store device}"
source "$(dirname "${BASH_SOURCE[0]}")/qwen2.5-coder-1.5b.sh"
