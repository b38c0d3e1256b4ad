"""Verification, reading a conversion's result: output parity (``parity``), per-node deep
verification (``deep``, ``nodes``, ``report``, ``report_html``), gradient parity (``gradcheck``),
LiteRT parity (``litert``) and the ``tracer verify`` command (``command``)."""
