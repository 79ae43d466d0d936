"""The verdict of a spectral report: derived numbers (from the summary's own numbers only) and the words.

`derived_numbers` is the single place where the report derives anything (1 - rho, steps to a tolerance,
1 / sigma_min, ...); every such number goes into summary.json under "report", so that each number the
text shows can be found in the JSON file.
"""

from __future__ import annotations

import math
from typing import Any

from fpgrad.spectral._summary import SpectralSummary

from ._markdown import format_number as num

# unit roundoff of the dtypes a summary may name ("torch.float32" or "float32")
_EPS = {"float64": 2.0 ** -52, "float32": 2.0 ** -23, "float16": 2.0 ** -10, "bfloat16": 2.0 ** -7}
_IMAG_TOL = 1e-9          # an eigenvalue with |Im| above this (relative to max(1, |λ|)) is complex
_RATE_MATCH = 0.02        # empirical contraction rate "matches" ρ within this relative difference


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _argmax(values: list) -> int | None:
    idx = [i for i, v in enumerate(values) if _finite(v)]
    return max(idx, key=lambda i: values[i]) if idx else None


def _argmin(values: list) -> int | None:
    idx = [i for i, v in enumerate(values) if _finite(v)]
    return min(idx, key=lambda i: values[i]) if idx else None


def _at(values: list, i: int | None) -> float | None:
    if i is None or i >= len(values) or not _finite(values[i]):
        return None
    return float(values[i])


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def dtype_eps(dtype: str) -> float | None:
    """Unit roundoff of a dtype named like 'float32' or 'torch.float32'; None if unknown."""
    return _EPS.get(str(dtype).split(".")[-1])


def steps_to_tolerance(rho: float, tol: float) -> int | None:
    """Steps k with rho^k <= tol, i.e. ceil(log(tol) / log(rho)); None when rho >= 1 (never)."""
    if not (0.0 <= rho < 1.0):
        return None
    if rho == 0.0:
        return 1
    return max(1, math.ceil(math.log(tol) / math.log(rho) - 1e-9))


