"""Stage 1, capture: a PyTorch model into the NetworkX IR of frozen ``OpNode``s (``tracer.ir``).

``fx`` traces with torch.fx (the default), ``export`` falls back to torch.export (ATen level);
``recording`` holds what both share: the recording run and the graph builder.
"""
