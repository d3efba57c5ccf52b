"""Baton: a Kubernetes operator for disaggregated prefill/decode LLM serving with TensorRT-LLM."""

__version__ = "0.1.0"
