"""easier-export: entropy-guided depth reduction (EASIER), folding, and verified ONNX export."""

__version__ = "0.1.0"
