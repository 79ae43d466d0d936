"""Maps iterated to a fixed point: slot attention, toy maps with known answers, and an nn.Module adapter."""

from ._map import Map, Params, StepFn
from .module import BufferMutationError, NotAStepError, from_module
from .slot_attention import init_slot_attention_params, sample_slots, slot_attention, slot_attention_step
from .toy import gradient_step, linear, random_matrix_with_radius, tanh_rnn

__all__ = [
    "BufferMutationError",
    "Map",
    "NotAStepError",
    "Params",
    "StepFn",
    "from_module",
    "gradient_step",
    "init_slot_attention_params",
    "linear",
    "random_matrix_with_radius",
    "sample_slots",
    "slot_attention",
    "slot_attention_step",
    "tanh_rnn",
]
