"""Sinkhorn speed, side by side in one run: otmel.model.ot.sinkhorn vs POT's batched solver vs a POT loop.

All solvers get the same float32 CPU torch cost tensors (B, 40, 50) — cosine costs
``(1 - cos) / 2`` in [0, 1] of random 8-d token features, as in OT-MEL's eq. 10 — with
uniform marginals and epsilon = 0.05 (POT's ``reg``), and are compared at the SAME marginal
error:

* "3 iterations": OT-MEL's default (the release's); every solver runs exactly 3 iterations;
* "err <= target": otmel.model.ot.sinkhorn runs with ``tol=target`` (it stops after N
  iterations, N a multiple of 10); POT's solvers run the same N iterations (their own
  stopping rules measure other norms, so they are given N rather than a tol); the
  measured error column shows that all reach the same error.

The error reported is the same for everyone, computed afterwards in fp64 from the plan:
``max over problems of max(||Pi 1 - mu||_1, ||Pi^T 1 - nu||_1)`` (ours ends on the row
update so its error is on the columns; POT's batched solver ends on the columns).

Solvers: ``otmel.model.ot.sinkhorn`` (kernel path, the one the model uses on these costs); the
same log-domain iterations evaluated with ``torch.logsumexp`` (``otmel.model.ot._sinkhorn_lse``,
the fallback path; shows where the speed comes from; default setting only);
``ot.batch.solve_batch(M, reg, method="log_sinkhorn", reg_type="entropy", grad="detach")``
(POT's batched log-domain Sinkhorn; it also computes the OT value); a Python loop of
``ot.sinkhorn(a, b, M_i, reg, method="sinkhorn_log")`` run on the first LOOP_SUBSET
problems and extrapolated linearly to B. Forward only under ``torch.no_grad()``, plus one
forward+backward comparison. Time = median of REPEATS..MAX_REPEATS calls after a warm-up
call, the solvers' calls interleaved. Writes bench/results/sinkhorn.md.

    .venv/bin/python bench/sinkhorn.py
"""

from __future__ import annotations

import datetime
import logging
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import ot
import ot.batch
import torch

import otmel.model.ot as otm
from otmel.model.ot import sinkhorn

EPS = 0.05
N, M = 40, 50
SHAPES = [256, 1024, 4096]  # problems per call, each (40, 50)
BIG = 256 * 256  # a training grid B = K = 256: default setting only
TARGETS = [1e-3, 1e-6]
LOOP_SUBSET = 32
REPEATS, MAX_REPEATS, REPEAT_BUDGET = 3, 15, 0.5  # calls per solver: at least 3, more if fast
OUT = Path(__file__).parent / "results" / "sinkhorn.md"


def make_cost(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(batch, N, 8, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(batch, M, 8, generator=g), dim=-1)
    return ((1 - q @ k.mT) / 2).contiguous()  # (batch, 40, 50) float32 in [0, 1]


def marginal_error(plan: torch.Tensor) -> float:
    p = plan.double()
    rows = (p.sum(-1) - 1.0 / N).abs().sum(-1)
    cols = (p.sum(-2) - 1.0 / M).abs().sum(-1)
    return float(torch.maximum(rows, cols).max())


def timed(fns: dict, warmup: bool = True) -> dict:
    """{name: (median seconds, result)} of each solver's calls.

    One warm-up call each (timed, to size the repeats), then rounds calling every solver once
    per round (interleaved, so a load change on this shared machine hits all solvers alike):
    REPEATS calls each, more (up to MAX_REPEATS, within ~REPEAT_BUDGET s) for the fast ones.
    """
    out, times, wanted = {}, {name: [] for name in fns}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        out[name] = fn()
        t = time.perf_counter() - t0
        if not warmup:
            times[name].append(t)
        wanted[name] = max(REPEATS, min(MAX_REPEATS, int(REPEAT_BUDGET / max(t, 1e-6))))
    for r in range(max(wanted.values())):
        for name, fn in fns.items():
            if len(times[name]) < wanted[name]:
                t0 = time.perf_counter()
                out[name] = fn()
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), out[name]) for name in fns}


