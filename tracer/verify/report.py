"""What deep verification found: per-node differences, problems with their causes, the verdict.

:class:`VerifyReport` is built by :func:`tracer.verify.deep.deep_verify`; ``to_json()`` is strict JSON
(infinite errors as the string "inf") and is what report.json holds under "verify";
``save(outdir)`` writes that and report.html.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tracer.verify.parity import ParityReport


@dataclass(frozen=True)
class Stats:
    """Summary of one value: min/max/mean/std of its finite entries, and how many are not finite."""

    min: float
    max: float
    mean: float
    std: float
    nonfinite: int = 0

    @staticmethod
    def of(a: np.ndarray) -> "Stats":
        a = np.asarray(a, dtype=np.float64)
        finite = a[np.isfinite(a)]
        if not finite.size:
            return Stats(float("nan"), float("nan"), float("nan"), float("nan"), int(a.size))
        return Stats(float(finite.min()), float(finite.max()), float(finite.mean()), float(finite.std()),
                     int(a.size - finite.size))

    def __str__(self) -> str:
        bad = f", {self.nonfinite} NaN/Inf" if self.nonfinite else ""
        return f"min {self.min:.4g} max {self.max:.4g} mean {self.mean:.4g} std {self.std:.4g}{bad}"


@dataclass(frozen=True)
class NodeDiff:
    """One node's comparison on the trial where it was worst."""

    name: str
    index: int  # position in execution order
    depth: int  # longest path from an input
    op: str
    rule: str
    module_path: str
    file: str
    line: int
    code: str
    shape: tuple
    max_abs: float
    error: float  # max_abs / max(1, max|torch|): the figure held to the tolerance
    ok: bool
    cause: str  # "" | "tolerance" | "nonfinite" | "shape"
    detail: str
    inputs: tuple[str, ...]
    trial: str
    torch: Stats
    keras: Stats

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}" if self.file else "<unknown source>"

    def describe(self) -> str:
        where = f" in {self.module_path}" if self.module_path else ""
        return (f"{self.name} ({self.op}, rule {self.rule}){where} at {self.source}"
                + (f"\n      {self.code}" if self.code else ""))


GRADIENT_KINDS = ("gradient", "sgd_step", "bn_stats", "unmapped", "forward")  # problems found by tracer.verify.gradcheck
CHECKS = {  # problem kind -> the check that found it, as the summary names it
    "tolerance": "per-node parity", "nonfinite": "per-node parity (NaN/Inf)", "shape": "per-node shapes",
    "constant_output": "input dependence", "capture": "captured graph", "saved_model": "model.keras reload",
    "tflite": "fp32 TFLite nodes", "gradient": "gradient parity", "sgd_step": "training step",
    "bn_stats": "BatchNorm statistics", "unmapped": "gradient mapping", "forward": "training-mode forward",
}


@dataclass(frozen=True)
class Problem:
    kind: str  # tolerance | nonfinite | constant_output | shape | capture | saved_model | tflite | GRADIENT_KINDS
    where: str
    message: str


@dataclass
class VerifyReport:
    tolerance: float
    node_tolerance: float
    inputs: dict
    outputs: ParityReport
    nodes: list[NodeDiff] = field(default_factory=list)
    divergences: list[NodeDiff] = field(default_factory=list)  # failing nodes whose inputs were fine
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    gradients: Any = None  # gradcheck.GradReport
    tflite_nodes: list[NodeDiff] | None = None
    facts: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems and self.outputs.ok

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else 1

    @property
    def first_divergence(self) -> NodeDiff | None:
        return self.divergences[0] if self.divergences else None

    @property
    def max_node_error(self) -> float:
        return max((n.error for n in self.nodes), default=0.0)

    def failed_checks(self) -> list[str]:
        """The checks that failed, in the order found, each with how many problems it raised."""
        counts: dict[str, int] = {}
        for p in self.problems:
            check = ("output parity" if p.kind in ("tolerance", "nonfinite") and p.where.startswith("output ")
                     else CHECKS.get(p.kind, p.kind))
            counts[check] = counts.get(check, 0) + 1
        if not self.outputs.ok and "output parity" not in counts:
            counts = {"output parity": sum(not t.ok for t in self.outputs.trials), **counts}
        return [f"{check} ({n} {'problem' if n == 1 else 'problems'})" for check, n in counts.items()]

    def summary(self) -> str:
        failed = self.failed_checks()
        nodes = (f"{len(self.nodes)} nodes compared on {len(self.outputs.trials)} inputs; max node error "
                 f"{self.max_node_error:.3e}, tolerance {self.node_tolerance:g}")
        lines = [f"deep verify: OK ({nodes})" if self.ok else f"deep verify: FAILED: {', '.join(failed)} ({nodes})"]
        first = self.first_divergence
        if first is not None:
            lines += [f"  first divergence: {first.describe()}",
                      f"    {first.detail}",
                      f"    torch: {first.torch}", f"    keras: {first.keras}"]
        shown = f"{first.name} at {first.source}" if first is not None else None
        lines += [f"  {p.kind}: {p.where}: {p.message}" for p in self.problems  # gradients: in their summary
                  if p.where != shown and p.kind not in GRADIENT_KINDS]
        if self.tflite_nodes is not None:
            worst = max((n.error for n in self.tflite_nodes), default=0.0)
            lines.append(f"  fp32 TFLite: {len(self.tflite_nodes)} of {len(self.nodes)} nodes observable in LiteRT, "
                         f"max error {worst:.3e}")
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.gradients is not None:
            lines.append(self.gradients.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def node(n: NodeDiff) -> dict:
            return {**asdict(n), "source": n.source}
        return {"ok": self.ok, "verdict": "parity" if self.ok else "parity failed", "failed_checks": self.failed_checks(),
                "tolerance": self.tolerance, "node_tolerance": self.node_tolerance, "inputs": self.inputs,
                "max_node_error": self.max_node_error,
                "first_divergence": node(self.first_divergence) if self.first_divergence else None,
                "divergences": [node(n) for n in self.divergences],
                "problems": [asdict(p) for p in self.problems], "warnings": list(self.warnings),
                "outputs": self.outputs.to_dict(), "nodes": [node(n) for n in self.nodes],
                "gradients": self.gradients.to_dict() if self.gradients is not None else None,
                "tflite_nodes": [node(n) for n in self.tflite_nodes] if self.tflite_nodes is not None else None,
                "facts": self.facts}

    def to_json(self) -> str:
        """Strict JSON: infinite and NaN errors are written as the strings "inf" and "nan"."""
        return json.dumps(_strict(self.to_dict()), indent=2, default=str)

    def save(self, outdir: str | Path, title: str | None = None) -> Path:
        """Write ``outdir/report.json`` (this report under "verify", added to the report ``tracer convert``
        wrote there, if any) and ``outdir/report.html``; returns the HTML path."""
        from tracer.verify.report_html import write_reports
        return write_reports(Path(outdir), json.loads(self.to_json()), title)


def _strict(v: Any) -> Any:
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return v

