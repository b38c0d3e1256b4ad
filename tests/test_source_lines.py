"""The user's line of a node: the deepest stack frame outside torch and tracer itself."""
from __future__ import annotations

import os

from tracer.capture.recording import OWN_DIRS, TORCH_DIR, source_of


class _Node:
    def __init__(self, frames: list[tuple[str, int, str]]):
        self.stack_trace = "".join(f'File "{f}", line {n}, in fn\n    {code}\n' for f, n, code in frames)


def test_library_beside_torch_is_named_not_skipped():
    """site-packages/torchvision/ starts with site-packages/torch as a string; its frames are the line to name."""
    torchvision = TORCH_DIR.rstrip(os.sep) + "vision" + os.sep + "ops" + os.sep + "misc.py"
    node = _Node([("/home/user/model.py", 7, "y = self.body(x)"), (torchvision, 12, "return g(x)"),
                  (TORCH_DIR + "nn/modules/module.py", 1775, "return forward_call(*args)")])
    src = source_of(node)
    assert (src.file, src.line, src.code) == (torchvision, 12, "return g(x)")


def test_torch_and_tracer_frames_are_skipped():
    own = OWN_DIRS[0] + "op_rules" + os.sep + "shape.py"
    node = _Node([("/home/user/model.py", 9, "return x.view(2, -1)"), (own, 40, "rule(node)"),
                  (TORCH_DIR + "fx/proxy.py", 300, "return self.tracer.create_proxy()")])
    src = source_of(node)
    assert (src.file, src.line) == ("/home/user/model.py", 9)
