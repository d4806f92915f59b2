"""The vLLM sampler (services.rollout.vllm_sampling) and the ``--sampler`` wiring.

Two kinds of tests:

- Without a GPU (run everywhere): vLLM cannot be installed here (no CUDA), so the tests of the
  conversion from vLLM's outputs into ``Sample`` use small STAND-IN objects with the attribute
  names of vLLM's ``RequestOutput`` (``prompt_token_ids``, ``outputs``), ``CompletionOutput``
  (``index``, ``token_ids``, ``logprobs``) and ``Logprob`` (``logprob``, ``rank``). Their values
  come from a real forward pass of a tiny random Llama, built as vLLM would report them. The
  weight-reload extension runs against a stand-in worker holding a real torch model with a
  vLLM-style ``load_weights``. These stand in for vLLM; they do not prove vLLM's behaviour.
- ``gpu``-marked (deselected by default; ``pytest -m gpu tests/test_rollout_vllm.py`` on a CUDA
  machine with the ``gpu`` extra): the real vLLM engine against the hf sampler on a tiny model,
  and a real weight reload.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from services.rollout import cli
from services.rollout.sampler import HfSampler, make_sampler
from services.rollout.sampling import Sample, SamplingConfig, sample
from services.rollout.vllm_sampling import (
    VllmSampler,
    VllmSamplerConfig,
    VllmSamplerError,
    WeightReloadExtension,
    check_vllm_version,
    load_vllm_sampler,
    request_kwargs,
    to_samples,
)
from services.teacher.tiny_model import TinySpec, build_tiny_model

EOS = 3  # build_tiny_model's </s>
HAVE_VLLM = importlib.util.find_spec("vllm") is not None


# --- stand-ins with vLLM's attribute names (vLLM itself cannot be installed here) ---------------


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:  # vllm.outputs.CompletionOutput
    index: int
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    text: str = ""
    finish_reason: str | None = "stop"


@dataclass
class RequestOutput:  # vllm.outputs.RequestOutput
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, max_length=64)
    return build_tiny_model(tmp_path_factory.mktemp("student"), spec)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def _logprobs(model: PreTrainedModel, prompt: list[int], response: list[int], temp: float) -> torch.Tensor:
    seq = torch.tensor([prompt + response])
    logits = model(input_ids=seq).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits / temp, -1)  # (T, V)


def _vllm_like_steps(lp: torch.Tensor, response: list[int], k: int) -> list[dict[int, Logprob]]:
    """What vLLM reports per generated position: the top-k ids (ranks 1..k) plus the sampled id."""
    steps = []
    for t, token in enumerate(response):
        top = lp[t].topk(k).indices.tolist() if k else []
        entry = {tid: Logprob(float(lp[t, tid]), rank + 1) for rank, tid in enumerate(top)}
        rank = 1 + int((lp[t] > lp[t, token]).sum())
        entry.setdefault(token, Logprob(float(lp[t, token]), rank))
        steps.append(entry)
    return steps


def _as_vllm(model: PreTrainedModel, samples: list[Sample], prompts: list[list[int]], cfg: SamplingConfig):
    outputs = [RequestOutput(list(p)) for p in prompts]
    for s in samples:
        lp = _logprobs(model, s.prompt_ids, s.response_ids, cfg.temperature)
        steps = _vllm_like_steps(lp, s.response_ids, cfg.record_top_k)
        outputs[s.prompt_index].outputs.append(CompletionOutput(s.group_index, list(s.response_ids), steps))
    return outputs


def _cfg(**kw: Any) -> SamplingConfig:
    base: dict[str, Any] = dict(
        responses_per_prompt=3, temperature=0.7, max_new_tokens=8, record_top_k=5, eos_token_id=EOS
    )
    return SamplingConfig(**{**base, **kw})


# --- conversion -----------------------------------------------------------------------------------


def test_conversion_gives_what_the_hf_sampler_gives(model: PreTrainedModel) -> None:
    prompts, cfg = [[2, 5, 6, 7], [2, 9]], _cfg()
    want = sample(model, prompts, cfg, generator_seed=1)
    outputs = _as_vllm(model, want, prompts, cfg)
    for out in outputs:
        out.outputs.reverse()  # vLLM may finish the K children in any order
    got = to_samples(outputs, prompts, cfg)
    assert [(s.prompt_index, s.group_index) for s in got] == [(s.prompt_index, s.group_index) for s in want]
    for g, w in zip(got, want, strict=True):
        assert g.prompt_ids == w.prompt_ids and g.response_ids == w.response_ids
        np.testing.assert_allclose(g.behaviour_logprobs, w.behaviour_logprobs, atol=1e-5)
        assert g.behaviour_logprobs.dtype == np.float32 and g.top_k_ids.dtype == np.int32
        assert g.top_k_ids.shape == (len(w.response_ids), 5)
        np.testing.assert_array_equal(g.top_k_ids, w.top_k_ids)  # both in descending order


def test_top_k_comes_from_ranks_not_from_the_sampled_id(model: PreTrainedModel) -> None:
    prompt, cfg = [2, 5], _cfg(responses_per_prompt=1, record_top_k=2)
    lp = _logprobs(model, prompt, [0], 1.0)
    unlikely = int(lp[0].argmin())  # sampled id far outside the top-2: in the dict with its own rank
    steps = _vllm_like_steps(_logprobs(model, prompt, [unlikely], 0.7), [unlikely], 2)
    assert len(steps[0]) == 3
    (s,) = to_samples([RequestOutput(prompt, [CompletionOutput(0, [unlikely], steps)])], [prompt], cfg)
    assert unlikely not in s.top_k_ids[0]
    assert s.top_k_ids[0].tolist() == _logprobs(model, prompt, [unlikely], 0.7)[0].topk(2).indices.tolist()


def test_response_stops_at_the_first_eos_and_zero_top_k(model: PreTrainedModel) -> None:
    prompt, cfg = [2, 5], _cfg(responses_per_prompt=1, record_top_k=0)
    response = [10, EOS, 11, 12]
    steps = _vllm_like_steps(_logprobs(model, prompt, response, 0.7), response, 0)
    (s,) = to_samples([RequestOutput(prompt, [CompletionOutput(0, response, steps)])], [prompt], cfg)
    assert s.response_ids == [10, EOS]
    assert s.top_k_ids.shape == (2, 0) and s.behaviour_logprobs.shape == (2,)


def _one(model: PreTrainedModel) -> tuple[list[int], list[int], list[dict[int, Logprob]]]:
    prompt, response = [2, 5], [10, 11]
    return prompt, response, _vllm_like_steps(_logprobs(model, prompt, response, 0.7), response, 2)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("other_prompt", "answers another prompt"),
        ("bad_index", "expected completions"),
        ("no_logprobs", "logprobs missing"),
        ("no_sampled_id", "no log-prob for sampled id"),
        ("too_few_ranked", "ranked ids"),
        ("nan", "non-finite"),
        ("missing_output", "outputs for"),
    ],
)
def test_malformed_vllm_output_is_refused(model: PreTrainedModel, breakage: str, message: str) -> None:
    prompt, response, steps = _one(model)
    completion = CompletionOutput(0, response, steps)
    outputs = [RequestOutput(prompt, [completion])]
    if breakage == "other_prompt":
        outputs[0].prompt_token_ids = [2, 6]
    elif breakage == "bad_index":
        completion.index = 1
    elif breakage == "no_logprobs":
        completion.logprobs = None
    elif breakage == "no_sampled_id":
        steps[1] = {t: v for t, v in steps[1].items() if t != 11}
    elif breakage == "too_few_ranked":
        steps[0] = {10: steps[0][10]} if steps[0][10].rank == 1 else {10: Logprob(-1.0, 1)}
    elif breakage == "nan":
        steps[0][10] = Logprob(float("nan"), steps[0][10].rank)
    elif breakage == "missing_output":
        outputs = []
    with pytest.raises(VllmSamplerError, match=message):
        to_samples(outputs, [prompt], _cfg(responses_per_prompt=1, record_top_k=2))


# --- request parameters, version and import checks -----------------------------------------------


def test_request_kwargs_give_every_response_its_own_seed() -> None:
    reqs = request_kwargs([[2, 5], [2, 6, 7]], _cfg(responses_per_prompt=4), seed=100, max_logprobs=64)
    assert [r["seed"] for r in reqs] == [100, 104]  # vLLM gives child j of a request seed + j
    for r in reqs:
        assert (r["n"], r["temperature"], r["max_tokens"], r["logprobs"]) == (4, 0.7, 8, 5)
        assert r["stop_token_ids"] == [EOS] and r["ignore_eos"] is False
    (r,) = request_kwargs([[2]], _cfg(eos_token_id=None, record_top_k=0), seed=None, max_logprobs=64)
    assert r["seed"] is None and r["ignore_eos"] is True and r["logprobs"] == 0


@pytest.mark.parametrize(
    ("prompts", "changes", "field_name"),
    [
        ([[2], []], {}, "prompts"),
        ([], {}, "prompts"),
        ([[2]], {"temperature": 0.0}, "temperature"),
        ([[2]], {"temperature": float("nan")}, "temperature"),
        ([[2]], {"record_top_k": 65}, "record_top_k"),
        ([[2]], {"record_top_k": -1}, "record_top_k"),
        ([[2]], {"responses_per_prompt": 0}, "responses_per_prompt"),
    ],
)
def test_bad_sampling_input_names_the_field(prompts: list[list[int]], changes: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        request_kwargs(prompts, _cfg(**changes), seed=0, max_logprobs=64)


def test_bad_input_is_refused_before_vllm_is_called() -> None:
    llm = _RecordingLLM()
    with pytest.raises(ValueError, match="temperature"):
        VllmSampler(llm, 64, VllmSamplerConfig(), "0.11.0").sample([[2]], _cfg(temperature=-1.0), 0)
    assert llm.calls == []


@pytest.mark.parametrize(
    ("changes", "field_name"),
    [
        ({"dtype": "fp8"}, "dtype"),
        ({"gpu_memory_utilization": 0.0}, "gpu_memory_utilization"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({"max_logprobs": -1}, "max_logprobs"),
        ({"max_model_len": 1}, "max_model_len"),
    ],
)
def test_bad_engine_config_names_the_field(changes: dict, field_name: str) -> None:
    with pytest.raises(ValueError, match=field_name):
        VllmSamplerConfig(**changes)


@pytest.mark.parametrize("version", ["0.10.2", "0.11.1.dev5+gabc123", "1.0.0"])
def test_supported_vllm_versions_pass(version: str) -> None:
    check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.9.2", "0.10.1.post1", "not-a-version"])
def test_old_or_odd_vllm_versions_are_refused_by_name(version: str) -> None:
    with pytest.raises(VllmSamplerError, match=version):
        check_vllm_version(version)


@pytest.mark.skipif(HAVE_VLLM, reason="checks the message shown where vLLM is not installed")
def test_missing_vllm_is_a_clear_error(model_dir: Path) -> None:
    with pytest.raises(VllmSamplerError, match=r"pip install '\.\[gpu\]'"):
        load_vllm_sampler(str(model_dir), VllmSamplerConfig())
    with pytest.raises(VllmSamplerError, match="not installed"):
        make_sampler("vllm", str(model_dir))


# --- weight reload through the worker extension (stand-in worker, real torch model) --------------


class _VllmStyleModel(nn.Module):
    """A torch model whose ``load_weights`` behaves like vLLM's: copy by name, return loaded names."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2, bias=False)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            params[name].data.copy_(tensor)
            loaded.add(name)
        return loaded


