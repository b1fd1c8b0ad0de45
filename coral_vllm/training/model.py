"""The CORAL drafter in plain PyTorch, with exactly the checkpoint's parameter names.

    h = fc(cat([s * embed(x_{t+1}), f_t]))        fc.weight [d, 2d], no bias; s: embed_scale
    (the EAGLE drafter; the fused, EAGLE-3-style one: `CoralDrafter`'s docstring)
    for layer i = 0..N-1 (N = num_hidden_layers, default 1):
        residual = h; h = self_attn(input_layernorm(h))   layer 0: no input norm (EAGLE)
        residual = h + residual
        h = mlp(post_attention_layernorm(residual)) + residual
    out = h                                        -> feature predicting f_{t+1}
    logits = lm_head(out)                          (frozen target head, no final norm)

This is vLLM's `LlamaDecoderLayer` stack as its EAGLE Llama drafter runs it: there the
residual stream travels beside the layer output and each later layer's input norm adds it
first (`input_layernorm(h, residual)`, a fused add in float32), and the stack ends with
`h + residual`; in float32 that is the sum formed here at the end of every layer.
RMSNorm in float32 (x * rsqrt(mean(x^2) + eps), cast back, times weight),
neox-style RoPE (rotate_half) with the target's rope theta, GQA, causal attention,
SiLU-and-mul MLP, for every target: its config is `drafter_layer_config` of the target's
(`coral_vllm.format.drafter_config`: sizes and agreements from the target; s = sqrt(d)
for Gemma, whose model scales its embeddings so). Names (see
`coral_vllm.format.checkpoint.expected_shapes`): `fc.*`, `layers.i.*`, `norm.*` (fused
only), `router.w{1,2}.*`,
`partition.token_order`; the frozen `embed_tokens.*` and `lm_head.*` come from the target
and are not trained.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from coral_vllm.format.checkpoint import LAYER_PREFIXES, OWN_PREFIXES
from coral_vllm.format.config import NUM_GROUPS, CoralConfig
from coral_vllm.format.drafter_config import EMBED_SCALE, drafter_layer_config
from coral_vllm.format.drafter_config import fused_layers as config_fused_layers
from coral_vllm.format.partition import build_token_order, contiguous_order, group_of_token
from coral_vllm.head.router import Router


TRAINED_PREFIXES = LAYER_PREFIXES + OWN_PREFIXES
# A target layer's parameters `init_layer_from_target` leaves out: Qwen2's q/k/v biases
# (the drafter's Llama layer has none). The target's input norm of the drafter's layer 0
# is left out too: EAGLE's first layer has no input norm. Anything else is refused.
DROPPED_TARGET_PARAMS = tuple(f"self_attn.{p}_proj.bias" for p in "qkv")


def rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default"):
        raise NotImplementedError(
            f"rope_type {kind!r}: the training drafter implements default RoPE only "
            "(SmolLM2 / Llama-2 style); add the scaling to training/model.py.")
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


class RMSNorm(nn.Module):
    """vLLM's RMSNorm: normalise in float32, cast back, multiply by the weight."""

    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


