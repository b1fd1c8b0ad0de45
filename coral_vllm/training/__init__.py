"""Offline training of CORAL drafters (plain PyTorch + transformers; no vLLM internals).

    config.py        TrainConfig (+ presets eagle / hass / coral)
    target.py        frozen target: post-norm last hidden states (what vLLM feeds EAGLE)
    data.py          self-distilled data: prompts -> target responses -> token shards
    model.py         CoralDrafter: fc + one Llama layer (no input norm) + router, named
                     exactly like the exported checkpoint
    losses.py        EAGLE/HASS step loss, CSRA (InfoNCE across steps)
    trainer.py       stage 1 (multi-step, CSRA, resumable, DDP under torchrun)
    router_train.py  stage 2 (partitions + router, recall@k on held-out data)
    export.py        the plugin's drafter directory (coral_vllm.format.checkpoint)
    evaluate.py      offline mean acceptance length tau, router on/off
    cli.py           `coral-vllm train {data,train,router,export,eval}`
"""
