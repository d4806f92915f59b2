"""The shared-prompt forward pass (the learner's, the teacher's) gives the model's logits and gradients.

Tiny random Llama-family models (those of tests/test_cached_decoder.py: MHA; GQA with biases, tied
embeddings and a scaled RoPE; Qwen2), batches packed as the learner packs them: prompts of
different lengths shared by several responses, responses of different lengths, one-token ones.
"""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedModel

from learner.batching import Packed, pack_sequences, response_logits
from services.rollout import shared_prompt
from tests.test_cached_decoder import MODELS
from tests.test_learner_batching import rollout


def _packed(groups: list[tuple[list[int], list[list[int]]]]) -> Packed:
    """Prompt + response rows, each prompt answered by each of its responses."""
    records = [rollout(p + r, len(p)) for p, rs in groups for r in rs]
    return pack_sequences(records)


BATCHES = {
    "shared prompts, mixed lengths": [
        ([1, 5, 6, 7, 8], [[9, 10, 2], [11, 2], [12, 13, 14, 15, 2]]),
        ([1, 9], [[3, 4, 2], [3, 2]]),
        ([1, 4, 4], [[20]]),
    ],
    "one-token responses": [([1, 5, 6], [[2], [7]]), ([1, 8], [[2]])],
    "one row": [([1, 5, 6, 7], [[8, 9, 10, 2]])],
    # the padding id as a real token: its embedding row gets no gradient, as in the model's layer
    "padding id inside": [([1, 0, 6], [[0, 9, 2], [7, 0]])],
}


@pytest.fixture(params=list(MODELS))
def model(request: pytest.FixtureRequest) -> PreTrainedModel:
    return MODELS[request.param]().train()


def _plain(model: PreTrainedModel, packed: Packed) -> torch.Tensor:
    logits = model(input_ids=packed.input_ids, attention_mask=packed.attention_mask).logits
    return response_logits(logits, packed)


def _shared(model: PreTrainedModel, packed: Packed) -> torch.Tensor:
    return shared_prompt.response_logits(model, packed.input_ids, packed.starts, packed.lengths)


def _loss(logits: torch.Tensor, packed: Packed) -> torch.Tensor:
    """A loss over every response position, weighted so that each position's gradient differs."""
    mask = torch.arange(packed.width)[None, :] < packed.lengths[:, None]
    weights = torch.linspace(0.5, 1.5, logits.shape[-1])
    return (logits.log_softmax(-1) * weights)[mask].sum()


@pytest.mark.parametrize("batch", list(BATCHES))
def test_logits_and_gradients_equal_the_models_forward_pass(model: PreTrainedModel, batch: str) -> None:
    packed = _packed(BATCHES[batch])
    mask = torch.arange(packed.width)[None, :] < packed.lengths[:, None]
    expected = _plain(model, packed)
    got = _shared(model, packed)
    assert got.shape == expected.shape
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)

    grads = []
    for logits in (_plain(model, packed), _shared(model, packed)):
        model.zero_grad(set_to_none=True)
        _loss(logits, packed).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_rows_with_the_same_prompt_share_one_prompt_row() -> None:
    packed = _packed(BATCHES["shared prompts, mixed lengths"])
    g = shared_prompt.prompt_groups(packed.input_ids, packed.starts, packed.lengths)
    assert g.group.tolist() == [0, 0, 0, 1, 1, 2]
    assert g.prompts.tolist() == [[1, 5, 6, 7, 8], [0, 0, 0, 1, 9], [0, 0, 1, 4, 4]]  # left-padded
    assert g.prompt_mask.sum(-1).tolist() == [5, 2, 3]
    # each response without its last token, right-padded to the longest response minus one
    assert g.responses.tolist()[:3] == [[9, 10, 0, 0], [11, 0, 0, 0], [12, 13, 14, 15]]


def test_the_width_benchmarks_work_ratio_counts_the_rows_computed() -> None:
    """bench_stack_vs_trl's bound: a plain pass computes every prompt + response row; ours each
    prompt once per group and each response but its last token."""
    from benchmarks.bench_stack_vs_trl import work_ratio
    from benchmarks.compare import Budget

    g, k, w, t = 3, 4, 5, 6
    prompts = torch.randint(3, 50, (g, w)).repeat_interleave(k, 0)
    ids = torch.cat([prompts, torch.randint(3, 50, (g * k, t))], 1)
    groups = shared_prompt.prompt_groups(ids, torch.full((g * k,), w), torch.full((g * k,), t))
    ours, plain = groups.prompts.numel() + groups.responses.numel(), ids.numel()
    assert plain / ours == pytest.approx(work_ratio(w, Budget(responses_per_prompt=k, max_new_tokens=t)))
