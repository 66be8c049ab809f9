"""Speed against the peer libraries, side by side in one process (issue #12).

The peers are the libraries researchers pick instead of this toolkit: ASDL (``asdfghjkl``,
imported as ``asdl``), nngeometry, curvlinops (``curvlinops-for-pytorch``) and
pytorch-optimizer. Install them with the ``bench`` extra, giving the torch pin in the same
command (``pip install torch==2.13.0 -e ".[bench]"``); torchvision is installed for nngeometry's
requirements and never imported.

Problems (float32, ``nn.CrossEntropyLoss``, seeded random inputs and labels):

- ``mlp``: the paper's 256-20-20-20-20-20-10 tanh MLP (:func:`mbf_analysis.models.paper_mlp`),
  inputs ``[1, 16, 16]``, batch 1000;
- ``cnn``: a small CNN, conv5×5 16 (pad 2), ReLU, max-pool 2, conv5×5 32 (pad 2), ReLU,
  max-pool 2, fc 1568→128, ReLU, fc 128→10, inputs ``[1, 28, 28]``, batch 128.

Rows, and exactly what each side does in one timed unit:

- ``EFM``: the six dense layer blocks ``F_l = (1/N) Σ_n g_{n,l} g_{n,l}ᵀ`` of the MLP's empirical
  Fisher (weight and bias of a layer together), batch 1000.
  *toolkit*: :func:`mbf_analysis.curvature.layer_fisher` (``kind="empirical"``).
  *ASDL*: ``FisherEmp`` with ``fisher_shapes=["layer_wise"]`` (one forward and backward with
  its hooks, the per-sample gradients from them, ``GᵀG`` per layer).
  *nngeometry*: ``FIM`` with ``PMatBlockDiag`` and ``variant="regression"`` on the function
  ``x, y ↦ ℓ(f(x), y)`` (one output per sample, so ``(1/N) Σ J_nᵀ J_n`` is the empirical Fisher).
  *curvlinops*: one ``EFLinearOperator`` per layer times the identity (``d`` matrix-vector
  products, applied in chunks of 1024 columns); curvlinops is matrix-free, so a dense block costs
  ``d`` products.
- ``KFAC``: one training iteration (zero_grad, forward, backward, optimizer step) with KFAC at
  ``T1 = 1`` and ``T2 ∈ {1, 20}``, empirical Fisher (the real labels' backward pass), damping
  ``λ = 1e-3`` split as ``(A + π√λ I) ⊗ (G + π⁻¹√λ I)`` with the trace-ratio ``π``, EMA decay
  ``β = 0.9`` of the factors, momentum 0.9, no weight decay, every Linear and Conv2d layer.
  *toolkit*: :class:`mbf_analysis.optim.KFAC` (``stat_decay=0.9``); it preconditions the
  momentum ``m ← μ m + g`` with ``[W b]`` as one matrix (``A`` holds the homogeneous coordinate).
  *ASDL*: ``KfacGradientMaker`` (``fisher_emp``, ``ema_decay = 1 − β = 0.1``,
  ``curvature_upd_interval = 1``, ``preconditioner_upd_interval = T2``) and
  ``torch.optim.SGD(momentum=0.9)``; ASDL preconditions the gradient of the weight with
  ``B⁻¹ ∇W A⁻¹`` and of the bias with ``B⁻¹ ∇b`` (its ``A`` has no homogeneous coordinate), and SGD
  applies the momentum after preconditioning. Its conv factors are ``A/T`` and ``T·G`` (``T`` output
  locations), the same Kronecker product and, with its trace-ratio split, the same damped factors.
  A timed unit is ``T2`` iterations for ``T2 = 20`` (one inverse, 19 reuses) and 20 (MLP) or 4
  (CNN) iterations for ``T2 = 1``; the tables give milliseconds per iteration.
- ``Shampoo``: one training iteration at ``T1 = T2 = 1``, ``ε = 1e-4``, momentum 0.9, every
  parameter (biases as order-1 tensors).
  *toolkit*: :class:`mbf_analysis.optim.Shampoo` (EMA ``β = 0.9`` of the statistics, roots by
  its default ``root_method="auto"``: on CPU a float32 eigendecomposition with Rayleigh-quotient
  eigenvalues, all roots of equal size and order in one batched call); Conv2d weights as order-3
  tensors ``[C_out, C_in, k_h·k_w]``.
  *pytorch-optimizer*: ``Shampoo(momentum=0.9, matrix_eps=1e-4,
  preconditioning_compute_steps=1)``: summed statistics (no EMA; the same work per step), SVD
  roots, conv weights as order-4 tensors (four statistics, two of them 5×5, where ours has one
  25×25), momentum of the preconditioned direction.

Timing: one thread (``--threads``), ``OMP_WAIT_POLICY=PASSIVE`` (the script re-executes itself
with it unless the variable is set), every contender on its own deep copy of the same seeded
model (ASDL's copy is made before BackPACK touches the toolkit's: ASDL registers the deprecated
non-full backward hooks, which PyTorch refuses on a module that ever had a full one), one untimed
warm-up unit each, then ``--rounds`` rounds; within a round the contenders of a row run one unit
each in an order that rotates from round to round. The tables give the median time per unit and
the median over rounds of the per-round ratio *toolkit / peer* (``≤ 1``: the toolkit is at least
as fast) and its inverse, *peer × toolkit time* (the form of the issue's table).

Agreement (float64, before the timing; ``--no-check`` skips it): the EFM blocks of all four on
the MLP (batch 64); one KFAC step (momentum 0) of the toolkit and ASDL on bias-free copies of
both networks, where both precondition ``W`` with ``(G + π⁻¹√λ I)⁻¹ W (A + π√λ I)⁻¹``; one
Shampoo step (momentum 0, EMA decay 0, ``matrix_eps = ε``) of the toolkit and pytorch-optimizer on
the parameters both see as tensors of the same order (every MLP parameter; the CNN's Linear
weights and all biases). Reported: ``max |a − b| / max |b|`` over each compared tensor.

ASDL wraps its work in ``torch.cuda.nvtx.range``, which raises on a CPU-only torch; the script
replaces ``torch.cuda.nvtx.range_push``/``range_pop`` with no-ops.

Run: ``python benchmarks/bench_peers.py`` (5 rounds, about 5 minutes on one core of a quiet
machine; ``--quick``: 3 rounds; ``--rows efm kfac shampoo`` selects rows). Results:
``benchmarks/results_peers.md``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbf_analysis.curvature import layer_fisher
from mbf_analysis.layout import LayerLayout, model_layouts
from mbf_analysis.models import paper_mlp
from mbf_analysis.optim import KFAC, Shampoo

logger = logging.getLogger("bench_peers")

PEER_DISTRIBUTIONS = {
    "ASDL": "asdfghjkl",
    "nngeometry": "nngeometry",
    "curvlinops": "curvlinops-for-pytorch",
    "pytorch-optimizer": "pytorch-optimizer",
}
DAMPING = 1e-3
STAT_DECAY = 0.9
MOMENTUM = 0.9
SHAMPOO_EPS = 1e-4
LR = 1e-4  # small: the parameters barely move, so every round times the same problem
CURVLINOPS_COLUMNS = 1024
ROWS = ("efm", "kfac", "shampoo")


def _silence_nvtx() -> None:
    """ASDL's ``nvtx.range`` raises "NVTX functions not installed" on a CPU build."""
    torch.cuda.nvtx.range_push = lambda *args, **kwargs: None
    torch.cuda.nvtx.range_pop = lambda *args, **kwargs: None


