# Qwen2.5-Coder-1.5B-Instruct on the `all` prompt mix (docs/qwen-target.md): the data lever.
# The code mix's 9,806 samples leave the drafter short (dev tau 2.26 after 5 epochs,
# flattening); the all mix (`coral-vllm train conversations`, 50,636 conversations, test
# sets excluded) holds the code mix's sources and the rest of the chat ones, ~5x the
# samples. Its own name, so its replies, runs and drafters never mix with the code run's.
: "${CORAL_NAME:=qwen2.5-coder-1.5b-all}"
: "${CORAL_CONVERSATIONS:=.gpu-data/up1/conversations.jsonl.xz}"
# 3 epochs of ~5x the data: ~3x the code run's 44.8M tokens (~19 minutes at its 120k tokens/s)
: "${CORAL_TRAIN_ARGS:=--epochs 3}"
source "$(dirname "${BASH_SOURCE[0]}")/qwen2.5-coder-1.5b.sh"
