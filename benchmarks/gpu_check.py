"""GPU check (`make gpu-check`): on a CUDA machine, the Triton MoE kernel against the eager
op, the torch-on-CUDA path's parity with CPU fp32, and its decode latency against eager torch
on the same GPU. Where TensorRT is installed it would build and time engines; the TensorRT
path is not written yet, so that part reports "not implemented". Without CUDA it writes a
JSON that says so and exits 0.

    .venv/bin/python -m benchmarks.gpu_check [--out benchmarks/results/gpu_check.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch

from benchmarks.common import percentiles, write_json


def kernel_parity() -> list[dict]:
    from exporters.moe_kernel import moe_experts_triton
    from mythos_deploy.moe import moe_experts_reference
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
            ref = moe_experts_reference(*(t.float() if t.is_floating_point() else t for t in (x, idx, gates, *ws)))
            out = moe_experts_triton(x, idx, gates, *ws, grouped=grouped).float()
            rows.append({"N": N, "path": "grouped" if grouped else "per-token", "dtype": str(dtype).split(".")[-1],
                         "max_abs_error": float((out - ref).abs().max()),
                         "ref_max": float(ref.abs().max())})
    return rows


def decode_ms(model, prompt, tokens: int, loops: int) -> dict:
    from runtimes.eager import EagerBackend
    backend = EagerBackend(model)
    for _ in range(2):
        s = backend.start(1, prompt.shape[1] + tokens, loops)
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description="mythos-deploy GPU check")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    ap.add_argument("--preset", default="bench")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        path = write_json(args.out, {"benchmark": "gpu_check", "skipped": "no CUDA device"})
        print(f"no CUDA device: nothing to check; wrote {path}")
        return {}
    result: dict = {"benchmark": "gpu_check", "device": torch.cuda.get_device_name(0),
                    "tensorrt": "not implemented" if importlib.util.find_spec("tensorrt") else "tensorrt not installed"}
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
    path = write_json(args.out, result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