@dataclass
class _Runner:
    model: _VllmStyleModel


class _Worker(WeightReloadExtension):
    def __init__(self) -> None:
        self.model_runner = _Runner(_VllmStyleModel())


class _RecordingLLM:
    """Stands in for ``vllm.LLM``: ``collective_rpc`` calls the method on one in-process worker."""

    def __init__(self) -> None:
        self.worker = _Worker()
        self.calls: list[str] = []

    def collective_rpc(self, method: str, args: tuple[Any, ...] = ()) -> list[Any]:
        self.calls.append(method)
        return [getattr(self.worker, method)(*args)]

    def reset_prefix_cache(self) -> bool:
        self.calls.append("reset_prefix_cache")
        return True


def test_reload_copies_every_tensor_then_resets_the_prefix_cache(tmp_path: Path) -> None:
    llm = _RecordingLLM()
    new = _VllmStyleModel()
    path = tmp_path / "policy.safetensors"
    safetensors.torch.save_file({k: v.detach().clone() for k, v in new.state_dict().items()}, path)
    VllmSampler(llm, 2, VllmSamplerConfig(), "0.11.0").load_weights(str(path))
    for name, param in llm.worker.model_runner.model.state_dict().items():
        torch.testing.assert_close(param, new.state_dict()[name])
    assert llm.calls == ["distill_load_safetensors", "reset_prefix_cache"]


