"""Runtimes: one interface over backends plus the shared generation loop.

Today: the eager torch reference (`runtimes.generation.generate` on a `MythosModel`).
The onnxruntime and TensorRT backends land with the export and runtime issues.
"""

from runtimes.generation import GenerationResult, SamplingParams, generate, stream_generate

__all__ = ["GenerationResult", "SamplingParams", "generate", "stream_generate"]
