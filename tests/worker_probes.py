"""Functions the tests send into vLLM's workers (`LLM.collective_rpc`) to see what the
engine loaded and what it hands around. They return plain data (lists, numbers, strings):
the RPC layer carries nothing else across a process boundary."""

from __future__ import annotations


def plugin_state(worker) -> dict:
    """What register() installed in the worker's process."""
    import vllm.v1.sample.rejection_sampler as rs
    from vllm.engine.arg_utils import EngineArgs

    return {"config_wrapped": getattr(EngineArgs.create_speculative_config,
                                      "_coral_wrapped", False),
            "cpu_sampling": getattr(rs.expand_batch_to_tokens, "_coral_cpu_sampling", False)}


def record_draft_support(worker) -> None:
    """Wraps the hand-over of draft probabilities to the rejection sampler so each step
    records how many tokens have non-zero draft probability."""
    proposer = worker.model_runner.drafter
    proposer.coral_support = []
    take = proposer.take_last_draft_probs

    def recorded():
        probs = take()
        if probs is not None:
            proposer.coral_support.append(int((probs > 0).sum(-1).max()))
        return probs

    proposer.take_last_draft_probs = recorded


def draft_support(worker) -> list[int]:
    return worker.model_runner.drafter.coral_support


def drafter_in_worker(worker, h: list) -> dict:
    """The loaded drafter's weights and head outputs for features `h`."""
    import torch

    model = worker.model_runner.drafter.model
    params = {k: v.detach().float().cpu().tolist() for k, v in model.named_parameters()
              if not k.startswith(("lm_head", "model.embed_tokens"))}
    h = torch.tensor(h, dtype=model.grouped_weight.dtype, device=model.grouped_weight.device)
    with torch.no_grad():
        logits = model.compute_logits(h).cpu().tolist()
        top = model.get_top_tokens(h).cpu().tolist()
    return {"params": params, "logits": logits, "top": top}


def stale_head_check(worker, h: list) -> tuple[bool, str]:
    """Whether serving checked the grouped head (and found it filled), then the error
    once the head changes behind the copy's back, as if vLLM had shared the head without
    assigning `lm_head`. Breaks the engine's drafter: run it last."""
    import torch

    model = worker.model_runner.drafter.model
    checked = model._head_checked
    with torch.no_grad():
        model.lm_head.weight[: model.coral.vocab_size].mul_(2)
    model._head_checked = False
    try:
        model.get_top_tokens(torch.tensor(h, dtype=model.grouped_weight.dtype))
    except RuntimeError as e:
        return checked, str(e)
    return checked, ""


def served_head(worker, h: list) -> dict:
    """The served drafter's greedy path (`get_top_tokens`) and draft logits for features
    `h` (finite rows per token, and finite for every token), and whether it shares the
    target's own head."""
    import torch

    drafter, target = worker.model_runner.drafter.model, worker.model_runner.model
    h = torch.tensor(h, dtype=drafter.grouped_weight.dtype)
    with torch.no_grad():
        logits = drafter.compute_logits(h)
        top = drafter.get_top_tokens(h)
    return {"top": top.tolist(), "argmax": logits.argmax(-1).tolist(),
            "rows": torch.isfinite(logits).sum(-1).tolist(),
            "common_rows": int(torch.isfinite(logits).all(0).sum()),
            "shares_head": drafter.lm_head is target.lm_head}


def num_layers(worker) -> int:
    return len(worker.model_runner.drafter.model.model.layers)


def drafter_class(worker) -> str:
    return type(worker.model_runner.drafter.model).__name__


def head_kind(worker) -> tuple[str, bool, bool]:
    """The drafter's class, whether it has no router (static), no TP head (TP = 1)."""
    model = worker.model_runner.drafter.model
    return type(model).__name__, model.router is None, model.tp_head is None


def record_next_forward(worker) -> None:
    """Keeps the inputs and output of the drafter's next call."""
    model = worker.model_runner.drafter.model
    forward = model.forward

    def recorded(input_ids, positions, hidden_states, *args, **kwargs):
        out = forward(input_ids, positions, hidden_states, *args, **kwargs)
        if not hasattr(model, "coral_record"):
            model.coral_record = {"input_ids": input_ids.tolist(),
                                  "positions": positions.tolist(),
                                  "hidden_states": hidden_states.tolist(),
                                  "out": out[0].tolist()}
        return out

    model.forward = recorded


def record_next_fused_call(worker) -> None:
    """Keeps what a fused-feature drafter's next combine + forward read and returned."""
    model = worker.model_runner.drafter.model
    combine, forward = model.combine_hidden_states, model.forward
    model.coral_record = {}

    def recorded_combine(aux):
        out = combine(aux)
        model.coral_record.setdefault("aux", aux.tolist())
        model.coral_record.setdefault("combined", out.tolist())
        return out

    def recorded_forward(input_ids, positions, hidden_states, *args, **kwargs):
        out = forward(input_ids, positions, hidden_states, *args, **kwargs)
        if "out" not in model.coral_record:
            model.coral_record.update(input_ids=input_ids.tolist(),
                                      positions=positions.tolist(),
                                      hidden=hidden_states.tolist(),
                                      out=out[0].tolist(), next=out[1].tolist())
        return out

    model.combine_hidden_states, model.forward = recorded_combine, recorded_forward


def drafter_record(worker) -> dict:
    return worker.model_runner.drafter.model.coral_record


def gemma_drafter_probe(worker, h: list, ids: list) -> dict:
    """What the loaded drafter shares with the target, its fc over [shared embedding,
    feature], and its head."""
    import torch

    drafter, target = worker.model_runner.drafter.model, worker.model_runner.get_model()
    h = torch.tensor(h, dtype=drafter.grouped_weight.dtype)
    ids = torch.tensor(ids)
    with torch.no_grad():
        fc = drafter.model.fc(torch.cat([drafter.model.embed_tokens(ids), h], dim=-1))
        return {"shares_embedding": drafter.model.embed_tokens is target.model.embed_tokens,
                "shares_head": drafter.lm_head is target.lm_head,
                "fc": fc.tolist(), "logits": drafter.compute_logits(h).tolist(),
                "top": drafter.get_top_tokens(h).tolist()}


def record_first_drafter_input(worker) -> None:
    """Keeps the target features of the drafter's next call."""
    model = worker.model_runner.drafter.model
    forward = model.forward

    def recorded(*args, **kwargs):
        if not hasattr(model, "coral_first_features"):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[2]
            model.coral_first_features = h.clone()
        return forward(*args, **kwargs)

    model.forward = recorded


def first_drafter_input(worker) -> list:
    return worker.model_runner.drafter.model.coral_first_features.tolist()
