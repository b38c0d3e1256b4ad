"""Op rules: how each PyTorch operation becomes Keras. One module per op family.

Public API for users adding their own layers::

    from tracer.op_rules import rule, Layout
    from tracer.ir import OpNode

    @rule(MyLayer, layout=Layout.ANY)
    def my_layer(node: OpNode, ctx) -> "KerasTensor":
        return keras.ops.tanh(ctx.input(node, 0)) * node.module.scale
"""
from tracer.op_rules.registry import Layout, Rule, all_targets, lookup, register, rule, unregister

# rule families register themselves on import
from tracer.op_rules import sizes  # noqa: E402,F401  (first: shape and tensor_ops read it)
from tracer.op_rules import activation, conv, elementwise, linear, norm, pooling, reduce, resize, shape  # noqa: E402,F401
from tracer.op_rules import misc_ops  # noqa: E402,F401
from tracer.op_rules import attention, matmul, norm_layers, tensor_ops  # noqa: E402,F401
from tracer.op_rules import library  # noqa: E402,F401  (torchvision's ops, by import path)
from tracer.op_rules import embedding, logic, scatter  # noqa: E402,F401
from tracer.op_rules import recurrent, recurrent_cells  # noqa: E402,F401
from tracer.op_rules import aten  # noqa: E402,F401  (last: maps ATen ops onto the rules above)

__all__ = ["Layout", "Rule", "all_targets", "lookup", "register", "rule", "unregister"]