def derived_numbers(summary: SpectralSummary, tol: float = 1e-6) -> dict[str, Any]:
    """Every number the report shows that the summary does not hold itself (None where it cannot be derived)."""
    d: dict[str, Any] = {"tolerance": tol}
    radii = summary.spectral_radius
    finite = [float(r) for r in radii if _finite(r)]
    if not radii:
        d["verdict"] = "unknown"
    elif len(finite) == len(radii):
        d["verdict"] = "contractive" if max(finite) < 1.0 else "not contractive"
    else:
        d["verdict"] = "not contractive" if finite and max(finite) >= 1.0 else "unknown"
    d["samples_with_radius"] = len(finite)
    d["samples_without_radius"] = len(radii) - len(finite)
    i = _argmax(radii)
    d["max_spectral_radius_sample"] = i
    rho = _at(radii, i)
    d["max_spectral_radius"] = rho
    unc = _at(summary.spectral_radius_uncertainty, i)
    d["max_spectral_radius_uncertainty"] = unc
    if rho is not None:
        d["distance_from_one"] = 1.0 - rho
        d["excess_over_one"] = rho - 1.0
        d["samples_at_or_above_one"] = sum(r >= 1.0 for r in finite)
        d["max_spectral_radius_upper"] = rho + unc if unc is not None else None
        d["max_spectral_radius_lower"] = rho - unc if unc is not None else None
        d["steps_to_tolerance"] = steps_to_tolerance(rho, tol)

    j = _argmax(summary.lipschitz)
    d["max_lipschitz_sample"] = j
    d["max_lipschitz"] = _at(summary.lipschitz, j)

    k = _argmin(summary.sigma_min_I_minus_J)
    d["min_sigma_min_I_minus_J_sample"] = k
    sigma_min = _at(summary.sigma_min_I_minus_J, k)
    d["min_sigma_min_I_minus_J"] = sigma_min
    d["error_bound_factor"] = (1.0 / sigma_min) if sigma_min is not None and sigma_min > 0 else None
    c = _argmax(summary.condition_I_minus_J)
    d["max_condition_I_minus_J_sample"] = c
    cond = _at(summary.condition_I_minus_J, c)
    d["max_condition_I_minus_J"] = cond
    eps = dtype_eps(summary.dtype)
    d["dtype_eps"] = eps
    d["attainable_relative_error"] = cond * eps if cond is not None and eps is not None else None

    # symmetry evidence: complex eigenvalues, or ||J||_2 > rho in one sample (a symmetric J has ||J||_2 = rho)
    eigs = [ev for sample in summary.eigenvalues for ev in sample]
    d["eigenvalues_counted"] = len(eigs)
    d["complex_eigenvalues"] = sum(abs(im) > _IMAG_TOL * max(1.0, math.hypot(re, im)) for re, im in eigs)
    gaps = []
    for s in range(min(len(radii), len(summary.lipschitz))):
        r, lip = _at(radii, s), _at(summary.lipschitz, s)
        if r is not None and lip is not None:
            margin = (_at(summary.spectral_radius_uncertainty, s) or 0.0) + 1e-6 * max(1.0, lip)
            if lip > r + margin:
                gaps.append((lip / r if r > 0 else math.inf, s))
    d["non_normal_samples"] = len(gaps)
    d["non_normal_example_sample"] = max(gaps)[1] if gaps else None

    fwd = summary.forward or {}
    steps = [s for s in _as_list(fwd.get("steps")) if _finite(s)]
    converged = _as_list(fwd.get("converged"))
    d["forward_samples"] = len(converged) if converged else None
    d["forward_converged_samples"] = sum(bool(x) for x in converged) if converged else None
    d["forward_unconverged_samples"] = len(converged) - d["forward_converged_samples"] if converged else None
    d["forward_steps_min"] = min(steps) if steps else None
    d["forward_steps_max"] = max(steps) if steps else None
    q = _argmax(summary.contraction_rate)
    d["max_contraction_rate_sample"] = q
    d["max_contraction_rate"] = _at(summary.contraction_rate, q)
    d["final_residuals"] = [float(r[-1]) if r else None for r in summary.residuals]

    rows = summary.estimators
    d["estimators_descent"] = [str(r.get("estimator")) for r in rows if _finite(r.get("cosine")) and r["cosine"] > 0]
    d["estimators_not_descent"] = [str(r.get("estimator")) for r in rows
                                   if not (_finite(r.get("cosine")) and r["cosine"] > 0)]
    # a row with error exactly 0 is the reference the others were measured against, not a contender
    best = _argmin([r.get("relative_error") if _finite(r.get("relative_error")) and r["relative_error"] > 0 else None
                    for r in rows])
    d["reference_estimators"] = [str(r.get("estimator")) for r in rows if r.get("relative_error") == 0]
    d["most_accurate_estimator"] = str(rows[best].get("estimator")) if best is not None else None
    d["most_accurate_estimator_row"] = best
    return d


# ---- words ------------------------------------------------------------------------------------------

def samples(count: int) -> str:
    """'1 sample', '3 samples'."""
    return f"{count} sample" + ("" if count == 1 else "s")


def _pm(value: float | None, unc: float | None) -> str:
    return num(value) + (f" ± {num(unc)}" if unc is not None else "")


def headline(summary: SpectralSummary, d: dict[str, Any]) -> str:
    """The verdict in one paragraph: contractive or not, with the largest spectral radius behind it."""
    rho, unc, i = d["max_spectral_radius"], d["max_spectral_radius_uncertainty"], d["max_spectral_radius_sample"]
    if rho is None:
        return ("**Contraction unknown.** The summary holds no finite spectral radius, so this report cannot "
                "say whether the map is contractive at its fixed point.")
    count = d["samples_with_radius"]
    where = f"the largest spectral radius of J over {samples(count)} is ρ = {_pm(rho, unc)} (sample {i})"
    without = d["samples_without_radius"]
    missing = (f" {samples(without)} without a finite estimate {'leaves' if without == 1 else 'leave'} the verdict "
               "open." if without else "")
    if d["forward_samples"] and d["forward_converged_samples"] < d["forward_samples"]:
        missing += (f" Caution: the forward solve did not converge on {d['forward_unconverged_samples']} of "
                    f"{samples(d['forward_samples'])}, so J was measured away from z* there.")
    if d["verdict"] == "contractive":
        text = (f"**Contractive.** At the fixed point, {where}, below 1 by 1 - ρ = {num(d['distance_from_one'])}: "
                "near z* every sample's iteration shrinks errors.")
        upper = d.get("max_spectral_radius_upper")
        if upper is not None and upper >= 1.0:
            text += (f" But ρ plus its uncertainty is {num(upper)}, not below 1: contraction is not certain; "
                     "a more accurate estimate (method 'dense' or more Arnoldi vectors) would settle it.")
        return text + missing
    if d["verdict"] == "not contractive":
        above = d["samples_at_or_above_one"]
        text = (f"**Not contractive.** At the fixed point, {where}, not below 1 (ρ - 1 = {num(d['excess_over_one'])}); "
                f"{above} of {samples(count)} {'has' if above == 1 else 'have'} ρ ≥ 1: near z* the iteration does "
                "not shrink errors along the leading eigenvector.")
        lower = d.get("max_spectral_radius_lower")
        if lower is not None and lower < 1.0:
            text += f" ρ minus its uncertainty is {num(lower)}, below 1: the estimate is too coarse to be sure."
        return text + missing
    return f"**Contraction unknown.** {where[0].upper() + where[1:]}.{missing}"


