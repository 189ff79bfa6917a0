"""Check an exported library against the host model: every output, several inputs, two CPU models.

    verify_library("model.so", gm, (ids, mask), "linux-arm64")       # max |difference|, or VerifyError

The library runs under ``qemu-aarch64`` (``bitfx.targets.emulate``) once per CPU model and input set:

- CPUs: ``cortex-a53`` (ARMv8.0-A, the baseline every arm64 phone and board has) and ``cortex-a76``
  (ARMv8.2-A with dot product); targets that ask for extensions by name run on a core that has them
  (``cpus_for``). A library with instructions the core lacks (``udot`` from ``+dotprod``) dies with
  SIGILL, which is reported as such, with the instructions found.
- Inputs: the example, plus ``variants`` random ones of the same shapes and dtypes (floats
  ``mean + std * N(0, 1)`` of the example's, integers uniform in the example's ``[min, max]``, bools
  fair coins), seeded, so a kernel that is right only for the example does not pass.
- Outputs: all of them, flattened as ``torch.export`` flattens them (tuples, lists, dicts, Hugging
  Face ``ModelOutput``; ``None`` dropped), each named by its path (``last_hidden_state``, ``[1]``,
  ``encoder.attentions[0]``; a lone tensor is ``output``).
  An output passes when ``max |device - host| <= (atol + rtol) * max(1, max |host|)``; NaNs must be
  at the same places.

A failure raises ``VerifyError`` naming the output, the input set, the CPU and the difference.

Near-ties. A binary network is discontinuous: an activation within float rounding of its binarizer's
threshold (|u| = 3e-7 before a sign) can be decided the other way by a device whose LayerNorm or exp rounds
otherwise, and the flip runs through every later layer (3.0 on a real MiniLM's output). Such a library is
right, and its outputs differ. So on a mismatch (and with the host ``model``), ``explain_ties`` searches
for a few decisions, each within ``near`` (relative) of its threshold on the host, that taken the other
way on the host give the library's outputs within the same tolerance. Found: the output passes, and a
warning names each decision (op, module, element, margin); not found: ``VerifyError``, saying what was
searched. The search is greedy and small (``width`` candidates per step, those of the rows whose outputs
differ first, then the closest; ``max_flips`` steps; a host run per candidate), and only ever accepts outputs
the host itself computes with those flips.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.utils._pytree as pytree

from bitfx.ops import quantizers
from bitfx.targets import emulate

log = logging.getLogger(__name__)

# qemu CPU model -> what it stands for. ARMv8.0 first: it is the one most likely to fail.
CPUS = {"cortex-a53": "ARMv8.0-A", "cortex-a76": "ARMv8.2-A + dotprod", "max": "every extension qemu has"}
# mattr features a qemu CPU model must have, beyond ARMv8.0-A + NEON: the smallest model that has them.
_NEEDS_MAX = ("+i8mm", "+bf16", "+sve", "+sve2", "+sme")
# Instructions beyond ARMv8.0-A + NEON that LLVM emits for the mattrs a target may name.
_EXTENSION_OPS = re.compile(r"\t(udot|sdot|usdot|sudot|smmla|ummla|usmmla|bfdot|bfmmla|fmlal2?)\s")


class VerifyError(AssertionError):
    """The exported library disagrees with the host model (or dies) on an emulated CPU.

    Attributes: ``output`` (name of the output, or None), ``inputs`` (which input set),
    ``cpu`` (qemu CPU model), ``max_diff`` (float, or None when it did not run).
    """

    def __init__(self, message: str, *, output: str | None = None, inputs: str | None = None,
                 cpu: str | None = None, max_diff: float | None = None):
        super().__init__(message)
        self.output, self.inputs, self.cpu, self.max_diff = output, inputs, cpu, max_diff


def cpus_for(target) -> tuple[str, ...]:
    """The qemu CPU models a library of ``target`` must run on.

    An ARMv8.0-A target: ``cortex-a53`` and ``cortex-a76``. A target that asks for ``+dotprod`` by
    name (``linux-arm64-dotprod``) cannot run on an ARMv8.0 core: ``cortex-a76`` only; for i8mm,
    bf16 or SVE, qemu's ``max``.
    """
    from bitfx.targets import cross

    mattr = set(cross.get_target(target).target.get("mattr", ()))
    if mattr & set(_NEEDS_MAX):
        return ("max",)
    return ("cortex-a76",) if "+dotprod" in mattr else ("cortex-a53", "cortex-a76")


@dataclass(frozen=True)
class TieFlips:
    """What ``explain_ties`` found: decisions that, taken the other way on the host, give a library's outputs.

    ``explained``: whether they do; ``flips``: the decisions (``quantizers.Decision``: op and module,
    element, margin), in the order taken; ``max_diff``: the largest |library − host with the flips| left;
    ``near``: how many decisions of the unflipped host run were near their thresholds; ``runs``: host runs.
    """

    explained: bool
    flips: tuple
    max_diff: float
    near: int
    runs: int

    def describe(self) -> str:
        return "; ".join(f"{d.kind} decision of {d.label or f'site {d.site}'} at {list(d.element)}, "
                         f"relative margin {d.margin:.2g}" for d in self.flips)


def verify_library(path: str | Path, model: Callable | None, example_inputs: Sequence[Any],
                   target: str = "linux-arm64", *, expected=None, variants: int = 2,
                   cpus: Sequence[str] | None = None, rtol: float = 1e-4, atol: float = 1e-4,
                   seed: int = 0, output_names: Sequence[str] | None = None, ties: bool = True,
                   near: float = 1e-4, max_flips: int = 4) -> float:
    """Run ``path`` under qemu on each CPU and input set and compare with ``model`` on the host.

    Args:
        path: a library written by ``bitfx.export`` for an aarch64 ``target``.
        model: the host model (called under ``torch.no_grad``); None checks only ``expected``
            on the example inputs.
        example_inputs: the inputs the library was exported with.
        expected: the host outputs on ``example_inputs`` (computed from ``model`` when None).
        variants: random input sets drawn beside the example (needs ``model``).
        cpus: qemu CPU models (``CPUS``; default ``cpus_for(target)``).
        rtol, atol: tolerances, both scaled by ``max(1, max |host output|)``.
        output_names: names for the flat outputs when ``model`` returns them flat (as the graph
            ``bitfx.export`` builds does); ``output_names(structured_gm)`` gives the model's own.
        ties: on a mismatch, look for near-tie decisions that explain it (``explain_ties``; needs
            ``model``); ``near``: how close to its threshold (relative) a decision must be to count;
            ``max_flips``: at most this many per input set and CPU.

    Returns:
        The largest absolute difference seen (against the host with the flips, where a near-tie
        explained a mismatch; each such case is logged as a warning).

    Raises:
        VerifyError: a mismatch no near-ties explain (naming output, inputs, CPU, difference), a
            different number or shape of outputs, or the library failing to run (SIGILL: with the
            instructions found).
    """
    example = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if model is None and expected is None:
        raise ValueError("verify_library needs the host model or the expected outputs")
    cpus = cpus_for(target) if cpus is None else tuple(cpus)
    sets = [("the example inputs", example)]
    if model is not None:
        gen = torch.Generator().manual_seed(seed)
        sets += [(f"random inputs #{i + 1} (seed {seed})", random_like(example, gen))
                 for i in range(variants)]
    hosts = []
    for label, inputs in sets:
        if expected is not None and inputs is example:
            want = expected
        else:
            with torch.no_grad():
                want = model(*inputs)
        names, host = flatten_outputs(want)
        if output_names is not None and len(output_names) == len(names):
            names = list(output_names)
        hosts.append((names, host))
    # The qemu runs are independent processes: run them side by side, judge them in a fixed order
    # (example first, ARMv8.0 first), so the error reported does not depend on timing.
    jobs = [(label, [_numpy(t) for t in inputs], cpu) for label, inputs in sets for cpu in cpus]

    def run(job):
        label, arrays, cpu = job
        try:
            return emulate.run_emulated(path, arrays, target, cpu=cpu)
        except emulate.EmulationError as e:
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        results = list(pool.map(run, jobs))
    worst = 0.0
    for (label, _, cpu), outs in zip(jobs, results):
        if isinstance(outs, emulate.EmulationError):
            raise _run_failure(path, outs, label, cpu) from outs
        index = [lbl for lbl, _ in sets].index(label)
        names, host = hosts[index]
        try:
            worst = max(worst, _compare(path, names, host, outs, label, cpu, rtol, atol))
        except VerifyError as e:
            if not ties or e.max_diff is None or math.isnan(e.max_diff) or len(outs) != len(host):
                raise
            if model is None:
                raise VerifyError(f"{e} (pass the host model to look for near-tie decisions that explain it)",
                                  output=e.output, inputs=e.inputs, cpu=e.cpu, max_diff=e.max_diff) from None
            found = explain_ties(model, sets[index][1], outs, rtol=rtol, atol=atol, near=near,
                                 max_flips=max_flips)
            if not found.explained:
                raise VerifyError(f"{e}. Not a near-tie: of the host's {found.near} activation decisions within "
                                  f"{near:g} (relative) of their thresholds, no {max_flips} or fewer taken the other "
                                  f"way give the library's outputs ({found.runs} host runs)", output=e.output,
                                  inputs=e.inputs, cpu=e.cpu, max_diff=e.max_diff) from None
            log.warning("%s on %s, %s: output %s differed by %.3g; the host gives the library's outputs (within "
                        "%.3g) when %d near-tie decision%s go%s the other way: %s", Path(path).name, cpu, label,
                        e.output, e.max_diff, found.max_diff, len(found.flips), "s" if len(found.flips) > 1 else "",
                        "" if len(found.flips) > 1 else "es", found.describe())
            worst = max(worst, found.max_diff)
    return worst


def explain_ties(model: Callable, inputs: Sequence[Any], outputs: Sequence[np.ndarray], *, rtol: float = 1e-4,
                 atol: float = 1e-4, near: float = 1e-4, max_flips: int = 4, width: int = 16) -> TieFlips:
    """Decisions near their thresholds that, flipped on the host, give ``outputs`` (a library's).

    Runs ``model`` on ``inputs`` recording every activation decision within ``near`` of its threshold
    (``quantizers.recording``; a GraphModule runs under an interpreter, so each is named by its node and
    module). Greedy: at each step, tries ``width`` decisions not yet taken, each flipped on top of the ones
    already taken, and keeps the one that leaves fewest output elements out of tolerance (then the least
    squared difference); stops when every output is within ``(atol + rtol) * max(1, max |host|)``
    (``explained``), when no candidate improves, or after ``max_flips`` flips. A decision flipped upstream
    moves later ones, so each run's own near decisions are the next step's candidates.

    Which ``width`` are tried first is only a ranking (any accepted set is checked against every output):
    decisions of a row (batch item and token) whose outputs differ, then of a batch item that differs (a
    model does not mix batch items), then the rest; within each, the closest first, lone exact zeros last
    (most zeros are exact integer sums, decided alike everywhere).
    """
    def run(flips):
        decisions = quantizers.Decisions(near, [d.key for d in flips])
        with torch.no_grad(), quantizers.recording(decisions):
            out = _Labelled(model, decisions).run(*inputs) if isinstance(model, torch.fx.GraphModule) \
                else model(*inputs)
        return flatten_outputs(out)[1], decisions.found

    def score(host):
        """(elements out of tolerance, sum of squared differences, max difference, rows out of tolerance)."""
        if len(host) != len(outputs):
            return math.inf, math.inf, math.inf, None
        bad, squares, worst, rows = 0, 0.0, 0.0, set()
        for o, e in zip(outputs, host):
            o = np.asarray(o, dtype=np.float64)
            if o.shape != e.shape or (np.isnan(o) != np.isnan(e)).any():
                return math.inf, math.inf, math.inf, None
            diff = np.nan_to_num(np.abs(o - e), nan=0.0)
            tol = _tolerance(e, rtol, atol)
            out = diff > tol
            bad += int(out.sum())
            squares += float(np.sum(diff ** 2))
            worst = max(worst, float(diff.max()) if diff.size else 0.0)
            if e.ndim >= 2:
                rows |= {(e.shape[:2], tuple(i)) for i in np.argwhere(out.any(axis=tuple(range(2, e.ndim))))}
        return bad, squares, worst, rows

    def ranked(found, rows):
        """``rows``: {((B, T), (b, t))} of the outputs out of tolerance. A decision's batch item is its
        first index, its token the one before its features ([B, T, K]; [B, H, T, D] in attention)."""
        batches = {(sizes[0], at[0]) for sizes, at in rows}

        def key(d):
            shape, at = d.shape, d.element
            in_batch = len(shape) >= 2 and (shape[0], at[0]) in batches
            in_row = len(shape) >= 3 and ((shape[0], shape[-2]), (at[0], at[-2])) in rows
            return -(in_batch + in_row), d.margin == 0, d.distance, d.site, d.index
        return sorted(found, key=key)

    flips: tuple = ()
    host, found = run(flips)
    current, runs, near_count = score(host), 1, len(found)
    while len(flips) < max_flips and 0 < current[0] < math.inf:
        taken = {d.key for d in flips}
        best = None
        for candidate in [d for d in ranked(found, current[3]) if d.key not in taken][:width]:
            trial_host, trial_found = run(flips + (candidate,))
            runs += 1
            trial = score(trial_host)
            if best is None or trial[:2] < best[0][:2]:
                best = (trial, candidate, trial_found)
            if trial[0] == 0:
                break
        if best is None or best[0][:2] >= current[:2]:
            break
        current, flips, found = best[0], flips + (best[1],), best[2]
    return TieFlips(current[0] == 0, flips, current[2], near_count, runs)


class _Labelled(torch.fx.Interpreter):
    """Runs a GraphModule telling the decision recorder which node (and module) is running."""

    def __init__(self, gm, decisions):
        super().__init__(gm)
        self.decisions = decisions

    def run_node(self, n):
        stack = n.meta.get("nn_module_stack") or {}
        module = next(reversed(stack.values()))[0] if stack else None
        self.decisions.label = f"{n.name} ({module})" if module else n.name
        return super().run_node(n)


def flatten_outputs(outputs) -> tuple[list[str], list[np.ndarray]]:
    """(names, float64 arrays) of every tensor in ``outputs``, in ``torch.export``'s order."""
    leaves, _ = pytree.tree_flatten_with_path(outputs)
    names, arrays = [], []
    for key_path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            name = re.sub(r"\['([^']*)'\]", r".\1", pytree.keystr(key_path)).lstrip(".")
            names.append(name or "output")
            arrays.append(leaf.detach().cpu().to(torch.float64).numpy())
    return names, arrays


def output_names(gm) -> list[str] | None:
    """Names of the outputs of a captured GraphModule, from its output structure (pytree codegen),
    or None when it has none (``[0]``... then)."""
    info = getattr(getattr(getattr(gm, "graph", None), "_codegen", None), "pytree_info", None)
    spec = getattr(info, "out_spec", None)
    if spec is None:
        return None
    return _spec_names(spec, "") or None


def _spec_names(spec, prefix: str) -> list[str]:
    """Leaf names read from the tree spec itself (no dummy output is built: a custom node such as HF's
    ``DynamicCache`` cannot be rebuilt from placeholder leaves): a child is ``.key`` when the node's
    context lists one string per child (dicts, ``ModelOutput``), ``[i]`` otherwise."""
    if spec.is_leaf():
        return [prefix.lstrip(".") or "output"]
    ctx, children = spec.context, spec.children()
    keys = list(ctx) if isinstance(ctx, (list, tuple)) else None
    named = keys is not None and len(keys) == len(children) and all(isinstance(k, str) for k in keys)
    names = []
    for i, child in enumerate(children):
        names += _spec_names(child, f"{prefix}.{keys[i]}" if named else f"{prefix}[{i}]")
    return names


def random_like(inputs: Sequence[Any], gen: torch.Generator) -> tuple:
    """Inputs of the same shapes and dtypes: floats around the example's mean/std, integers in its range."""
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            out.append(x)
        elif x.dtype == torch.bool:
            out.append(torch.randint(0, 2, x.shape, generator=gen).bool())
        elif x.is_floating_point():
            f = x.detach().float()
            std = float(f.std()) if f.numel() > 1 else 1.0
            r = torch.randn(x.shape, generator=gen) * (std or 1.0) + float(f.mean())
            out.append(r.to(x.dtype))
        else:
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
            out.append(torch.randint(lo, hi + 1, x.shape, generator=gen).to(x.dtype))
    return tuple(out)


def extension_instructions(path: str | Path) -> dict[str, int]:
    """Counts of instructions beyond ARMv8.0-A + NEON in ``path`` (``udot``...), by mnemonic.

    Uses ``aarch64-linux-gnu-objdump``, which decodes every extension (LLVM 14's objdump prints
    them as ``<unknown>`` unless told the features). Empty when objdump is not installed.
    """
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        return {}
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(path)], capture_output=True,
                          text=True).stdout
    counts: dict[str, int] = {}
    for m in _EXTENSION_OPS.finditer(text):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def _compare(path, names, host, outs, label, cpu, rtol, atol) -> float:
    lib = Path(path).name
    if len(outs) != len(host):
        raise VerifyError(f"{lib} on {cpu} returned {len(outs)} outputs, the host model {len(host)} "
                          f"({', '.join(names)}), on {label}", inputs=label, cpu=cpu)
    worst = 0.0
    for name, o, e in zip(names, outs, host):
        if o.shape != e.shape:
            raise VerifyError(f"output {name} of {lib} on {cpu}: shape {o.shape} on the device, "
                              f"{e.shape} on the host, on {label}", output=name, inputs=label, cpu=cpu)
        o = o.astype(np.float64)
        nan_o, nan_e = np.isnan(o), np.isnan(e)
        if (nan_o != nan_e).any():
            raise VerifyError(f"output {name} of {lib} on {cpu} ({CPUS.get(cpu, cpu)}): NaN at "
                              f"{int((nan_o != nan_e).sum())} places where the host has none (or the "
                              f"reverse), on {label}", output=name, inputs=label, cpu=cpu,
                              max_diff=float("nan"))
        ok = ~nan_e
        diff = float(np.max(np.abs(o[ok] - e[ok]))) if ok.any() else 0.0
        tol = _tolerance(e, rtol, atol)
        if not diff <= tol:
            raise VerifyError(f"output {name} of {lib} differs from the host model on {cpu} "
                              f"({CPUS.get(cpu, cpu)}), on {label}: max |difference| = {diff:.3g} "
                              f"(tolerance {tol:.3g})", output=name, inputs=label, cpu=cpu, max_diff=diff)
        worst = max(worst, diff)
    return worst


def _tolerance(host: np.ndarray, rtol: float, atol: float) -> float:
    """``(atol + rtol) * max(1, max |host|)`` over the host's non-NaN values."""
    finite = host[~np.isnan(host)]
    return (atol + rtol) * max(1.0, float(np.max(np.abs(finite))) if finite.size else 1.0)


def _run_failure(path, err: emulate.EmulationError, label: str, cpu: str) -> VerifyError:
    lib = Path(path).name
    if err.signal == 4:
        found = extension_instructions(path)
        what = (", ".join(f"{n} × {op}" for op, n in sorted(found.items())) if found
                else "no udot/sdot/i8mm/bf16 instruction found by objdump")
        return VerifyError(f"{lib} died with SIGILL (illegal instruction) on {cpu} "
                           f"({CPUS.get(cpu, cpu)}), on {label}: it uses instructions this CPU lacks "
                           f"({what}); build it without +dotprod/+i8mm for ARMv8.0 cores",
                           inputs=label, cpu=cpu)
    return VerifyError(f"{lib} failed to run on {cpu} ({CPUS.get(cpu, cpu)}), on {label}: "
                       f"exit status {err.returncode}\n{err.output[-2000:]}", inputs=label, cpu=cpu)


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
