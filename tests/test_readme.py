"""The README's code blocks that claim to run do run (a newcomer copies them)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_train_your_own_module_block_trains_the_module_and_fills_its_grad():
    namespace: dict = {}
    exec(compile(_block_after("## Train your own module"), "README.md", "exec"), namespace)
    cell, loss = namespace["cell"], namespace["loss"]
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())
    # the loop decreased the loss: rerun the first step's loss with the trained parameters
    torch.manual_seed(0)
    fresh = namespace["Cell"]()
    m0 = namespace["fpgrad"].maps.from_module(fresh)
    x, target = namespace["x"], namespace["target"]
    z_first = namespace["fpgrad"].fixed_point(m0.step, m0.params, x, torch.zeros(32, 16), backward="implicit")
    assert loss.item() < ((z_first - target) ** 2).mean().item()


def test_keep_the_map_contractive_block_keeps_rho_under_one_and_takes_the_module():
    from fpgrad.contraction import dense_radius
    namespace: dict = {}
    exec(compile(_block_after("## Keep the map contractive"), "README.md", "exec"), namespace)
    m, params, x = namespace["m"], namespace["params"], namespace["x"]
    z = namespace["fpgrad"].solve(m.with_params({k: v.detach() for k, v in params.items()}), x, tol=1e-10).z
    rho = dense_radius(m.step, {k: v.detach() for k, v in params.items()}, z, x)
    assert float(rho.max()) < 1.0
    assert namespace["state"].calls == 40 and namespace["sa_state"].calls == 3
    sa = namespace["sa"]
    no_grad = set(sa.parameters_without_grad())         # one_step: the slot initialisation
    assert sa.last is not None and all(p.grad is not None for k, p in sa.named_parameters() if k not in no_grad)
