"""The reference model on CUDA (skipped without a CUDA device; `make gpu-check` measures more)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 0.1)])
def test_cuda_matches_cpu(tiny_model, dtype, tol):
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tiny_model(ids, n_loops=6).logits
        gpu = type(tiny_model)(tiny_model.cfg)
        gpu.load_state_dict(tiny_model.state_dict())
        gpu = gpu.to("cuda", dtype).eval()
        out = gpu(ids.cuda(), n_loops=6).logits.float().cpu()
        cache = gpu.new_cache(2, 16, 6)
        gpu(ids.cuda(), cache=cache, n_loops=6)
        step = gpu(ids[:, :1].cuda(), cache=cache, n_loops=6).logits
    assert (out - ref).abs().max().item() < tol and torch.isfinite(step).all()


def test_triton_kernel_on_cuda(tiny_model):
    pytest.importorskip("triton", reason="triton not installed")
    from mythos_deploy.moe import use_triton_kernel
    assert use_triton_kernel()
    ids = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    gpu = type(tiny_model)(tiny_model.cfg)
    gpu.load_state_dict(tiny_model.state_dict())
    gpu = gpu.cuda().eval()
    with torch.no_grad():
        out = gpu(ids.cuda(), n_loops=4).logits.cpu()
        ref = tiny_model(ids, n_loops=4).logits
    assert (out - ref).abs().max().item() < 1e-4
