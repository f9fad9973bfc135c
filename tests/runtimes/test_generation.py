import pytest
import torch

from mythos_deploy import InputError
from mythos_deploy.runtimes import SamplingParams, generate, stream_generate
from mythos_deploy.runtimes.sampling import filter_logits
from mythos_deploy.options import DecodeOptions


def test_greedy_equals_recomputing_the_full_sequence(tiny_model):
    prompt = [5, 9, 2, 7]
    res = generate(tiny_model, prompt, max_new_tokens=12, decode=DecodeOptions(n_loops=3))
    seq = list(prompt)
    with torch.no_grad():
        for tok in res.tokens[0]:
            logits = tiny_model(torch.tensor([seq]), n_loops=3).logits
            assert int(logits[0, -1].argmax()) == tok
            seq.append(tok)
    assert len(res.loops_used[0]) == 12 and all(1 <= n <= 3 for n in res.loops_used[0])


def test_batch_rows_match_single_rows(tiny_model):
    prompts = [[1, 2, 3], [200, 100, 50]]
    batch = generate(tiny_model, prompts, max_new_tokens=6)
    for b, p in enumerate(prompts):
        assert generate(tiny_model, p, max_new_tokens=6).tokens[0] == batch.tokens[b]


def test_sampling_is_deterministic_for_a_seed(tiny_model):
    params = SamplingParams(greedy=False, temperature=1.3, top_k=50, top_p=0.95, seed=3)
    a = generate(tiny_model, [1, 2], 16, sampling=params).tokens
    b = generate(tiny_model, [1, 2], 16, sampling=params).tokens
    c = generate(tiny_model, [1, 2], 16, sampling=SamplingParams(greedy=False, temperature=1.3, seed=4)).tokens
    assert a == b and a != c


def test_temperature_zero_is_greedy(tiny_model):
    greedy = generate(tiny_model, [4, 4], 8).tokens
    assert generate(tiny_model, [4, 4], 8, sampling=SamplingParams(greedy=False, temperature=0.0)).tokens == greedy


def test_stop_tokens_and_max_length(tiny_model):
    free = generate(tiny_model, [1, 2, 3], 10).tokens[0]
    stop = free[3]
    res = generate(tiny_model, [1, 2, 3], 10, stop_tokens=[stop])
    assert res.tokens[0] == free[: free.index(stop) + 1] and res.stop_reason == "stop_token"
    capped = generate(tiny_model, [1, 2, 3], 10, max_length=6)
    assert len(capped.tokens[0]) == 3 and capped.stop_reason == "max_length"


def test_streaming_yields_prefill_then_decode(tiny_model):
    events = list(stream_generate(tiny_model, [7, 8, 9], max_new_tokens=5))
    assert [e.step for e in events] == [0, 1, 2, 3, 4]
    assert generate(tiny_model, [7, 8, 9], 5).tokens[0] == [e.tokens[0] for e in events]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 0, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    kept = ~torch.isinf(filter_logits(logits, 0, 0.5))
    assert kept.tolist() == [[True, False, False, False]]


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=[]), "empty"),
    (dict(prompt=[[1, 2], [3]]), "equal lengths"),
    (dict(prompt=[1, 999]), "out of range"),
    (dict(prompt=[1], max_new_tokens=0), "max_new_tokens"),
    (dict(prompt=list(range(128))), "no room"),
    (dict(prompt=[1], decode=dict(n_loops=0)), "n_loops"),
    (dict(prompt=[1], decode=dict(act_threshold=0.0)), "act_threshold"),
    (dict(prompt=[1], max_length=10_000), "max_length"),
])
def test_bad_generation_input(tiny_model, kwargs, match):
    with pytest.raises(InputError, match=match):
        if "decode" in kwargs:
            kwargs = {**kwargs, "decode": DecodeOptions(**kwargs["decode"])}
        generate(tiny_model, **{"max_new_tokens": 4, **kwargs})


def test_bad_sampling_params():
    with pytest.raises(InputError, match="temperature"):
        SamplingParams(greedy=False, temperature=-1)
    with pytest.raises(InputError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InputError, match="top_k"):
        SamplingParams(top_k=-2)