def meaning_bullets(summary: SpectralSummary, d: dict[str, Any]) -> list[str]:
    """What the numbers mean: distance from 1, Lipschitz constant, conditioning of I - J, the forward solve."""
    out = []
    rho, tol = d["max_spectral_radius"], d["tolerance"]
    if rho is not None:
        if d["steps_to_tolerance"] is not None:
            out.append(f"**Distance from 1.** Fixed-point iteration and the Neumann series shrink an error by about "
                       f"ρ per step, so reaching a tolerance of {num(tol)} takes about log(tol) / log(ρ) = "
                       f"{num(d['steps_to_tolerance'])} steps at the worst sample.")
        else:
            out.append("**Distance from 1.** With ρ ≥ 1, fixed-point iteration and the Neumann series do not "
                       "converge near z*: the error along the leading eigenvector grows (or does not shrink) by "
                       "about ρ per step.")
    lip = d["max_lipschitz"]
    if lip is not None:
        text = f"**Lipschitz constant.** ‖J‖₂ = {num(lip)} (largest over samples, sample {d['max_lipschitz_sample']})."
        if rho is not None and lip > 1.0 > rho:
            text += (" **Non-normal:** ‖J‖₂ > 1 > ρ, so a single step may expand some directions (by up to "
                     f"{num(lip)}) although the iteration contracts in the long run: errors and Neumann terms can "
                     "grow before they shrink, and no bound built on ‖J‖₂ holds.")
        elif lip < 1.0:
            text += " Below 1, so every step is a contraction in the 2-norm, not only asymptotically."
        elif rho is not None and lip >= 1.0 and rho >= 1.0:
            text += " At least 1, as it must be when ρ ≥ 1."
        out.append(text)
    sigma = d["min_sigma_min_I_minus_J"]
    cond = d["max_condition_I_minus_J"]
    if sigma is not None or cond is not None:
        parts = []
        if sigma is not None:
            parts.append(f"σ_min(I − J) = {num(sigma)} (smallest over samples, sample "
                         f"{d['min_sigma_min_I_minus_J_sample']})")
        if cond is not None:
            parts.append(f"cond(I − J) = {num(cond)} (largest, sample {d['max_condition_I_minus_J_sample']})")
        text = "**Conditioning of I − J.** " + "; ".join(parts) + "."
        if d["error_bound_factor"] is not None:
            text += (" An adjoint residual r = g − (I − J^T) u bounds the error of the implicit gradient's adjoint: "
                     f"‖u − u*‖ ≤ ‖r‖ / σ_min = {num(d['error_bound_factor'])} ‖r‖.")
        elif sigma is not None:
            text += " I − J is singular: 1 is an eigenvalue of J and the implicit gradient does not exist."
        if d["attainable_relative_error"] is not None:
            text += (f" In {summary.dtype.split('.')[-1]} (eps = {num(d['dtype_eps'])}) a linear solve can lose up to "
                     f"cond × eps = {num(d['attainable_relative_error'])} relative accuracy.")
        out.append(text)
    fwd = forward_sentence(summary, d)
    if fwd:
        out.append(fwd)
    return out


def round_off_floor(trace: Any, dtype: str, tail: int = 5) -> tuple[float, float] | None:
    """(level, level / first residual) when a residual trace ends flat (its last `tail` values within a factor 2)
    at most 1e3 unit roundoffs of the dtype below its start (the forward solvers' own round-off-floor test, with
    the first residual standing in for ||f(z)||); None otherwise."""
    values = [v for v in _as_list(trace) if _finite(v)]
    eps = dtype_eps(dtype)
    if eps is None or len(values) < 2 * tail or not values[0] > 0:
        return None
    last = values[-tail:]
    level = max(last)
    if not (min(last) > 0 and level <= 2 * min(last)):
        return None
    ratio = level / values[0]
    return (level, ratio) if ratio <= 1e3 * eps else None


