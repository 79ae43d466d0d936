"""Slot attention (Locatello et al. 2020) as a pure step function of explicit parameters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ._map import Map, Params


def slot_attention_step(params: Params, slots: Tensor, inputs: Tensor, *, eps: float = 1e-8) -> Tensor:
    """One slot attention iteration.   slots: [B, K, D], inputs: [B, N, D_in] -> [B, K, D].

    attn = softmax_K(q(LN(slots)) k(LN(inputs))^T / sqrt(D)) + eps, normalised over N;
    updates = attn v;  slots = GRU(updates, slots);  slots += MLP(LN(slots)).
    With params["slot_embedding"] ([K, D], `ImplicitSlotAttention(slot_embedding=True)`) slot k's query is
    q(LN(slots_k) + e_k): the step is then no longer equivariant under permuting the slots.
    """
    dim = slots.shape[-1]
    inputs = F.layer_norm(inputs, inputs.shape[-1:], params["norm_input.weight"], params["norm_input.bias"])
    k = inputs @ params["to_k.weight"].T                                          # [B, N, D]
    v = inputs @ params["to_v.weight"].T                                          # [B, N, D]
    slots_prev = slots
    slots = F.layer_norm(slots, (dim,), params["norm_slots.weight"], params["norm_slots.bias"])
    if "slot_embedding" in params:
        embedding = params["slot_embedding"]
        if embedding.shape[0] != slots.shape[-2]:
            from ..errors import ShapeError
            raise ShapeError(f"slot_attention_step: the slot embedding has {embedding.shape[0]} rows but the state "
                             f"has {slots.shape[-2]} slots; it needs one row per slot")
        slots = slots + embedding
    q = slots @ params["to_q.weight"].T                                           # [B, K, D]
    logits = torch.einsum("...kd,...nd->...kn", q, k) / math.sqrt(dim)
    attn = logits.softmax(dim=-2) + eps                                           # softmax over slots
    attn = attn / attn.sum(dim=-1, keepdim=True)                                  # weighted mean over inputs
    updates = torch.einsum("...kn,...nd->...kd", attn, v)
    slots = _gru_cell(updates, slots_prev, params)
    hidden = F.layer_norm(slots, (dim,), params["norm_mlp.weight"], params["norm_mlp.bias"])
    hidden = F.relu(hidden @ params["mlp.0.weight"].T + params["mlp.0.bias"])
    return slots + hidden @ params["mlp.2.weight"].T + params["mlp.2.bias"]


def _gru_cell(inp: Tensor, hidden: Tensor, params: Params) -> Tensor:
    """torch.nn.GRUCell's update, gates ordered (reset, update, new)."""
    gi = inp @ params["gru.weight_ih"].T + params["gru.bias_ih"]
    gh = hidden @ params["gru.weight_hh"].T + params["gru.bias_hh"]
    i_r, i_z, i_n = gi.chunk(3, dim=-1)
    h_r, h_z, h_n = gh.chunk(3, dim=-1)
    reset = torch.sigmoid(i_r + h_r)
    update = torch.sigmoid(i_z + h_z)
    new = torch.tanh(i_n + reset * h_n)
    return (1.0 - update) * new + update * hidden


def init_slot_attention_params(dim: int, input_dim: int | None = None, hidden_dim: int | None = None,
                               *, generator: torch.Generator | None = None,
                               dtype: torch.dtype = torch.float32, device=None) -> dict[str, Tensor]:
    """Parameters with the initialisations of torch.nn defaults (Linear, GRUCell, LayerNorm) and a
    Xavier-uniform slot mean and log-scale, as in the reference implementation."""
    din = dim if input_dim is None else input_dim
    hid = max(dim, 128) if hidden_dim is None else hidden_dim

    def uniform(shape, bound):
        return (torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound

    def xavier(shape):
        fan_in, fan_out = shape[-1], shape[-2]
        return uniform(shape, math.sqrt(6.0 / (fan_in + fan_out)))

    p = {
        "slots_mu": xavier((1, 1, dim)),
        "slots_log_sigma": xavier((1, 1, dim)),
        "norm_input.weight": torch.ones(din, dtype=torch.float64),
        "norm_input.bias": torch.zeros(din, dtype=torch.float64),
        "norm_slots.weight": torch.ones(dim, dtype=torch.float64),
        "norm_slots.bias": torch.zeros(dim, dtype=torch.float64),
        "norm_mlp.weight": torch.ones(dim, dtype=torch.float64),
        "norm_mlp.bias": torch.zeros(dim, dtype=torch.float64),
        "to_q.weight": uniform((dim, dim), 1 / math.sqrt(dim)),
        "to_k.weight": uniform((dim, din), 1 / math.sqrt(din)),
        "to_v.weight": uniform((dim, din), 1 / math.sqrt(din)),
        "gru.weight_ih": uniform((3 * dim, dim), 1 / math.sqrt(dim)),
        "gru.weight_hh": uniform((3 * dim, dim), 1 / math.sqrt(dim)),
        "gru.bias_ih": uniform((3 * dim,), 1 / math.sqrt(dim)),
        "gru.bias_hh": uniform((3 * dim,), 1 / math.sqrt(dim)),
        "mlp.0.weight": uniform((hid, dim), 1 / math.sqrt(dim)),
        "mlp.0.bias": uniform((hid,), 1 / math.sqrt(dim)),
        "mlp.2.weight": uniform((dim, hid), 1 / math.sqrt(hid)),
        "mlp.2.bias": uniform((dim,), 1 / math.sqrt(hid)),
    }
    return {k: v.to(dtype=dtype, device=device) for k, v in p.items()}


def sample_slots(params: Params, batch: int, num_slots: int, generator: torch.Generator | None = None) -> Tensor:
    """slots = mu + exp(log_sigma) * noise, noise ~ N(0, I):  [batch, num_slots, D]. Differentiable in params."""
    mu, log_sigma = params["slots_mu"], params["slots_log_sigma"]
    dim = mu.shape[-1]
    if generator is not None and generator.device != mu.device:
        noise = torch.randn(batch, num_slots, dim, generator=generator, dtype=mu.dtype).to(mu.device)
    else:
        noise = torch.randn(batch, num_slots, dim, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + log_sigma.exp() * noise


def slot_attention(dim: int = 64, num_slots: int = 5, seed: int = 0, *, input_dim: int | None = None,
                   hidden_dim: int | None = None, eps: float = 1e-8,
                   dtype: torch.dtype = torch.float32, device=None,
                   params: dict[str, Tensor] | None = None) -> Map:
    """The slot attention map: z = slots [B, num_slots, dim], x = encoded inputs [B, N, input_dim].

    Parameters are drawn from `seed` (or given as `params`, e.g. from a trained ImplicitSlotAttention);
    init_state samples slots from the learned Gaussian (mu, exp(log_sigma)).
    """
    if params is None:
        g = torch.Generator().manual_seed(int(seed))
        params = init_slot_attention_params(dim, input_dim, hidden_dim, generator=g, dtype=dtype, device=device)

    def step(p: Params, z: Tensor, x: Tensor) -> Tensor:
        return slot_attention_step(p, z, x, eps=eps)

    def init(p: Params, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if x.dim() == 2:
            return sample_slots(p, 1, num_slots, generator)[0]
        return sample_slots(p, x.shape[0], num_slots, generator)

    return Map(step, dict(params), init, event_ndim=2, name=f"slot-attention(dim={dim}, K={num_slots})",
               info={"dim": dim, "num_slots": num_slots, "seed": seed, "eps": eps})
