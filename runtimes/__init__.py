"""Runtimes: one Backend/Session interface over eager torch and onnxruntime (TensorRT lands
with its issue), plus the shared generation loop (sampling, stop tokens, streaming, ACT
control, cache management). onnxruntime is imported only when an ONNX artifact is opened."""

from runtimes.base import EXIT_MODES, Backend, Session, StepOutput
from runtimes.generation import GenerationResult, TokenEvent, generate, stream_generate
from runtimes.loader import load
from runtimes.sampling import SamplingParams

__all__ = ["Backend", "Session", "StepOutput", "EXIT_MODES", "GenerationResult", "TokenEvent",
           "SamplingParams", "generate", "stream_generate", "load"]