def forward_sentence(summary: SpectralSummary, d: dict[str, Any]) -> str | None:
    """Converged or not, steps, empirical contraction rate vs ρ."""
    fwd = summary.forward or {}
    parts = []
    if d["forward_samples"] is not None:
        parts.append(f"converged on {d['forward_converged_samples']} of {samples(d['forward_samples'])}")
    if d["forward_steps_min"] is not None:
        lo, hi = d["forward_steps_min"], d["forward_steps_max"]
        parts.append(f"in {num(lo)} steps" if lo == hi else f"in {num(lo)} to {num(hi)} steps")
    i = d["max_spectral_radius_sample"]
    rate, rho = _at(summary.contraction_rate, i), d["max_spectral_radius"]
    if rate is not None and rho is not None:
        # the same sample's empirical rate against its ρ
        text = (f"at the sample with the largest ρ (sample {i}) the empirical contraction rate is {num(rate)} "
                f"vs ρ = {num(rho)}")
        if abs(rate - rho) <= _RATE_MATCH * max(rho, 1e-12) and (rate < 1.0) == (rho < 1.0):
            text += " (they match, as plain iteration predicts)"
        elif rho >= 1.0 and rate >= 1.0 - _RATE_MATCH:
            text += " (the residual does not shrink, as ρ ≥ 1 predicts)"
        elif (floor := round_off_floor(summary.residuals[i] if i < len(summary.residuals) else None,
                                       summary.dtype)) is not None:
            dtype = str(summary.dtype).split(".")[-1]
            text += (f" (slower than ρ because the residual trace flattened at {num(floor[0])}, {num(floor[1])} of "
                     f"its start: the round-off floor of {dtype}, where no solver makes progress; the rate of the flat "
                     "tail is not the map's. A tolerance below this floor cannot be met: loosen tol or use float64)")
        elif rate < rho:
            text += (" (faster than ρ: an accelerated solver such as Anderson or Broyden, or a trace that ended "
                     "before its asymptotic regime)")
        else:
            text += (" (slower than ρ: the trace may still be in a transient, e.g. from non-normality, or not yet "
                     "near z*)")
        parts.append(text)
    elif d["max_contraction_rate"] is not None:
        parts.append(f"largest empirical contraction rate {num(d['max_contraction_rate'])} "
                     f"(sample {d['max_contraction_rate_sample']})")
    if not parts:
        return None
    how = []
    if fwd.get("method"):
        how.append(str(fwd["method"]))
    if _finite(fwd.get("tol")):
        how.append(f"tol {num(fwd['tol'])}")
    head = "**Forward solve" + (f" ({', '.join(how)})" if how else "") + ".** "
    body = "; ".join(parts)
    text = head + body[0].upper() + body[1:] + "."
    if d["forward_samples"] and d["forward_converged_samples"] < d["forward_samples"]:
        text += " Gradients at an unconverged z* are gradients of a different point: fix the forward solve first."
    return text


