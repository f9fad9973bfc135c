"""GPU check (`make gpu-check`): on a CUDA machine, the Triton MoE kernel against the eager
op, the torch-on-CUDA path's parity with CPU fp32, and its decode latency against eager torch
on the same GPU. Where TensorRT is installed it also exports the preset with the plugin
lowering, builds fp16 engines (`build`), and measures the TensorRT backend's greedy agreement
with eager and its decode latency (target: 3x eager torch on the same GPU; torch-on-CUDA 2x).
Without CUDA it writes a JSON that says so and exits 0.

    .venv/bin/python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check.json]
"""

from __future__ import annotations

from mythos_deploy.options import DecodeOptions

import argparse
import importlib.util
import time

import numpy as np
import torch

from benchmarks.common import percentiles, write_json


def kernel_parity() -> list[dict]:
    from mythos_deploy.moe_kernel import moe_experts_triton
    from mythos_deploy.moe import moe_experts_vectorised
    rows = []
    for N, grouped in ((1, False), (4, False), (64, False), (64, True), (512, True), (4096, True)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            g = torch.Generator(device="cuda").manual_seed(N)
            E, K, D, F = 16, 2, 512, 256
            x = torch.randn(N, D, device="cuda", generator=g).to(dtype)
            idx = torch.randn(N, E, device="cuda", generator=g).topk(K, -1).indices
            gates = torch.rand(N, K, device="cuda", generator=g)
            gates = (gates / gates.sum(-1, keepdim=True)).to(dtype)
            ws = [(torch.randn(E, F, D, device="cuda", generator=g) * 0.05).to(dtype),
                  (torch.randn(E, F, D, device="cuda", generator=g) * 0.05).to(dtype),
                  (torch.randn(E, D, F, device="cuda", generator=g) * 0.05).to(dtype)]
            ref = moe_experts_vectorised(*(t.float() if t.is_floating_point() else t for t in (x, idx, gates, *ws)))
            out = moe_experts_triton(x, idx, gates, *ws, grouped=grouped).float()
            rows.append({"N": N, "path": "grouped" if grouped else "per-token", "dtype": str(dtype).split(".")[-1],
                         "max_abs_error": float((out - ref).abs().max()),
                         "ref_max": float(ref.abs().max())})
    return rows


def decode_ms(model, prompt, tokens: int, loops: int) -> dict:
    from mythos_deploy.runtimes.eager import EagerBackend
    backend = EagerBackend(model)
    for _ in range(2):
        s = backend.start(1, prompt.shape[1] + tokens, DecodeOptions(loops))
        out = s.step(prompt)
        times = []
        for _ in range(tokens - 1):
            nxt = np.array([[int(out.logits[0, -1].argmax())]])
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = s.step(nxt)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return percentiles(times)


def tensorrt_check(model, prompt, loops: int, eager_p50_ms: float) -> dict:
    """Export (unroll, plugin), build fp16 engines, then greedy agreement with eager over 64
    tokens and decode latency through the TensorRT backend."""
    import tempfile
    from pathlib import Path

    from mythos_deploy.exporters.onnx_export import OnnxExportOptions, export_onnx
    from mythos_deploy.exporters.trt_build import BuildOptions, build_engines
    from mythos_deploy import save_checkpoint
    from mythos_deploy.runtimes import generate, load
    with tempfile.TemporaryDirectory() as d:
        ck, onnx_dir, eng = Path(d) / "ck", Path(d) / "onnx", Path(d) / "eng"
        save_checkpoint(model, ck)
        export_onnx(ck, onnx_dir, OnnxExportOptions(loop="unroll", loops=loops, moe="plugin", validate=False))
        t0 = time.perf_counter()
        build_engines(onnx_dir, eng, BuildOptions(precision="fp16"))
        built_s = time.perf_counter() - t0
        ids = prompt[0].tolist()
        ref = generate(load(ck), ids, 64, decode=DecodeOptions(loops)).tokens[0]
        trt_backend = load(eng)
        got = generate(trt_backend, ids, 64, decode=DecodeOptions(loops)).tokens[0]
        s = trt_backend.start(1, len(ids) + 64, DecodeOptions(loops))
        out = s.step(np.array([ids]))
        times = []
        for _ in range(63):
            t1 = time.perf_counter()
            out = s.step(np.array([[int(out.logits[0, -1].argmax())]]))
            times.append(time.perf_counter() - t1)
    lat = percentiles(times)
    return {"build_s": built_s, "greedy_agreement_64": float(np.mean(np.array(ref) == np.array(got))),
            "decode": lat, "speedup_vs_eager_cuda_fp32": eager_p50_ms / lat["p50_ms"], "target_speedup": 3.0}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="mythos-deploy GPU check")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    ap.add_argument("--preset", default="bench")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        path = write_json(args.out, {"benchmark": "gpu_check", "skipped": "no CUDA device"})
        print(f"no CUDA device: nothing to check; wrote {path}")
        return {}
    result: dict = {"benchmark": "gpu_check", "device": torch.cuda.get_device_name(0), "tensorrt": "tensorrt not installed"}
    has_triton = importlib.util.find_spec("triton") is not None
    if has_triton:
        result["kernel_parity"] = kernel_parity()
    from benchmarks.common import load_oracle
    from mythos_deploy import MythosConfig, from_openmythos
    cfg = MythosConfig.from_name(args.preset)
    cpu = from_openmythos(load_oracle().make_openmythos(cfg.to_dict(), seed=0, spread_halting=False))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(1, 32))
    loops = cfg.max_loop_iters
    with torch.no_grad():
        ref = cpu(torch.from_numpy(prompt), n_loops=loops).logits
        gpu = cpu.to("cuda")
        result["decode_eager_cuda_fp32"] = decode_ms(gpu, prompt, 64, loops)
        if has_triton:
            from mythos_deploy.moe import use_triton_kernel
            use_triton_kernel()
            out = gpu(torch.from_numpy(prompt).cuda(), n_loops=loops).logits.cpu()
            result["parity_cuda_triton_fp32_vs_cpu"] = {"max_abs_logit_error": float((out - ref).abs().max())}
            result["decode_torch_cuda_triton_fp32"] = decode_ms(gpu, prompt, 64, loops)
            half = gpu.to(torch.bfloat16)
            outh = half(torch.from_numpy(prompt).cuda(), n_loops=loops).logits.float().cpu()
            result["parity_cuda_triton_bf16_vs_cpu"] = {
                "max_abs_logit_error": float((outh - ref).abs().max()),
                "greedy_agreement": float((outh.argmax(-1) == ref.argmax(-1)).float().mean())}
            result["decode_torch_cuda_triton_bf16"] = decode_ms(half, prompt, 64, loops)
            e, t = result["decode_eager_cuda_fp32"]["p50_ms"], result["decode_torch_cuda_triton_fp32"]["p50_ms"]
            result["speedup_triton_vs_eager_fp32"] = e / t
        if importlib.util.find_spec("tensorrt"):
            fresh = from_openmythos(load_oracle().make_openmythos(cfg.to_dict(), seed=0, spread_halting=False))
            result["tensorrt"] = tensorrt_check(fresh, prompt, loops, result["decode_eager_cuda_fp32"]["p50_ms"])
    path = write_json(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