# Attention kernels for training: not cuDNN's. cuDNN builds (and caches) a graph for
# every new (batch, length) shape, and batches here vary in both: an H200 profile
# (SmolLM2, session 4, a busy host) spent 65-70 ms of host time in each of the window's 30
# cuDNN attention calls against ~1.5 ms of kernel time. Flash (causal step 1) and the
# memory-efficient kernel (HASS masks) need no per-shape build; math for the CPU.
TRAINING_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                          SDPBackend.MATH]


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, head_dim: int, theta: float,
                 bias: bool = False, d_in: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        d_in = d_in or d
        self.q_proj = nn.Linear(d_in, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(d_in, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(d_in, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, d, bias=bias)
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Neox RoPE on [B, H, S, hd] with positions [B, S]."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq  # [B, S, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)   # [B, 1, S, hd]
        xf = x.float()
        return (xf * emb.cos() + rotate_half(xf) * emb.sin()).to(x.dtype)

    def forward(self, h: torch.Tensor, positions: torch.Tensor,
                past_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(output, this call's (k, v)). With `past_kv` (the keys/values of HASS steps
        1..j-1 over the same positions) attention follows :func:`hass_context_mask`;
        without, it is plain causal attention."""
        b, s, _ = h.shape
        q = self.q_proj(h).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, positions), self.rope(k, positions)
        kv = (k, v)
        mask = None
        if past_kv:
            k = torch.cat([pk for pk, _ in past_kv] + [k], dim=2)
            v = torch.cat([pv for _, pv in past_kv] + [v], dim=2)
            mask = hass_context_mask(s, len(past_kv) + 1, h.device)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        with sdpa_kernel(TRAINING_SDPA_BACKENDS):
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=mask is None)  # scale hd^-0.5
        return self.o_proj(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)), kv


def hass_context_mask(s: int, step: int, device=None) -> torch.Tensor:
    """HASS harmonized context: which keys the step-`step` query at t may read, [s, step*s].

    At inference the depth-j draft at position t started at u0 = t - j + 1: positions
    <= u0 hold keys made from target features (step 1), position u0 + i (i = 1..j-1)
    holds the key made at depth i + 1. So the query reads step-1 keys u <= t - j + 1 and
    the step-i key at u = t - j + i for i = 2..j (i = j: itself).
    """
    t = torch.arange(s, device=device).unsqueeze(1)
    u = torch.arange(s, device=device).unsqueeze(0)
    blocks = [u <= t - step + 1]
    blocks += [u == t - step + i for i in range(2, step + 1)]
    return torch.cat(blocks, dim=1)


class MLP(nn.Module):
    def __init__(self, d: int, inter: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, inter, bias=bias)
        self.up_proj = nn.Linear(d, inter, bias=bias)
        self.down_proj = nn.Linear(inter, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Llama decoder layer; without input_layernorm for EAGLE's layer 0."""

    def __init__(self, cfg: dict[str, Any], input_norm: bool = False,
                 attn_in: int | None = None) -> None:
        super().__init__()
        d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        if input_norm:
            self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(d, heads, cfg.get("num_key_value_heads") or heads,
                                   cfg.get("head_dim") or d // heads, rope_theta(cfg),
                                   bool(cfg.get("attention_bias", False)), attn_in)
        self.mlp = MLP(d, cfg["intermediate_size"], bool(cfg.get("mlp_bias", False)))
        self.post_attention_layernorm = RMSNorm(d, eps)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, past_kv=None):
        """(output, (k, v) of this call); see Attention.forward for past_kv."""
        residual = h
        if hasattr(self, "input_layernorm"):
            h = self.input_layernorm(h)
        h, kv = self.self_attn(h, positions, past_kv)
        # vLLM fuses this add into the norm (in float32); in float32 it is the same.
        residual = h + residual
        h = self.mlp(self.post_attention_layernorm(residual))
        return h + residual, kv


class FusedInputLayer(DecoderLayer):
    """EAGLE-3's layer 0 (vLLM `llama_eagle3.LlamaDecoderLayer`, layer_idx 0, default
    `norm_before_residual=False`): attention reads [input_layernorm(embedding),
    hidden_norm(h)] (2d wide); the residual stream starts from h itself."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__(cfg, input_norm=True, attn_in=2 * cfg["hidden_size"])
        self.hidden_norm = RMSNorm(cfg["hidden_size"], float(cfg.get("rms_norm_eps", 1e-6)))

    def forward(self, h: torch.Tensor, positions: torch.Tensor, past_kv=None,
                emb: torch.Tensor | None = None):
        residual = h
        x = torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1)
        a, kv = self.self_attn(x, positions, past_kv)
        residual = a + residual
        return self.mlp(self.post_attention_layernorm(residual)) + residual, kv


class CoralDrafter(nn.Module):
    """N-layer EAGLE drafter + CORAL router, named like the exported checkpoint.

    `num_layers`: the depth; by default a drafter's config keeps its own and a target's
    gives 1 (see `drafter_layer_config`). `fused_layers`: target layer ids whose hidden
    states an EAGLE-3-style drafter reads (vLLM's `eagle3` path): then

        h = fc(cat(aux_l for l in fused_layers))        fc.weight [d, k*d]  (combine)
        layer 0 = FusedInputLayer (attention over [norm(embed), norm(h)]), layers > 0 as above
        pre = stream after the last layer; out = norm(pre)   -> head, router, losses
        the next drafting step reads `pre` in place of h (vLLM's `aux_output`)

    by default a drafter's config keeps its own (`fused_layers` of its config), a target's
    gives None (EAGLE)."""

    def __init__(self, target_cfg: dict[str, Any], num_groups: int = NUM_GROUPS,
                 router_act: str = "silu", num_layers: int | None = None,
                 fused_layers: Sequence[int] | None = None) -> None:
        super().__init__()
        layer_cfg = drafter_layer_config(target_cfg, num_layers)
        d, vocab = layer_cfg["hidden_size"], layer_cfg["vocab_size"]
        self.cfg = dict(target_cfg)
        self.hidden_size, self.vocab_size = d, vocab
        self.embed_scale = layer_cfg[EMBED_SCALE]
        self.embed_tokens = nn.Embedding(vocab, d)
        self.fused_layers = (list(fused_layers) if fused_layers is not None
                             else config_fused_layers(target_cfg))
        fused = self.fused_layers is not None
        if fused and self.embed_scale != 1.0:
            raise ValueError("fused_layers: an EAGLE-3-style drafter RMS-normalises the "
                             "embedding, so a target that scales it (Gemma) is not supported")
        self.fc = nn.Linear((len(self.fused_layers) if fused else 2) * d, d, bias=False)
        self.num_layers = layer_cfg["num_hidden_layers"]
        self.layers = nn.ModuleList(
            [FusedInputLayer(layer_cfg) if fused and i == 0
             else DecoderLayer(layer_cfg, input_norm=i > 0) for i in range(self.num_layers)])
        if fused:
            self.norm = RMSNorm(d, float(layer_cfg.get("rms_norm_eps", 1e-6)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.router = Router(d, num_groups, act=router_act)
        self.partition = nn.Module()
        self.partition.register_buffer("token_order", contiguous_order(vocab))
        self.embed_tokens.requires_grad_(False)
        self.lm_head.requires_grad_(False)
        self.router.requires_grad_(False)  # the trainer turns it on (online router)

    # ------------------------------------------------------------------ weights
    def load_target_heads(self, target_model) -> None:
        """Copy (frozen) embed_tokens / lm_head from the target."""
        with torch.no_grad():
            self.embed_tokens.weight.copy_(target_model.get_input_embeddings().weight)
            self.lm_head.weight.copy_(target_model.get_output_embeddings().weight)

    def init_layer_from_target(self, target_model) -> None:
        """Start the N decoder layers from the target's last N layers (optional; EAGLE
        starts from random) and fc from 'pass the feature through'. Llama-layer targets,
        and Qwen2's, whose q/k/v biases are left out (with a warning saying so)."""
        if getattr(target_model.config, "hidden_act", None) != "silu":
            raise NotImplementedError("init_from_target copies a Llama (SiLU) target layer; "
                                      "this target's layer is another kind.")
        if self.fused_layers is not None:
            raise NotImplementedError("init_from_target with fused_layers: the fused layer 0 "
                                      "attends over [2d], no target layer has its shape; "
                                      "start it from random (drop --init-from-target).")
        src_layers = target_model.model.layers[-self.num_layers:]
        if len(src_layers) < self.num_layers:
            raise ValueError(f"num_layers={self.num_layers}: init_from_target needs as many "
                             f"target layers, the target has {len(src_layers)}.")
        dropped: set[str] = set()
        with torch.no_grad():
            for i, (src, dst) in enumerate(zip(src_layers, self.layers)):
                mine = dict(dst.named_parameters())
                extra = set(dict(src.named_parameters())) - set(mine)
                refused = sorted(extra - set(DROPPED_TARGET_PARAMS) - {"input_layernorm.weight"})
                if refused:
                    raise NotImplementedError(
                        f"init_from_target: the target's layer has {refused}, which the "
                        "drafter's Llama layer has no place for; start it from random "
                        "(drop --init-from-target).")
                dropped |= extra & set(DROPPED_TARGET_PARAMS)
                for name, p in mine.items():
                    p.copy_(src.get_parameter(name))
            if dropped:
                warnings.warn(f"init_from_target: the target layer's {sorted(dropped)} are "
                              "left out: the drafter's layer (vLLM's EAGLE Llama layer) has "
                              "no attention biases, so it starts from the target layer "
                              "without them and training adapts it.", stacklevel=2)
            d = self.hidden_size
            self.fc.weight.zero_()
            self.fc.weight[:, d:] += torch.eye(d)
            self.fc.weight[:, :d] += torch.eye(d)

    def drafter_state_dict(self) -> dict[str, torch.Tensor]:
        """What training changes: fc, the layers (and final norm), the router and its
        partition (not the frozen heads, which are the target's)."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith(TRAINED_PREFIXES)}

    # ------------------------------------------------------------------ vocabulary groups
    def choose_partition(self, strategy: str, token_counts: torch.Tensor) -> torch.Tensor:
        """A token order for `strategy` (frequency from `token_counts`, cluster from the
        LM head)."""
        return build_token_order(strategy, self.vocab_size, self.router.w2.out_features,
                                 token_counts=token_counts,
                                 lm_head=self.lm_head.weight.detach().float().cpu())

    def set_partition(self, token_order: torch.Tensor) -> None:
        self.partition.token_order.copy_(token_order.to(self.partition.token_order))

    def coral_config(self, top_k_groups: int, **kw: Any) -> CoralConfig:
        return CoralConfig.for_vocab(self.vocab_size, self.hidden_size,
                                     self.router.w2.out_features, top_k_groups, **kw)

    def group_of_token(self) -> torch.Tensor:
        """[V] group id of every token under the current partition (router labels)."""
        size = self.coral_config(1).group_size
        return group_of_token(self.partition.token_order.cpu(), size)

    # ------------------------------------------------------------------ forward
    def combine(self, features: torch.Tensor) -> torch.Tensor:
        """The target's features -> the hidden state a drafting step reads (vLLM's
        `combine_hidden_states`): fc over the fused layers; EAGLE reads f_t as it is."""
        return self.fc(features) if self.fused_layers is not None else features

    def step(self, input_ids: torch.Tensor, hidden: torch.Tensor,
             positions: torch.Tensor | None = None, past_kv=None):
        """One drafting step over combined `hidden` [B, S, d]: (output feature for the
        head, hidden state the next step reads, this call's (k, v) per layer)."""
        b, s = input_ids.shape
        if positions is None:
            positions = torch.arange(s, device=input_ids.device).expand(b, s)
        emb = self.embed_tokens(input_ids).to(hidden.dtype) * self.embed_scale
        fused = self.fused_layers is not None
        h = hidden if fused else self.fc(torch.cat([emb, hidden], dim=-1))
        kvs = []
        for i, layer in enumerate(self.layers):
            extra = {"emb": emb} if fused and i == 0 else {}
            h, kv = layer(h, positions, past_kv[i] if past_kv else None, **extra)
            kvs.append(kv)
        return (self.norm(h) if fused else h), h, kvs

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor,
                positions: torch.Tensor | None = None, past_kv=None,
                return_kv: bool = False):
        """Output features [B, S, d]; position t reads (x_{t+1}, f_t) and predicts f_{t+1}.

        `input_ids` [B, S] are the tokens ONE AHEAD of `features` [B, S, d] (fused:
        [B, S, k*d], the target layers concatenated); positions default to 0..S-1 (vLLM
        gives the drafter the rope position of f_t).
        Training only: `past_kv` = keys/values of earlier HASS steps (one list per
        layer); `return_kv` also returns this call's, to pass to the next step.
        """
        out, _, kvs = self.step(input_ids, self.combine(features), positions, past_kv)
        return (out, kvs) if return_kv else out


def build_drafter(target_cfg: dict[str, Any], num_groups: int, router_act: str,
                  tensors: dict[str, torch.Tensor], target_model, device=None,
                  dtype: torch.dtype | None = None, num_layers: int | None = None,
                  fused_layers: Sequence[int] | None = None,
                  selection: str = "router") -> CoralDrafter:
    """A CoralDrafter holding `tensors` (checkpoint names; the frozen heads come from
    `target_model`), in `dtype` on `device`, by default the target's: the target's
    features and the drafter then meet in one dtype (bf16 target + float32 drafter used
    to crash in fc with 'expected mat1 and mat2 to have the same dtype').
    `num_layers`, `fused_layers`: see CoralDrafter. selection "static": the checkpoint
    has no router (`router_shapes`), so none is required and `router` is None."""
    drafter = CoralDrafter(target_cfg, num_groups, router_act, num_layers, fused_layers)
    drafter.load_target_heads(target_model)
    missing, unexpected = drafter.load_state_dict(tensors, strict=False)
    optional = ("embed_tokens.", "lm_head.") + (("router.",) if selection == "static" else ())
    missing = [k for k in missing if not k.startswith(optional)]
    if unexpected or missing:
        raise ValueError(f"drafter tensors do not fit a {drafter.num_layers}-layer drafter: "
                         f"unexpected {unexpected}, missing {missing}")
    if selection == "static":
        drafter.router = None
    tparam = next(target_model.parameters())
    return drafter.to(device=device or tparam.device, dtype=dtype or tparam.dtype).eval()
