"""Offline training of CORAL drafters (plain PyTorch + transformers; no vLLM internals).

    config.py        TrainConfig (+ presets eagle / hass / coral)
    model.py         CoralDrafter: fc + N Llama layers + router, named exactly like the
                     exported checkpoint
    multi_step.py    HASS's n-step forward: each step reads the features the last predicted
    losses.py        feature regression, distillation through the head, CSRA, router CE
    schedule.py      the micro-batches of every step (over ranks), the learning rate
    run_dir.py       the run directory: resumable state, best checkpoint, metrics
    trainer.py       stage 1: the training loop (resumable, DDP under torchrun)
    validate.py      held-out accuracy and the offline chain tau, as training goes
    router_train.py  stage 2: partitions + router on the frozen drafter (recall@k)
    export.py        the plugin's drafter directory (`coral_vllm.format.checkpoint`)
    evaluate.py      offline mean acceptance length tau of exported drafters
    vllm_tau.py      the offline tau next to vLLM's counters on the same prompts
    cli.py           `coral-vllm train ...`

The data it trains on (prompts, self-distilled replies, token shards, target features)
is made by `coral_vllm.data`.
"""