# ----------------------------------------------------------------------------- problems
def small_cnn(bias: bool = True) -> nn.Sequential:
    """The issue's small CNN on ``[1, 28, 28]`` inputs (module docstring)."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 16, 5, padding=2, bias=bias),
            relu1=nn.ReLU(),
            pool1=nn.MaxPool2d(2),
            conv2=nn.Conv2d(16, 32, 5, padding=2, bias=bias),
            relu2=nn.ReLU(),
            pool2=nn.MaxPool2d(2),
            flatten=nn.Flatten(),
            fc1=nn.Linear(32 * 7 * 7, 128, bias=bias),
            relu3=nn.ReLU(),
            fc2=nn.Linear(128, 10, bias=bias),
        )
    )


def bias_free_mlp() -> nn.Sequential:
    """The paper MLP's widths and activation without biases (for the KFAC agreement check)."""
    widths = [256, 20, 20, 20, 20, 20, 10]
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for k in range(1, len(widths)):
        layers[f"fc{k}"] = nn.Linear(widths[k - 1], widths[k], bias=False)
        if k < len(widths) - 1:
            layers[f"act{k}"] = nn.Tanh()
    return nn.Sequential(layers)


@dataclass
class Problem:
    """A model and a batch."""

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor


def make_problem(name: str, batch: int | None = None, bias: bool = True, seed: int = 0) -> Problem:
    """The seeded ``mlp`` or ``cnn`` problem in the current default dtype."""
    torch.manual_seed(seed)
    if name == "mlp":
        model = paper_mlp() if bias else bias_free_mlp()
        x = torch.randn(batch or 1000, 1, 16, 16)
    else:
        model = small_cnn(bias)
        x = torch.randn(batch or 128, 1, 28, 28)
    return Problem(name, model, x, torch.randint(0, 10, (len(x),)))


