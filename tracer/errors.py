"""Errors the converter raises. Each names what went wrong, where in the user's code, and what to do."""
from __future__ import annotations


class TracerError(Exception):
    """Base class: every error the converter raises on purpose."""


class InputError(TracerError):
    """The user's input (file, class name, shapes, weights) is not usable."""


class CaptureError(TracerError):
    """torch.fx could not capture the model."""


class UnsupportedOpsError(TracerError):
    """Some operations have no rule. ``ops`` lists each (op, source, module path, stub)."""

    def __init__(self, ops: list[dict]):
        self.ops = ops
        lines = [f"{len(ops)} operation(s) have no conversion rule; nothing was written.", ""]
        for i, o in enumerate(ops, 1):
            lines.append(f"{i}. {o['op']}  (node {o['node']}, called {o['count']}x)")
            lines.append(f"   at {o['source']}")
            if o["module_path"]:
                lines.append(f"   in module {o['module_path']}")
        lines += ["", "Add a rule for each (see README 'Adding a rule'), for example:", ""]
        lines += [o["stub"] for o in ops]
        super().__init__("\n".join(lines))


class ConversionError(TracerError):
    """A rule failed or produced a wrong shape while converting one node."""


class ParityError(TracerError):
    """PyTorch and the converted model disagree beyond tolerance."""

    def __init__(self, report):
        self.report = report
        super().__init__(report.summary())
