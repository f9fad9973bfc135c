"""Runtimes (`mythos_deploy.runtimes`): one Backend/Session interface over eager torch,
onnxruntime and TensorRT engines, the TensorRT plugin registration (used by `build` and by the
TensorRT backend), and the shared generation loop (sampling, stop tokens, streaming, ACT
control, cache management). Nothing here imports the exporters. onnxruntime and tensorrt are
imported only when an artifact that needs them is opened."""

from mythos_deploy.options import DecodeOptions, ExitMode
from mythos_deploy.runtimes.base import Backend, Session, StepOutput
from mythos_deploy.runtimes.generation import GenerationResult, TokenEvent, generate, stream_generate
from mythos_deploy.runtimes.loader import load
from mythos_deploy.runtimes.sampling import SamplingParams

__all__ = ["Backend", "Session", "StepOutput", "DecodeOptions", "ExitMode", "GenerationResult", "TokenEvent",
           "SamplingParams", "generate", "stream_generate", "load"]