# ----------------------------------------------------------------------------- EFM
def _standard_order(layout: LayerLayout, module: nn.Module) -> Tensor:
    """Index map: mini-block position → position in ``[vec_row(W), b]`` (the peers' order)."""
    numel = module.weight.numel()
    index = {layout.param_names[0]: torch.arange(numel).reshape(module.weight.shape)}
    if layout.has_bias:
        index[layout.param_names[1]] = torch.arange(numel, numel + module.bias.numel())
    return layout.flatten(index)


def efm_toolkit(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """The six blocks in the toolkit's mini-block order."""
    return layer_fisher(model, nn.CrossEntropyLoss(), x, y)


def efm_asdl(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """ASDL's layer-wise empirical Fisher, in ``[vec_row(W), b]`` order."""
    from asdl.fisher import FisherConfig, get_fisher_maker

    config = FisherConfig(fisher_type="fisher_emp", fisher_shapes=["layer_wise"], data_size=len(x))
    maker = get_fisher_maker(model, config)
    dummy = maker.setup_model_call(model, x)
    maker.setup_loss_call(F.cross_entropy, dummy, y)
    maker.forward_and_backward()
    return {
        name: module.fisher.data
        for name, module in model.named_modules()
        if getattr(module, "fisher", None) is not None
    }


def efm_nngeometry(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """nngeometry's block-diagonal FIM of the per-sample loss, in ``[vec_row(W), b]`` order."""
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatBlockDiag
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))

    def per_sample_loss(inputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(model(inputs), targets, reduction="none").unsqueeze(1)

    matrix = FIM(model, loader, PMatBlockDiag, variant="regression", function=per_sample_loss)
    return dict(matrix.data.items())


def efm_curvlinops(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """curvlinops' EF operator of each layer times the identity, in ``[vec_row(W), b]`` order."""
    from curvlinops import EFLinearOperator

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        params = [p for p in (module.weight, module.bias) if p is not None]
        operator = EFLinearOperator(
            model,
            nn.CrossEntropyLoss(),
            params,
            [(x, y)],
            check_deterministic=False,
            num_data=len(x),
        )
        d = sum(p.numel() for p in params)
        eye = torch.eye(d, dtype=x.dtype)
        out[name] = torch.cat(
            [
                operator @ eye[:, i : i + CURVLINOPS_COLUMNS]
                for i in range(0, d, CURVLINOPS_COLUMNS)
            ],
            dim=1,
        )
    return out


EFM_PEERS: dict[str, Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]] = {
    "ASDL": efm_asdl,
    "nngeometry": efm_nngeometry,
    "curvlinops": efm_curvlinops,
}


# ----------------------------------------------------------------------------- optimizers
class Trainer:
    """One model copy and its optimizer; :meth:`run` makes ``n`` training iterations."""

    def __init__(self, problem: Problem) -> None:
        self.model = copy.deepcopy(problem.model)
        self.x, self.y = problem.x, problem.y

    def iteration(self) -> None:
        raise NotImplementedError

    def run(self, n: int) -> None:
        for _ in range(n):
            self.iteration()


class ToolkitKFAC(Trainer):
    """:class:`mbf_analysis.optim.KFAC`, empirical Fisher."""

    def __init__(self, problem: Problem, inverse_period: int, momentum: float = MOMENTUM) -> None:
        super().__init__(problem)
        self.optimizer = KFAC(
            self.model,
            lr=LR,
            damping=DAMPING,
            momentum=momentum,
            stat_decay=STAT_DECAY,
            stat_period=1,
            inverse_period=inverse_period,
        )

    def iteration(self) -> None:
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()


class AsdlKFAC(Trainer):
    """ASDL's ``KfacGradientMaker`` (``fisher_emp``) with ``torch.optim.SGD``."""

    def __init__(self, problem: Problem, inverse_period: int, momentum: float = MOMENTUM) -> None:
        from asdl import KfacGradientMaker, PreconditioningConfig

        super().__init__(problem)
        config = PreconditioningConfig(
            data_size=len(self.x),
            damping=DAMPING,
            ema_decay=1 - STAT_DECAY,
            curvature_upd_interval=1,
            preconditioner_upd_interval=inverse_period,
        )
        self.maker = KfacGradientMaker(self.model, config, fisher_type="fisher_emp")
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=momentum)

    def iteration(self) -> None:
        self.optimizer.zero_grad()
        dummy = self.maker.setup_model_call(self.model, self.x)
        self.maker.setup_loss_call(F.cross_entropy, dummy, self.y)
        self.maker.forward_and_backward()
        self.optimizer.step()


class ToolkitShampoo(Trainer):
    """:class:`mbf_analysis.optim.Shampoo` at ``T1 = T2 = 1``."""

    def __init__(
        self, problem: Problem, momentum: float = MOMENTUM, stat_decay: float = STAT_DECAY
    ) -> None:
        super().__init__(problem)
        self.optimizer = Shampoo(
            self.model,
            lr=LR,
            eps=SHAMPOO_EPS,
            momentum=momentum,
            stat_decay=stat_decay,
            stat_period=1,
            inverse_period=1,
        )

    def iteration(self) -> None:
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()


class PeerShampoo(Trainer):
    """pytorch-optimizer's ``Shampoo`` at ``preconditioning_compute_steps=1``."""

    def __init__(self, problem: Problem, momentum: float = MOMENTUM) -> None:
        from pytorch_optimizer import Shampoo as PytorchOptimizerShampoo

        super().__init__(problem)
        self.optimizer = PytorchOptimizerShampoo(
            self.model.parameters(),
            lr=LR,
            momentum=momentum,
            matrix_eps=SHAMPOO_EPS,
            preconditioning_compute_steps=1,
        )

    def iteration(self) -> None:
        self.optimizer.zero_grad()
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()


# ----------------------------------------------------------------------------- timing
@dataclass
class Row:
    """One comparison: the toolkit (first contender) and its peers, each a timed unit."""

    label: str
    unit: str
    contenders: dict[str, Callable[[], object]]
    per_unit: int = 1
    times: dict[str, list[float]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)


def build_rows(selected: list[str]) -> list[Row]:
    """The rows of the issue's table, each contender on its own copy of the seeded model."""
    rows = []
    if "efm" in selected:
        mlp = make_problem("mlp")
        contenders = {}
        for name, fn in {"toolkit": efm_toolkit, **EFM_PEERS}.items():
            model = copy.deepcopy(mlp.model)
            contenders[name] = lambda f=fn, m=model: f(m, mlp.x, mlp.y)
        rows.append(Row("all six EFM blocks, paper MLP, batch 1000", "call", contenders))
    for net in ("mlp", "cnn") if "kfac" in selected else ():
        problem = make_problem(net)
        for period in (1, 20):
            iterations = period if period > 1 else (20 if net == "mlp" else 4)
            ours, asdl = ToolkitKFAC(problem, period), AsdlKFAC(problem, period)
            batch = len(problem.x)
            rows.append(
                Row(
                    f"KFAC iteration, {_net_label(net)}, b{batch}, T1 = 1, T2 = {period}",
                    "iteration",
                    {
                        "toolkit": lambda o=ours, n=iterations: o.run(n),
                        "ASDL": lambda o=asdl, n=iterations: o.run(n),
                    },
                    per_unit=iterations,
                )
            )
    for net in ("mlp", "cnn") if "shampoo" in selected else ():
        problem = make_problem(net)
        ours, peer = ToolkitShampoo(problem), PeerShampoo(problem)
        rows.append(
            Row(
                f"Shampoo iteration, {_net_label(net)}, b{len(problem.x)}, T1 = T2 = 1",
                "iteration",
                {"toolkit": lambda o=ours: o.run(1), "pytorch-optimizer": lambda o=peer: o.run(1)},
            )
        )
    return rows


def _net_label(net: str) -> str:
    return {"mlp": "paper MLP", "cnn": "small CNN"}[net]


def measure(rows: list[Row], rounds: int) -> None:
    """Warm-up, then ``rounds`` interleaved rounds (module docstring)."""
    for row in rows:
        for name, fn in row.contenders.items():
            logger.info("warm-up: %s / %s", row.label, name)
            fn()
    for r in range(rounds):
        for row in rows:
            names = list(row.contenders)
            shift = r % len(names)
            seconds = {}
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                row.contenders[name]()
                seconds[name] = (time.perf_counter() - start) / row.per_unit
            for name, value in seconds.items():
                row.times.setdefault(name, []).append(value)
                if name != "toolkit":
                    row.ratios.setdefault(name, []).append(seconds["toolkit"] / value)
            logger.info(
                "round %d: %s: %s",
                r,
                row.label,
                ", ".join(f"{n} {v * 1e3:.1f} ms" for n, v in seconds.items()),
            )


# ----------------------------------------------------------------------------- agreement
def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def check_efm() -> list[tuple[str, str, float]]:
    """The MLP's six EFM blocks of every peer against the toolkit's (float64, batch 64)."""
    problem = make_problem("mlp", batch=64, seed=1)
    layouts = model_layouts(problem.model)
    modules = dict(problem.model.named_modules())
    ours = efm_toolkit(copy.deepcopy(problem.model), problem.x, problem.y)
    out = []
    for peer, fn in EFM_PEERS.items():
        theirs = fn(copy.deepcopy(problem.model), problem.x, problem.y)
        worst = 0.0
        for name, layout in layouts.items():
            perm = _standard_order(layout, modules[name])
            worst = max(worst, _rel(theirs[name][perm][:, perm], ours[name]))
        out.append(("EFM blocks, paper MLP (6 layers)", f"toolkit vs {peer}", worst))
    return out


def _one_step(trainer: Trainer) -> list[Tensor]:
    """The direction ``d`` of one step, read off ``θ ← θ − d`` at learning rate 1."""
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1.0
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.iteration()
    return [b - p.detach() for b, p in zip(before, trainer.model.parameters(), strict=True)]


def check_kfac() -> list[tuple[str, str, float]]:
    """One KFAC step, momentum 0, on bias-free copies: toolkit vs ASDL (float64)."""
    out = []
    for net in ("mlp", "cnn"):
        problem = make_problem(net, batch=64 if net == "mlp" else 16, bias=False, seed=2)
        ours = _one_step(ToolkitKFAC(problem, 1, momentum=0.0))
        theirs = _one_step(AsdlKFAC(problem, 1, momentum=0.0))
        worst = max(_rel(a, b) for a, b in zip(theirs, ours, strict=True))
        out.append((f"KFAC direction, {_net_label(net)} without biases", "toolkit vs ASDL", worst))
    return out


def check_shampoo() -> list[tuple[str, str, float]]:
    """One Shampoo step, momentum 0, EMA decay 0: toolkit vs pytorch-optimizer (float64)."""
    out = []
    for net in ("mlp", "cnn"):
        problem = make_problem(net, batch=64 if net == "mlp" else 16, seed=3)
        ours = _one_step(ToolkitShampoo(problem, momentum=0.0, stat_decay=0.0))
        theirs = _one_step(PeerShampoo(problem, momentum=0.0))
        names = [n for n, _ in problem.model.named_parameters()]
        shapes = [p.shape for p in problem.model.parameters()]
        same_order = [i for i, s in enumerate(shapes) if len(s) < 4]
        worst = max(_rel(theirs[i], ours[i]) for i in same_order)
        what = "every parameter" if len(same_order) == len(names) else "Linear weights, biases"
        out.append(
            (
                f"Shampoo direction, {_net_label(net)} ({what})",
                "toolkit vs pytorch-optimizer",
                worst,
            )
        )
    return out


def agreement(selected: list[str]) -> list[tuple[str, str, float]]:
    """Every check of the selected rows, in float64."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = []
        if "efm" in selected:
            out += check_efm()
        if "kfac" in selected:
            out += check_kfac()
        if "shampoo" in selected:
            out += check_shampoo()
        return out
    finally:
        torch.set_default_dtype(previous)


# ----------------------------------------------------------------------------- report
def render(rows: list[Row], checks: list[tuple[str, str, float]], meta: dict[str, str]) -> str:
    """The markdown report."""
    versions = ", ".join(
        f"{peer} {importlib.metadata.version(dist)}" for peer, dist in PEER_DISTRIBUTIONS.items()
    )
    lines = [
        "# Speed against the peer libraries (toolkit / peer, one process, interleaved)",
        "",
        f"- date: {meta['date']}",
        f"- machine: {platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch threads {torch.get_num_threads()}, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        f"- load average at start {meta['load_start']}, at end {meta['load_end']}",
        f"- python {platform.python_version()}, torch {torch.__version__}, "
        f"backpack {importlib.metadata.version('backpack-for-pytorch')}; {versions}",
        f"- command: `{meta['command']}`",
        f"- {meta['rounds']} rounds after one warm-up unit per contender, contenders interleaved "
        "(order rotating every round); float32. toolkit / peer: median over rounds of the "
        "per-round ratio of the toolkit's time to the peer's (≤ 1: the toolkit is at least as "
        "fast), with its smallest and largest value over the rounds; peer × toolkit: the inverse "
        "of the median. What each side does: the docstring of "
        "`benchmarks/bench_peers.py`.",
        "",
        "| operation | toolkit (ms) | peer | peer (ms) | toolkit / peer | range over rounds "
        "| peer × toolkit |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        ours = statistics.median(row.times["toolkit"]) * 1e3
        for peer, ratios in row.ratios.items():
            ratio = statistics.median(ratios)
            theirs = statistics.median(row.times[peer]) * 1e3
            lines.append(
                f"| {row.label} (per {row.unit}) | {ours:.1f} | {peer} | {theirs:.1f} | "
                f"{ratio:.2f} | {min(ratios):.2f}–{max(ratios):.2f} | {1 / ratio:.2f} |"
            )
    if checks:
        lines += [
            "",
            "## Agreement (float64, max |a − b| / max |b|)",
            "",
            "| quantity | pair | relative difference |",
            "|---|---|---:|",
            *(f"| {what} | {pair} | {value:.1e} |" for what, pair, value in checks),
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--rounds", type=int, default=None, help="default 5, with --quick 3")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-check", action="store_true", help="skip the float64 agreement")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_peers.md"))
    args = parser.parse_args(argv)
    if "OMP_WAIT_POLICY" not in os.environ:
        # Must be set before libgomp starts its threads: start afresh.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    # ASDL's deprecated non-full backward hooks warn on every forward pass.
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    _silence_nvtx()
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 5)
    meta = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "load_start": " ".join(f"{v:.1f}" for v in os.getloadavg()),
        "command": shlex.join(["python", "benchmarks/bench_peers.py", *(argv or sys.argv[1:])]),
        "rounds": str(rounds),
    }
    checks = [] if args.no_check else agreement(args.rows)
    for what, pair, value in checks:
        logger.info("agreement: %s, %s: %.1e", what, pair, value)
    rows = build_rows(args.rows)
    measure(rows, rounds)
    meta["load_end"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    report = render(rows, checks, meta)
    args.out.write_text(report)
    logger.info("wrote %s\n%s", args.out, report)


if __name__ == "__main__":
    main()
