"""The KV-cached decoder computes what the transformers model computes (tiny random models, no hub).

Every logit it samples from is checked against the model's own forward pass over prompt + response,
with left-padded prompts of different lengths, grouped-query attention, biases, tied embeddings and
a scaled RoPE; with the same seed it draws the tokens ``generate`` draws.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from services.rollout.cached_decoder import CachedDecoder, supports
from services.rollout.sampler import HfSampler
from services.rollout.sampling import SamplingConfig, _left_pad, sample

EOS, PAD = 2, 0
PROMPTS = [[1, 5, 6, 7, 8], [1, 9], [1, 4, 4]]
COMMON = dict(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              max_position_embeddings=64, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)  # fmt: skip


def _llama(**extra: object) -> PreTrainedModel:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_attention_heads": 4, **extra})).eval()


def _qwen2() -> PreTrainedModel:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2)).eval()


MODELS = {
    "llama": lambda: _llama(num_key_value_heads=4),
    "llama-gqa-bias-tied-scaled-rope": lambda: _llama(
        num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0},
    ),
    "qwen2": _qwen2,  # q, k and v with biases
}


@pytest.fixture(params=list(MODELS), scope="module")
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return MODELS[request.param]()


def _generate(
    model: PreTrainedModel, k: int, max_new: int, seed: int, shared: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """k responses per prompt: one prefill per prompt (``repeats``), or k copies of each prompt."""
    ids, mask = _left_pad(PROMPTS, PAD)
    torch.manual_seed(seed)
    if shared:
        return CachedDecoder(model).generate(ids, mask, max_new, 1.0, EOS, PAD, repeats=k)
    return CachedDecoder(model).generate(
        ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0), max_new, 1.0, EOS, PAD
    )


@torch.no_grad()
def test_every_logit_equals_the_models_forward_pass(model: PreTrainedModel) -> None:
    tokens, logits = _generate(model, k=3, max_new=8, seed=1)
    rows = [p for p in PROMPTS for _ in range(3)]
    for row, prompt in enumerate(rows):
        response = tokens[row].tolist()
        ended = EOS in response
        length = response.index(EOS) + 1 if ended else len(response)
        seq = torch.tensor([prompt + response[:length]])
        want = model(input_ids=seq).logits[0, len(prompt) - 1 : len(prompt) - 1 + length]
        torch.testing.assert_close(logits[row, :length], want, atol=2e-5, rtol=1e-5)
        assert all(t == PAD for t in response[length:]), "after </s> a row only holds padding"


def test_repeats_of_a_prompt_draw_what_copies_of_it_draw(model: PreTrainedModel) -> None:
    shared, copies = _generate(model, k=3, max_new=8, seed=2), _generate(model, 3, 8, seed=2, shared=False)
    assert torch.equal(shared[0], copies[0])
    torch.testing.assert_close(shared[1], copies[1], atol=1e-6, rtol=1e-6)


def test_same_seed_draws_what_generate_draws(model: PreTrainedModel) -> None:
    cfg = SamplingConfig(responses_per_prompt=4, max_new_tokens=10, eos_token_id=EOS, pad_token_id=PAD)
    slow = sample(model, PROMPTS, cfg, generator_seed=3)
    fast = sample(model, PROMPTS, cfg, generator_seed=3, decoder=CachedDecoder(model))
    assert [s.response_ids for s in fast] == [s.response_ids for s in slow]
    for a, b in zip(fast, slow, strict=True):
        np.testing.assert_allclose(a.behaviour_logprobs, b.behaviour_logprobs, atol=2e-5)


def test_stops_when_every_row_has_ended() -> None:
    """Three ids (</s> among them): every row ends long before 40 tokens, and the loop with it."""
    model = _llama(vocab_size=3)
    ids, mask = _left_pad([[1, 1], [1]], PAD)
    torch.manual_seed(0)
    tokens, logits = CachedDecoder(model).generate(ids, mask, 40, 1.0, EOS, PAD)
    ends = [row.index(EOS) for row in tokens.tolist()]
    assert tokens.shape[1] == max(ends) + 1 < 40
    assert logits.shape == (2, tokens.shape[1], 3)
    for row, end in zip(tokens.tolist(), ends, strict=True):
        assert row[end + 1 :] == [PAD] * (len(row) - end - 1)


def test_architectures_it_cannot_match_stay_on_generate() -> None:
    assert supports(_llama())
    assert not supports(_llama(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}))
    assert not supports(_llama(hidden_act="gelu"))
    sliding = Qwen2Config(**COMMON, num_attention_heads=4, use_sliding_window=True, sliding_window=4,
                          max_window_layers=0)  # fmt: skip
    assert not supports(Qwen2ForCausalLM(sliding))
    with pytest.raises(ValueError, match="model"):
        CachedDecoder(_llama(hidden_act="gelu"))
    assert HfSampler(_llama(hidden_act="gelu")).decoder is None


def test_sampler_samples_from_reloaded_weights(tmp_path: Path) -> None:
    """After ``load_weights`` the fused matrices are the new weights' (the learner's next version)."""
    sampler = HfSampler(_llama())
    assert sampler.decoder is not None
    torch.manual_seed(5)
    newer = LlamaForCausalLM(sampler.model.config).eval()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(newer.state_dict(), str(path))
    sampler.load_weights(str(path))
    cfg = SamplingConfig(responses_per_prompt=2, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    for s in sampler.sample(PROMPTS, cfg, seed=0):
        with torch.no_grad():
            logits = newer(input_ids=torch.tensor([s.prompt_ids + s.response_ids])).logits[0]
        lp = torch.log_softmax(logits[len(s.prompt_ids) - 1 : -1], -1)
        want = lp.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1).numpy()
        np.testing.assert_allclose(s.behaviour_logprobs, want, atol=2e-5)


@pytest.mark.gpu
def test_on_cuda_every_logit_equals_the_models_forward_pass() -> None:
    model = _llama(num_key_value_heads=2).to("cuda")
    ids, mask = _left_pad(PROMPTS, PAD)
    torch.manual_seed(0)
    tokens, logits = CachedDecoder(model).generate(ids.cuda(), mask.cuda(), 8, 1.0, None, PAD)
    rows = torch.cat([ids.cuda(), tokens], 1)
    with torch.no_grad():
        full = model(input_ids=rows, attention_mask=torch.cat([mask.cuda(), torch.ones_like(tokens)], 1),
                     position_ids=(torch.cat([mask, torch.ones(len(PROMPTS), 8, dtype=mask.dtype)], 1)
                                   .cumsum(-1) - 1).clamp(min=0).cuda()).logits  # fmt: skip
    torch.testing.assert_close(logits, full[:, ids.shape[1] - 1 : -1].float(), atol=1e-4, rtol=1e-4)