def test_partial_weights_file_is_refused(tmp_path: Path) -> None:
    llm = _RecordingLLM()
    path = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({"head.weight": torch.zeros(2, 3)}, path)
    with pytest.raises(VllmSamplerError, match=r"vLLM 0\.11\.0: .*lacks 2 parameters"):
        VllmSampler(llm, 2, VllmSamplerConfig(), "0.11.0").load_weights(str(path))
    assert "reset_prefix_cache" not in llm.calls


def test_missing_file_or_rpc_gives_clear_errors(tmp_path: Path) -> None:
    llm = _RecordingLLM()
    with pytest.raises(VllmSamplerError, match=r"weights: .* is not a file"):
        VllmSampler(llm, 2, VllmSamplerConfig(), "0.11.0").load_weights(str(tmp_path / "nope.safetensors"))
    assert llm.calls == []
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, path)
    with pytest.raises(VllmSamplerError, match=r"vLLM 0\.6\.0: LLM\.collective_rpc is missing"):
        VllmSampler(object(), 2, VllmSamplerConfig(), "0.6.0").load_weights(str(path))


# --- wiring: make_sampler and the CLI flag -------------------------------------------------------


def test_hf_sampler_samples_and_reloads(model_dir: Path, tmp_path: Path) -> None:
    sampler = make_sampler("hf", str(model_dir))
    assert isinstance(sampler, HfSampler) and sampler.vocab_size == 64
    cfg = _cfg(responses_per_prompt=2)
    before = sampler.sample([[2, 5]], cfg, 3)
    assert len(before) == 2 and before[0].top_k_ids.shape[1] == 5
    state = {k: torch.randn_like(v) for k, v in sampler.model.state_dict().items()}
    path = tmp_path / "policy.safetensors"
    safetensors.torch.save_file(state, path)
    sampler.load_weights(str(path))
    torch.testing.assert_close(sampler.model.state_dict()["lm_head.weight"], state["lm_head.weight"])


