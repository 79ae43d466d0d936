"""`ImplicitSlotAttention`: a drop-in slot attention module whose backward estimator is chosen by name."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import Tensor, nn

from ._checks import check_inputs
from .autograd import fixed_point
from .errors import ConvergenceWarning, NonFiniteError, ShapeError
from .estimators import CostRecord, Estimator, get_estimator
from .forward import ForwardSolver, Iterate, get_forward
from .maps import Map, init_slot_attention_params, sample_slots, slot_attention, slot_attention_step
from .results import warn


@dataclass(frozen=True)
class SolvedState:
    """What a forward solved, for the penalties of `fpgrad.contraction`: J = d step(params, z, x) / dz at z.

    step: step(params, z, x); params: the module's parameters (live: a penalty built from them is
    differentiable in them); x: the inputs as given (on the caller's tape); z: the output slots, detached (the
    state the adjoint estimators linearise at; the tape estimators' last step starts one iterate earlier).
    """

    step: Callable
    params: dict[str, Tensor]
    x: Tensor
    z: Tensor


def _inside_torch_func_transform() -> bool:
    """Whether a torch.func transform (grad, vjp, vmap, ...) is active (eager code only)."""
    return not torch.compiler.is_compiling() and torch._C._functorch.peek_interpreter_stack() is not None


class ImplicitSlotAttention(nn.Module):
    """Slot attention (Locatello et al. 2020) refined to a fixed point and differentiated by `backward`.

    inputs: [B, N, input_dim] -> slots [B, num_slots, dim].
    backward: "unrolled" (backprop through the iterations), "one_step" (Chang et al. 2022: detach, one
    more step), "one_step_st" (straight-through to the slot init), "implicit" / "implicit-gmres" /
    "implicit-bicgstab" ..., "neumann-K", "phantom-K", "truncated-K", or an Estimator object.
    iters: applications of the step in training; eval_iters: in evaluation (default: iters). With tol=None
    the slots are exactly `iters` plain iterations from the initial slots for every estimator (one-step
    runs iters - 1 without the tape and the last on it, so the forward output does not depend on the
    backward choice); with a tol the forward stops per sample at tol (iters is then the cap) using
    `forward` ("iterate" | "anderson" | "broyden").
    forward(inputs, return_info=True) also returns a CostRecord with the forward residuals and costs.

    slot_embedding=True: a learned vector e_k per slot (N(0, 1) at init), added to slot k's normalised state
    before its query. Without it the step is equivariant under permuting the slots, so a fixed point that is
    unique (as a contraction's is) has every slot the same, and training at z* cannot separate objects
    (reports/discovery/arms/README.md); with it slot k is slot k, and a unique fixed point can keep the slots
    apart. The slot count is then fixed at num_slots.

    Contraction penalties: after a forward, `module.last` is a `SolvedState` (step, params, x, z), and
    `fpgrad.contraction.spectral_penalty(module, state=state)` / `frobenius_penalty(module, generator=g)` take
    the module (or a model holding one) directly:  loss = task + 0.1 * spectral_penalty(model, state=state).
    `last` holds the inputs (and so their graph) until the next forward; it is None before the first forward
    and after one run inside a torch.func transform (vmap), whose tensors cannot leave it.

    DistributedDataParallel: every sample is solved on its own, so sharding the batch over ranks gives the
    single-process gradient of the mean loss. Parameters that backward leaves without a .grad are listed by
    `parameters_without_grad(...)` (the slot initialisation under one_step / truncated-K, or whenever
    `slots=` is passed); when it is not empty, wrap with `DDP(..., find_unused_parameters=True)`.
    `noise=` shards one draw of the initial slots' noise over ranks.

    torch.compile: `torch.compile(module)` works (fullgraph=False); compile_step=True also compiles the step
    on its own, so that every application of it inside the solver loops runs compiled code. Graph breaks
    (TORCH_LOGS=graph_breaks): for every backward but unrolled, one at the `fixed_point` call, whose solver
    loop stops on data (per-sample residuals) and runs eagerly, outside the graph, with the slots' finiteness
    check (with compile_step its steps run compiled); for unrolled, one at that check (a host sync); one more when
    the initial slots are drawn from a `generator` (pass `noise=` or `slots=` to avoid it). Unrolled is
    traced whole (T steps, forward and backward). The adjoint estimators' products J^T v stay eager: they run
    under torch.func.vjp, and a compiled function called inside a torch.func transform falls back to eager
    and is never compiled again, so the compiled step is only called outside the transforms.
    """

    def __init__(self, dim: int, num_slots: int, iters: int = 3, backward: Union[str, Estimator] = "one_step",
                 *, eval_iters: int | None = None, input_dim: int | None = None,
                 hidden_dim: int | None = None, eps: float = 1e-8, tol: float | None = None,
                 forward: Union[str, ForwardSolver] = "iterate", seed: int | None = None,
                 compile_step: bool = False, slot_embedding: bool = False):
        super().__init__()
        self.dim, self.num_slots, self.eps = dim, num_slots, eps
        self.iters = iters
        self.eval_iters = iters if eval_iters is None else eval_iters
        self.input_dim = dim if input_dim is None else input_dim
        self.hidden_dim = max(dim, 128) if hidden_dim is None else hidden_dim
        self.tol = tol
        self.forward_method = forward
        self.backward_spec = backward
        get_estimator(backward, iters=iters)            # validate the name now, not at the first call
        self.compile_step = compile_step
        self.last: SolvedState | None = None
        self.slots_mu = nn.Parameter(torch.empty(1, 1, dim))
        self.slots_log_sigma = nn.Parameter(torch.empty(1, 1, dim))
        self.norm_input = nn.LayerNorm(self.input_dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(self.input_dim, dim, bias=False)
        self.to_v = nn.Linear(self.input_dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, self.hidden_dim), nn.ReLU(), nn.Linear(self.hidden_dim, dim))
        g = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        init = init_slot_attention_params(dim, self.input_dim, self.hidden_dim, generator=g)
        with torch.no_grad():
            for k, p in self.named_parameters():
                p.copy_(init[k])
        self.slot_embedding = None
        if slot_embedding:
            # one learned vector per slot, added before its query (see the class docstring)
            self.slot_embedding = nn.Parameter(torch.randn(num_slots, dim, generator=g))

    def __getstate__(self) -> dict:
        # copy.deepcopy / pickle: `last` refers to the caller's graph (non-leaf tensors cannot be deep-copied)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "last": None}

    def config(self) -> dict:
        """The constructor arguments (JSON-able) that rebuild this module."""
        backward = self.backward_spec if isinstance(self.backward_spec, str) else repr(self.backward_spec)
        return {"dim": self.dim, "num_slots": self.num_slots, "iters": self.iters, "eval_iters": self.eval_iters,
                "input_dim": self.input_dim, "hidden_dim": self.hidden_dim, "eps": self.eps, "tol": self.tol,
                "backward": backward, "compile_step": self.compile_step,
                "slot_embedding": self.slot_embedding is not None,
                "forward": self.forward_method if isinstance(self.forward_method, str) else "iterate"}

    def save_checkpoint(self, path) -> None:
        """Save config + state_dict (atomically), loadable with `ImplicitSlotAttention.load_checkpoint`."""
        import io

        from ._io import atomic_write_bytes
        buffer = io.BytesIO()
        torch.save({"kind": "fpgrad.ImplicitSlotAttention", "config": self.config(),
                    "state_dict": self.state_dict()}, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load_checkpoint(cls, path, map_location=None) -> ImplicitSlotAttention:
        """Rebuild a module saved by `save_checkpoint`."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        if not isinstance(ckpt, dict) or ckpt.get("kind") != "fpgrad.ImplicitSlotAttention":
            raise ValueError(f"{path} is not an ImplicitSlotAttention checkpoint (saved with save_checkpoint)")
        module = cls(**ckpt["config"])
        module.load_state_dict(ckpt["state_dict"])
        return module

    def functional_params(self) -> dict[str, Tensor]:
        return dict(self.named_parameters())

    def as_map(self) -> Map:
        """The module's current parameters as an fpgrad Map (detached), for analysis and studies."""
        params = {k: v.detach() for k, v in self.named_parameters()}
        return slot_attention(self.dim, self.num_slots, input_dim=self.input_dim, hidden_dim=self.hidden_dim,
                              eps=self.eps, params=params)

    @property
    def compile_step(self) -> bool:
        """Whether the step runs as a torch.compile'd function (settable: e.g. on a module inside a model)."""
        return self._compiled_step is not None

    @compile_step.setter
    def compile_step(self, value: bool) -> None:
        eps = self.eps

        def step(params, z, x):
            return slot_attention_step(params, z, x, eps=eps)
        self._compiled_step = torch.compile(step) if value else None

    def _step(self, params, z, x):
        # the compiled step only outside torch.func transforms (the adjoint's VJPs): called inside one,
        # torch.compile falls back to eager and marks the function as never to be compiled again
        if self._compiled_step is not None and not torch.compiler.is_compiling() \
                and not _inside_torch_func_transform():
            return self._compiled_step(params, z, x)
        return slot_attention_step(params, z, x, eps=self.eps)

    def _solve_named(self, params, inputs: Tensor, z0: Tensor, solver, est, record, where: str, inside: bool) -> Tensor:
        """fixed_point, then one finiteness check of the slots; a NaN/Inf is blamed on the input, initial slots or
        parameter that holds one, else on the step (a function of its own: torch.compile breaks the graph at
        its call and traces the rest of forward)."""
        try:
            z = fixed_point(self._step, params, inputs, z0, forward=solver, backward=est, record=record,
                            batched=True, check=False)
        except NonFiniteError:
            if not inside:
                self._name_nonfinite_input(params, z0, inputs, where)
            raise
        if not inside and not math.isfinite(float(z.detach().sum())):
            self._name_nonfinite_input(params, z0, inputs, where)
            raise NonFiniteError(
                f"{where}: the slots came out NaN/Inf although the inputs, the initial slots and every parameter "
                "are finite: the step overflowed. Lower the learning rate or clip gradients, and check "
                "rho(J) at the slots (fpgrad.spectral.spectral_radius or fpgrad.contraction.spectral_penalty)")
        return z

    @staticmethod
    def _name_nonfinite_input(params, z0: Tensor, inputs: Tensor, where: str) -> None:
        """Raise the error naming the input, initial slots or parameter that holds NaN/Inf (if one does)."""
        check_inputs(params, z0, inputs, where=where, check_values=True, z_name="initial slots", x_name="inputs")

    def _solver(self, iters: int, measure_last: bool = True, measure: bool = True) -> ForwardSolver:
        if self.tol is None:
            return Iterate.exactly(iters, measure_last=measure_last, measure=measure)
        # the solver's own warning would name its max_iter; this module's knobs are iters / tol / forward
        return get_forward(self.forward_method, tol=self.tol, max_iter=iters, warn=False)

    def _warn_unconverged(self, record: CostRecord, iters: int) -> None:
        """Warn (ConvergenceWarning) when the forward stopped at its cap short of tol, naming this module's knobs."""
        if not record.forward:
            return
        fp = record.forward[-1]
        bad = ~fp.converged.reshape(-1)
        if not bool(bad.any()):
            return
        worst = float(fp.relative_residual.reshape(-1)[bad].max())
        method = self.forward_method if isinstance(self.forward_method, str) else type(self.forward_method).__name__
        alternative = "or forward='anderson' / 'broyden'" if method == "iterate" else "or another forward="
        warn(f"ImplicitSlotAttention: {int(bad.sum())} of {bad.numel()} sample(s) did not reach tol {self.tol:g} "
             f"in iters={iters} steps of forward={method!r} (worst relative residual {worst:.2e}); raise iters "
             f"(eval_iters in evaluation), loosen tol, {alternative}", ConvergenceWarning)

    def estimator(self) -> Estimator:
        return get_estimator(self.backward_spec, iters=self.iters if self.training else self.eval_iters)

    def parameters_without_grad(self, slots_given: bool = False) -> list[str]:
        """Names of the parameters a training backward leaves with .grad None: under the estimators that
        differentiate by the tape, the slot initialisation (slots_mu, slots_log_sigma) when they detach the
        initial slots (one_step, truncated-K after a solve) or when the slots are passed in (`slots=`). The
        adjoint estimators (implicit, neumann-K, phantom-K) give every parameter a gradient (the
        initialisation an exact zero) unless the slots are passed in, when the initialisation is not used at
        all and stays None, as autograd leaves it. Not empty: DDP needs find_unused_parameters=True."""
        est = get_estimator(self.backward_spec, iters=self.iters)
        if est.adjoint:
            return ["slots_mu", "slots_log_sigma"] if slots_given else []
        if slots_given or not est.reaches_initial_state:
            return ["slots_mu", "slots_log_sigma"]
        return []

    def forward(self, inputs: Tensor, slots: Tensor | None = None, *, noise: Tensor | None = None,
                generator: torch.Generator | None = None, return_info: bool = False):
        """inputs: [B, N, input_dim] -> slots [B, num_slots, dim].

        Initial slots: `slots` [B, K, dim] as given, else mu + exp(log_sigma) * noise with `noise` [B, K, dim]
        (e.g. a rank's shard of one draw, under DDP), else K = num_slots of them with noise from `generator`.
        """
        where = "ImplicitSlotAttention"
        if inputs.dim() != 3 or inputs.shape[-1] != self.input_dim:
            raise ShapeError(f"{where}: inputs must be [B, N, {self.input_dim}], got {tuple(inputs.shape)}")
        params = self.functional_params()
        if slots is not None and noise is not None:
            raise ValueError(f"{where}: give the initial slots (slots=) or their noise (noise=), not both")
        if slots is not None or noise is not None:
            name, given = ("slots", slots) if slots is not None else ("noise", noise)
            if given.dim() != 3 or given.shape[0] != inputs.shape[0] or given.shape[-1] != self.dim:
                raise ShapeError(f"{where}: {name} must be [B, K, dim] = [{inputs.shape[0]}, K, {self.dim}] for "
                                 f"inputs of batch {inputs.shape[0]}, got {tuple(given.shape)}")
        if slots is not None:
            z0 = slots
        elif noise is not None:
            z0 = params["slots_mu"] + params["slots_log_sigma"].exp() * noise
        else:
            z0 = sample_slots(params, inputs.shape[0], self.num_slots, generator)
        inside = _inside_torch_func_transform()
        # dtypes and devices now (no tensor op); values only when the slots come out non-finite, so that a healthy
        # training step pays one finiteness check of its output, not one per parameter (a vmapped tensor has no
        # single truth value: values are checked outside torch.func transforms)
        check_inputs(params, z0, inputs, where=where, check_values=False, z_name="initial slots", x_name="inputs")
        iters = self.iters if self.training else self.eval_iters
        est = self.estimator()
        record = CostRecord()
        # `iters` counts every application of the step, whatever the estimator: one-step and truncated
        # estimators apply their last 1 / k steps on the tape, so the untaped solve runs that many fewer
        solve_iters = iters
        if self.tol is None:
            solve_iters = max(iters - est.taped_steps_after_solve, 0)
        # under torch.compile the solver loop runs eagerly, outside the graph (see the class docstring)
        # steps taped after the solve evaluate f(z_T) anyway: the solve does not evaluate it once more to measure
        # and with nobody to read the record (no return_info) the untaped loop keeps none: this module checks the
        # finiteness of its output slots itself (_solve_named), the loop need not check z_T as well
        taped_after = bool(est.taped_steps_after_solve)
        solver = self._solver(solve_iters, measure_last=not taped_after, measure=return_info or not taped_after)
        z = self._solve_named(params, inputs, z0, solver, est, record, where, inside)
        # (straight into __dict__: nn.Module.__setattr__'s parameter / module / buffer lookups cost ~7 us a call)
        self.__dict__["last"] = None if inside else SolvedState(self._step, params, inputs, z.detach())
        if self.tol is not None and not inside:
            self._warn_unconverged(record, iters)
        return (z, record) if return_info else z
