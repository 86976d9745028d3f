"""DeTransformer Edge: one Transformer across the small devices of a home, with block parallelism."""

__version__ = "0.1.0"