def test_unknown_sampler_lists_the_valid_ones(model_dir: Path) -> None:
    with pytest.raises(ValueError, match="sampler: unknown 'sglang'; valid: hf, vllm"):
        make_sampler("sglang", str(model_dir))


def test_cli_sampler_flag_reaches_the_worker_config() -> None:
    a = cli._args(["--sampler", "vllm", "--vllm-dtype", "float32", "--vllm-enforce-eager", "--seed", "5"])
    cfg = cli._config(a, "run-1")
    assert cfg.sampler == "vllm" and cfg.vllm.dtype == "float32" and cfg.vllm.enforce_eager
    assert cfg.vllm.seed == 5
    assert cli._config(cli._args([]), "run-1").sampler == "hf"
    with pytest.raises(SystemExit):
        cli._args(["--sampler", "sglang"])


# --- GPU: the real vLLM engine (deselected by default) -------------------------------------------


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # head_dim 64: every vLLM attention backend supports it
    spec = TinySpec(vocab_size=128, hidden_size=128, num_layers=2, num_heads=2, max_length=128, seed=1)
    out = build_tiny_model(tmp_path_factory.mktemp("gpu_student"), spec)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():  # a random init is near-uniform (every top-k a tie): spread the logits
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vllm_sampler(gpu_model_dir: Path) -> VllmSampler:
    pytest.importorskip("vllm")
    cfg = VllmSamplerConfig(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3, max_logprobs=16)
    return load_vllm_sampler(str(gpu_model_dir), cfg)


