"""Exporters, one module per target (ONNX unrolled | Loop | stepped, quantization, TensorRT
engine build, MoE plugin, TensorRT-compatibility lint). None has landed yet: see the open
issues. Nothing here is imported by `mythos_deploy`."""