def estimator_bullets(summary: SpectralSummary, d: dict[str, Any]) -> list[str]:
    """Which gradient estimators this spectrum makes safe, and why."""
    rho, lip, tol = d["max_spectral_radius"], d["max_lipschitz"], d["tolerance"]
    out = []
    # truncated series: Neumann-k, one-step, phantom
    if rho is None:
        out.append("**Neumann-k, one-step, phantom.** Their accuracy depends on ρ, which the summary does not hold.")
    elif rho >= 1.0:
        out.append("**Neumann-k, one-step, phantom: unsafe.** With ρ ≥ 1 the series Σ_i (J^T)^i g diverges, so more "
                   "terms make the Neumann gradient worse, and the one-step and phantom gradients carry no guarantee.")
    else:
        if rho <= 0.5:
            how_far = "ρ is well below 1, so they are usable for moderate accuracy"
        elif rho < 0.9:
            how_far = "ρ is not far below 1, so few terms give only rough gradients"
        else:
            how_far = "ρ is close to 1, so expect large errors unless many terms are kept"
        text = (f"**Neumann-k, one-step, phantom.** Reliable only when ρ is well below 1; here {how_far}. "
                f"Neumann-k's truncation error falls like ρ^(k+1): about {num(d['steps_to_tolerance'])} terms "
                f"for {num(tol)}. One-step keeps only the first term, dropping Σ_(i≥1) (J^T)^i g, so its relative "
                "error is of order ‖J‖₂")
        if lip is not None:
            text += f" = {num(lip)}" + (" — no better than a guess" if lip >= 1.0 else "")
        out.append(text + "; phantom gradients (a few damped unrolled steps) are of the same order.")
    # implicit with GMRES
    sigma, cond, attainable = d["min_sigma_min_I_minus_J"], d["max_condition_I_minus_J"], d["attainable_relative_error"]
    if sigma is not None and sigma <= 0:
        out.append("**Implicit (GMRES): impossible.** I − J is singular, so (I − J^T) u = g has no unique solution.")
    elif cond is not None:
        if attainable is not None:
            quality = ("well conditioned, so GMRES is the safe exact choice" if attainable <= 1e-4 else
                       "moderately conditioned: expect about cond × eps relative error" if attainable < 1.0 else
                       "ill conditioned: no digit of the solve can be trusted in this dtype")
        else:
            quality = "its conditioning sets the accuracy GMRES can reach"
        text = (f"**Implicit (GMRES).** Solves (I − J^T) u = g for any J with σ_min(I − J) > 0, contractive or not; "
                f"here cond(I − J) = {num(cond)}: {quality}.")
        if d["error_bound_factor"] is not None:
            text += f" Its residual bounds its error by the factor 1/σ_min = {num(d['error_bound_factor'])}."
        if d["verdict"] == "not contractive":
            text += (" Since the map is not contractive, this is the estimator to use, provided the forward solver "
                     "still finds z* (Anderson or Broyden may, where plain iteration cannot).")
        out.append(text)
    else:
        out.append("**Implicit (GMRES).** Works whenever I − J is well conditioned; the summary holds no "
                   "σ_min(I − J) or cond(I − J) to check this.")
    # CG
    if d["complex_eigenvalues"]:
        why = (f"here {d['complex_eigenvalues']} of {d['eigenvalues_counted']} stored eigenvalues are complex, "
               "so J is not symmetric")
    elif d["non_normal_example_sample"] is not None:
        s = d["non_normal_example_sample"]
        why = (f"here sample {s} has ‖J‖₂ = {num(summary.lipschitz[s])} > ρ = {num(summary.spectral_radius[s])}, "
               "which a symmetric J cannot have, so J is not symmetric")
    else:
        why = None
    if why:
        out.append(f"**CG: not applicable.** CG needs a symmetric J (e.g. a gradient step of an energy); {why}. "
                   "fpgrad's CG refuses such an operator; use `cg_normal` or `gmres`.")
    elif d["eigenvalues_counted"] or (summary.lipschitz and summary.spectral_radius):
        out.append("**CG.** Needs a symmetric J, which maps are not in general; the summary shows no sign against "
                   "symmetry (real eigenvalues, ‖J‖₂ equal to ρ), and fpgrad's CG checks it with a random probe.")
    else:
        out.append("**CG.** Needs a symmetric J, which maps are not in general; the summary holds no eigenvalues or "
                   "‖J‖₂ to tell, and fpgrad's CG checks symmetry with a random probe before it solves.")
    # the measured rows
    rows = summary.estimators
    if rows:
        good, bad = d["estimators_descent"], d["estimators_not_descent"]
        text = "**Measured.** "
        text += (f"Descent directions (cosine > 0): {', '.join(good)}." if good else
                 "No estimator gives a descent direction (cosine > 0).")
        failed = [r for r in rows if r.get("error")]
        bad_rows = [r for r in rows if str(r.get("estimator")) in bad and not r.get("error")
                    and not (_finite(r.get("cosine")) and r["cosine"] > 0)]
        if bad_rows:
            text += " Not a descent direction: " + ", ".join(
                f"{r.get('estimator')} (cosine {num(r.get('cosine'))})" for r in bad_rows) + "."
        if failed:
            text += " Refused to return a gradient (raised, no number): " + "; ".join(
                f"{r.get('estimator')}: {str(r['error']).split(':')[0]}" for r in failed) + "."
        b = d["most_accurate_estimator_row"]
        if b is not None:
            r = rows[b]
            text += (f" Most accurate: {r.get('estimator')}, relative error {num(r.get('relative_error'))} with "
                     f"{num(r.get('vjps'))} VJPs and {num(r.get('jvps'))} JVPs")
            text += (f" ({', '.join(d['reference_estimators'])}: error 0, the reference)."
                     if d["reference_estimators"] else ".")
        out.append(text)
    return out