def _near_tie(lp: np.ndarray, k: int, tol: float) -> bool:
    ordered = np.sort(lp)[::-1]
    return bool(ordered[k - 1] - ordered[k] < tol)


def _assert_matches_hf(samples: list[Sample], hf: PreTrainedModel, cfg: SamplingConfig) -> None:
    for s in samples:
        assert 1 <= len(s.response_ids) <= cfg.max_new_tokens
        assert EOS not in s.response_ids[:-1]
        assert s.response_ids[-1] == EOS or len(s.response_ids) == cfg.max_new_tokens
        lp = _logprobs(hf, s.prompt_ids, s.response_ids, cfg.temperature).cpu()
        want = lp.gather(-1, torch.tensor(s.response_ids)[:, None]).squeeze(-1).numpy()
        np.testing.assert_allclose(s.behaviour_logprobs, want, atol=2e-3)  # fp32 engine vs fp32 torch
        top = lp.topk(cfg.record_top_k, -1).indices.numpy()
        for t in range(len(s.response_ids)):
            if not _near_tie(lp[t].numpy(), cfg.record_top_k, 1e-3):
                assert set(s.top_k_ids[t].tolist()) == set(top[t].tolist()), f"position {t}"


@pytest.mark.gpu
def test_vllm_matches_hf_logprobs_and_top_k(vllm_sampler: VllmSampler, gpu_model_dir: Path) -> None:
    hf = AutoModelForCausalLM.from_pretrained(gpu_model_dir, dtype=torch.float32).eval()
    cfg = _cfg(responses_per_prompt=4, temperature=0.8, max_new_tokens=12, record_top_k=8)
    prompts = [[2, 5, 6, 7], [2, 9], [2, 40, 41]]
    samples = vllm_sampler.sample(prompts, cfg, 11)
    assert [(s.prompt_index, s.group_index) for s in samples] == [(p, g) for p in range(3) for g in range(4)]
    assert len({tuple(s.response_ids) for s in samples}) > 1, "K responses should not all be equal"
    _assert_matches_hf(samples, hf, cfg)
    again = vllm_sampler.sample(prompts, cfg, 11)
    assert [s.response_ids for s in again] == [s.response_ids for s in samples], "same seed, same samples"


@pytest.mark.gpu
def test_vllm_reload_serves_the_new_weights(
    vllm_sampler: VllmSampler, gpu_model_dir: Path, tmp_path: Path
) -> None:
    torch.manual_seed(123)
    new = AutoModelForCausalLM.from_pretrained(gpu_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.5 * torch.randn_like(p))  # a different policy, same architecture
    path = tmp_path / "policy.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in new.state_dict().items()}, path)
    cfg = _cfg(responses_per_prompt=2, temperature=1.0, max_new_tokens=10, record_top_k=4)
    vllm_sampler.load_weights(str(path))
    _assert_matches_hf(vllm_sampler.sample([[2, 5, 6, 7]], cfg, 5), new, cfg)
    partial = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({"lm_head.weight": new.state_dict()["lm_head.weight"].contiguous()}, partial)
    with pytest.raises(VllmSamplerError, match="lacks"):
        vllm_sampler.load_weights(str(partial))
