"""Student sampling records the right log-probs and top-K ids (a tiny random model, no hub)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from services.rollout.sampling import SamplingConfig, sample

EOS = 2


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def _forward_logprobs(
    model: LlamaForCausalLM, prompt: list[int], response: list[int], temp: float
) -> torch.Tensor:
    seq = torch.tensor([prompt + response])
    logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temp, -1)


def test_groups_logprobs_and_top_k_match_a_forward_pass(model: LlamaForCausalLM) -> None:
    prompts = [[1, 5, 6, 7], [1, 9]]
    cfg = SamplingConfig(
        responses_per_prompt=3, temperature=0.7, max_new_tokens=8, record_top_k=5, eos_token_id=EOS
    )
    samples = sample(model, prompts, cfg, generator_seed=1)
    assert [(s.prompt_index, s.group_index) for s in samples] == [(p, g) for p in range(2) for g in range(3)]
    for s in samples:
        assert s.prompt_ids == prompts[s.prompt_index]
        T = len(s.response_ids)
        assert 1 <= T <= 8
        assert EOS not in s.response_ids[:-1], "a response stops at its first EOS"
        lp = _forward_logprobs(model, s.prompt_ids, s.response_ids, cfg.temperature)
        want = lp.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1).numpy()
        np.testing.assert_allclose(s.behaviour_logprobs, want, atol=1e-4)
        assert s.top_k_ids.shape == (T, 5) and s.top_k_ids.dtype == np.int32
        np.testing.assert_array_equal(np.sort(s.top_k_ids, 1), np.sort(lp.topk(5, -1).indices.numpy(), 1))


def test_same_seed_same_samples(model: LlamaForCausalLM) -> None:
    cfg = SamplingConfig(responses_per_prompt=2, max_new_tokens=6)
    a = sample(model, [[1, 3]], cfg, generator_seed=7)
    b = sample(model, [[1, 3]], cfg, generator_seed=7)
    assert [s.response_ids for s in a] == [s.response_ids for s in b]


def test_empty_prompt_is_refused(model: LlamaForCausalLM) -> None:
    with pytest.raises(ValueError, match="prompts"):
        sample(model, [[1], []], SamplingConfig())