class IterCount(logging.Handler):
    """Reads the iteration count that otmel.model.ot logs (DEBUG, extra field) in tol mode."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.iters = None

    def emit(self, record):
        if hasattr(record, "sinkhorn_iters"):
            self.iters = record.sinkhorn_iters


def ours(C, iters, tol=None):
    return lambda: sinkhorn(C, epsilon=EPS, n_iters=iters, tol=tol)


def ours_lse(C, iters):
    marg = otm._Marginals(None, None, N, M, torch.float32, C.device)
    return lambda: otm._sinkhorn_lse(C, False, marg, EPS, iters, None)


def pot_batched(C, iters, grad="detach"):
    # tol=0: exactly `iters` iterations (POT still checks its error every 10, as it would to stop)
    return lambda: ot.batch.solve_batch(M=C, reg=EPS, max_iter=iters, tol=0.0, method="log_sinkhorn",
                                        reg_type="entropy", grad=grad).plan


def pot_loop(C, iters):
    a = torch.full((N,), 1.0 / N)
    b = torch.full((M,), 1.0 / M)
    sub = C[:LOOP_SUBSET]

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "did not converge": stopThr=0 on purpose
            return torch.stack([ot.sinkhorn(a, b, c, EPS, method="sinkhorn_log", numItermax=iters, stopThr=0.0)
                                for c in sub])

    return run


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def main() -> None:
    torch.manual_seed(0)
    counter = IterCount()
    otm.log.addHandler(counter)
    otm.log.setLevel(logging.DEBUG)
    otm.log.propagate = False
    load0 = os.getloadavg()[0]
    t_start, cpu_start = time.perf_counter(), time.process_time()
    rows = []
    with torch.no_grad():
        for B in SHAPES + [BIG]:
            C = make_cost(B)
            settings = [("3 iterations (default)", 3, None)]
            if B != BIG:
                settings += [(f"err <= {t:g}", None, t) for t in TARGETS]
            for label, iters, tol in settings:
                if tol is not None:  # how many iterations our tol mode needs
                    counter.iters = None
                    sinkhorn(C, epsilon=EPS, n_iters=1000, tol=tol)
                    iters = counter.iters
                solvers = {"ours": ours(C, 1000 if tol else iters, tol)}
                if tol is None:  # (kept to the default setting: the runtime budget is ~3 min)
                    solvers["ours, logsumexp path"] = ours_lse(C, iters)
                solvers["POT solve_batch"] = pot_batched(C, iters)
                solvers["POT loop of ot.sinkhorn"] = pot_loop(C, iters)
                res = timed(solvers, warmup=B != BIG)  # the big grid: code already warm
                t_loop, plan_loop = res["POT loop of ot.sinkhorn"]
                res["POT loop of ot.sinkhorn"] = (t_loop * B / LOOP_SUBSET, plan_loop)
                t_ours = res["ours"][0]
                for name, (t, plan) in res.items():
                    rows.append(dict(shape=f"({B}, {N}, {M})", setting=label, iters=iters, solver=name,
                                     err=marginal_error(plan), ms=t,
                                     ratio=t / t_ours))
                    r = rows[-1]
                    print(f"{r['shape']:16} {label:24} {iters:4d} it  {name:26} err {r['err']:.2e}  "
                          f"{fmt_ms(t):>8} ms  x{r['ratio']:.1f}", flush=True)
            del C

    # forward + backward, training-style (3 iterations): ours (kernel path, hand-written backward),
    # the logsumexp path (plain autograd), POT batched with autodiff
    grad_rows = []
    B = 4096
    C0 = make_cost(B)
    W = torch.randn(B, N, M, generator=torch.Generator().manual_seed(1))
    lse_marg = otm._Marginals(None, None, N, M, torch.float32, C0.device)
    solvers = {
        "ours": lambda c: sinkhorn(c, epsilon=EPS, n_iters=3),
        "ours, logsumexp path (autograd)": lambda c: otm._sinkhorn_lse(c, False, lse_marg, EPS, 3, None),
        "POT solve_batch (grad='autodiff')": lambda c: ot.batch.solve_batch(
            M=c, reg=EPS, max_iter=3, tol=0.0, method="log_sinkhorn", reg_type="entropy", grad="autodiff").plan,
    }

    def step(solve):
        def run():
            c = C0.clone().requires_grad_()
            (solve(c) * W).sum().backward()
            return c.grad
        return run

    for name, (t, grad) in timed({name: step(solve) for name, solve in solvers.items()}).items():
        grad_rows.append((name, t, grad))
        print(f"fwd+bwd ({B}, {N}, {M}) 3 it  {name:34} {fmt_ms(t):>8} ms", flush=True)
    # same iterations, same gradient (POT's plan differs: it ends on the column update)
    grad_diff = float((grad_rows[0][2] - grad_rows[1][2]).abs().max() / grad_rows[1][2].abs().max())

    total = time.perf_counter() - t_start
    cores_used = (time.process_time() - cpu_start) / total  # ~2 alone on 2 cores, less if others run
    load1 = os.getloadavg()[0]
    write_markdown(rows, grad_rows, grad_diff, total, load0, load1, cores_used)
    print(f"wrote {OUT} ({total:.0f} s)")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_markdown(rows, grad_rows, grad_diff, total, load0, load1, cores_used) -> None:
    lines = [
        "# Sinkhorn benchmark: otmel.model.ot.sinkhorn vs POT",
        "",
        f"Date {datetime.date.today()}; {cpu_model()}, {os.cpu_count()} cores "
        f"(torch threads {torch.get_num_threads()}); torch {torch.__version__}, POT {ot.__version__}; "
        f"load average {load0:.1f} at start, {load1:.1f} at end; the benchmark process used "
        f"{cores_used:.2f} cores on average (CPU time / wall time: close to 2 when it has the machine to "
        f"itself, lower when other jobs compete). Produced by `bench/sinkhorn.py` in {total:.0f} s.",
        "",
        f"Float32 CPU torch tensors, B problems of size ({N}, {M}) per call, cosine costs in [0, 1] "
        f"(random 8-d features), uniform marginals, epsilon = {EPS}, forward only (no autograd). "
        "`err` = max over problems of max(‖Π1 − μ‖₁, ‖Πᵀ1 − ν‖₁), measured in fp64 on the returned plan. "
        "For `err <= target`, ours runs with `tol=target` (stops after `iters`, checked every 10) and POT's "
        "solvers run the same number of iterations, so the errors match. Time = median of "
        f"{REPEATS}-{MAX_REPEATS} calls (more for the fast ones) after a warm-up call (none on the "
        f"{BIG}-problem grid: the code is warm by then), the solvers' calls interleaved; the POT "
        f"loop runs {LOOP_SUBSET} problems and is extrapolated linearly to B (its err is over those). "
        "The logsumexp path (our fallback, same iterations) is timed at the default setting only. "
        "`× ours` = time / our time.",
        "",
        "| shape | setting | iters | solver | err | ms / call | × ours |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        solver = f"**{r['solver']}**" if r["solver"] == "ours" else r["solver"]
        lines.append(f"| {r['shape']} | {r['setting']} | {r['iters']} | {solver} | {r['err']:.1e} | "
                     f"{fmt_ms(r['ms'])} | {r['ratio']:.1f} |")
    lines += [
        "",
        f"Forward + backward (training step), (4096, {N}, {M}), 3 iterations, loss = ⟨Π, W⟩:",
        "",
        "| solver | ms / step | × ours |",
        "|---|---:|---:|",
    ]
    t0 = grad_rows[0][1]
    for name, t, _ in grad_rows:
        lines.append(f"| {name} | {fmt_ms(t)} | {t / t0:.1f} |")
    lines += [
        "",
        f"Our two paths give the same gradient (max abs difference / max abs gradient = {grad_diff:.1e}); "
        "POT's differs because its 3 iterations end on the column update (a different plan).",
        "",
        interpretation(rows, grad_rows),
        "",
    ]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines))


def interpretation(rows, grad_rows) -> str:
    def span(solver, big=None):
        rs = [r["ratio"] for r in rows if r["solver"] == solver
              and (big is None or r["shape"].startswith(f"({BIG},") == big)]
        return f"{min(rs):.1f}-{max(rs):.1f}×" if len(rs) > 1 else f"{rs[0]:.1f}×"

    t_ours = grad_rows[0][1]
    pot_vs_lse = [p["ms"] / q["ms"] for p in rows for q in rows
                  if p["solver"] == "POT solve_batch" and q["solver"] == "ours, logsumexp path"
                  and p["shape"] == q["shape"] and p["setting"] == q["setting"]]
    return (
        f"Interpretation: at the same marginal error, otmel.model.ot.sinkhorn is {span('POT solve_batch', False)} "
        f"faster than POT's batched log-domain solver (`ot.batch.solve_batch`) on the (256-4096, 40, 50) "
        f"shapes, {span('POT solve_batch', True)} on the {BIG}-problem training grid at the default 3 "
        f"iterations, and {span('POT loop of ot.sinkhorn')} faster than a Python loop of `ot.sinkhorn`; a "
        f"training step (forward + backward) is {grad_rows[2][1] / t_ours:.1f}× faster than POT's with "
        f"autodiff. The gain comes from evaluating each log-sum-exp as a batched mat-vec with the kernel "
        f"exp(-(C - min C)/ε) precomputed once (exact here: (max C − min C)/ε ≤ 20 ≤ 50) and, for "
        f"the backward, from the hand-written reverse pass: the same iterations with `torch.logsumexp` "
        f"(our fallback path) cost {span('ours, logsumexp path')} ours forward at 3 iterations "
        f"({grad_rows[1][1] / t_ours:.1f}× with backward). POT's batched solver runs those logsumexp "
        f"iterations too, plus an error check that materialises the plan every 10 iterations and the OT "
        f"value at the end, and costs {min(pot_vs_lse):.1f}-{max(pot_vs_lse):.1f}× our logsumexp path."
    )


if __name__ == "__main__":
    main()
