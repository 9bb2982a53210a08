"""serving/hf.py (the interim HF model runner) and `python -m serving generate`, on the "tiny"
preset (Qwen3, 2 layers, hidden 128: every projection's N and K are multiples of 64)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from pykernels.quant import FP8WeightOnlyLinear, fp8_weight_unpack  # noqa: E402
from pykernels.quant.pack import Fp8Weight  # noqa: E402
from serving import hf  # noqa: E402
from serving.__main__ import main  # noqa: E402

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _tiny(dtype=torch.bfloat16, device="cpu"):
    return hf.load_model("tiny", dtype=dtype, device=device, seed=1)


def _prompt(batch: int, length: int, device="cpu") -> torch.Tensor:
    return torch.randint(0, hf.PRESETS["tiny"]["vocab_size"], (batch, length), device=device)


def test_fp8_converts_every_projection_but_the_lm_head():
    model = hf.apply_quantization(_tiny(), "fp8")
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
             if isinstance(m, FP8WeightOnlyLinear)}
    count = sum(isinstance(m, FP8WeightOnlyLinear) for m in model.modules())
    assert names == set(PROJ) and count == 2 * len(PROJ)
    assert type(model.lm_head) is nn.Linear


def test_none_leaves_the_model():
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert hf.apply_quantization(model, "none") is model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_fp8_logits_match_the_dequantized_model():
    """The quantized model computes what the bf16 model computes with each converted weight
    replaced by its dequantized fp8 value: the conversion and the forward, not fp8 rounding."""
    ref = _tiny()
    quant = hf.apply_quantization(copy.deepcopy(ref), "fp8")
    for name, mod in quant.named_modules():
        if isinstance(mod, FP8WeightOnlyLinear):
            packed = Fp8Weight(mod.qweight, mod.scales, mod.in_features, -1)
            ref.get_submodule(name).weight.data.copy_(fp8_weight_unpack(packed, torch.bfloat16))
    prompt = _prompt(3, 11)
    with torch.inference_mode():
        want = ref(prompt).logits.float()
        got = quant(prompt).logits.float()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


def test_greedy_decode_matches_generate():
    model = _tiny(torch.float32)
    prompt = _prompt(2, 9)
    d = hf.greedy_decode(model, prompt, 5, graph=False)
    with torch.inference_mode():
        want = model.generate(prompt, max_new_tokens=5, do_sample=False)[:, 9:]
    assert torch.equal(d.tokens, want)
    assert d.prompt_logits.shape == (2, hf.PRESETS["tiny"]["vocab_size"])
    assert d.step_s > 0 and d.prefill_s > 0


@pytest.mark.parametrize("bad", ["int8", "FP8", ""])
def test_bad_quantization_names_the_argument(bad):
    with pytest.raises(ValueError, match="quantization must be one of none, fp8"):
        hf.apply_quantization(_tiny(), bad)


def test_bad_model_names_the_argument():
    with pytest.raises(ValueError, match="model must be one of .*'no-such-model'"):
        hf.load_model("no-such-model", device="cpu")


def test_bad_new_tokens():
    with pytest.raises(ValueError, match="new_tokens must be >= 1"):
        hf.greedy_decode(_tiny(), _prompt(1, 4), 0)


def test_cli_generate_compare(capsys):
    assert main(["generate", "--model", "tiny", "--quantization", "fp8", "--compare",
                 "--batch-size", "1,2", "--prompt-len", "8", "--new-tokens", "3",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("serving generate"):].splitlines()[2:]
    assert [r.split()[:2] for r in table] == [["none", "1"], ["none", "2"], ["fp8", "1"],
                                              ["fp8", "2"]]
    assert "logits_rel_err" in out


def test_cli_rejects_bad_quantization(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--model", "tiny", "--quantization", "int4", "--device", "cpu"])
    err = capsys.readouterr().err
    assert "--quantization: invalid choice: 'int4'" in err and "none" in err and "fp8" in err


def _agree_up_to_ties(eager: hf.Decoded, other: hf.Decoded, tol: float) -> None:
    """Same tokens and step logits within tol until the first step where they differ; at that
    step the other run's token must be a near tie in the eager logits (a random model's logits
    are near-flat, so a last-bit difference between two kernel schedules may flip its argmax)."""
    differ = (eager.tokens != other.tokens).any(0).nonzero()
    first = int(differ[0]) if differ.numel() else eager.tokens.shape[1]
    assert first >= 1, "the prefill (eager in both runs) picked different first tokens"
    scale = eager.step_logits.abs().amax()
    torch.testing.assert_close(other.step_logits[:, :first - 1], eager.step_logits[:, :first - 1],
                               rtol=0, atol=tol * scale)
    if first < eager.tokens.shape[1]:
        row_logits = eager.step_logits[:, first - 1]
        picked = row_logits.gather(1, other.tokens[:, first:first + 1]).squeeze(1)
        assert bool((row_logits.amax(1) - picked <= tol * scale).all()), (first, eager.tokens,
                                                                           other.tokens)


def test_warm_up_step_rewinds_the_cache():
    """The warm-up step (what a CUDA graph needs before capture) is undone: the decode that
    follows matches one without it. transformers 5 writes K/V at a counter of its own, so a
    warm-up left unrewound shifts every later key by one position."""
    model = _tiny(torch.float32)
    prompt = _prompt(2, 7)
    plain = hf.greedy_decode(model, prompt, 5, graph=False, keep_logits=True)
    warm = hf.greedy_decode(model, prompt, 5, graph=False, keep_logits=True, warm_up=True)
    assert torch.equal(warm.tokens, plain.tokens)
    torch.testing.assert_close(warm.step_logits, plain.step_logits, rtol=1e-5, atol=1e-5)


def test_greedy_decode_keeps_step_logits():
    model = _tiny(torch.float32)
    d = hf.greedy_decode(model, _prompt(2, 5), 4, graph=False, keep_logits=True)
    assert d.step_logits.shape == (2, 3, hf.PRESETS["tiny"]["vocab_size"])
    assert torch.equal(d.step_logits.argmax(-1), d.tokens[:, 1:])
    _agree_up_to_ties(d, d, 0.0)


def test_agreement_check_catches_a_clear_flip():
    logits = torch.zeros(1, 2, 8)
    logits[0, :, 3] = 1.0  # token 3 wins both steps by a margin of 1
    tokens = torch.tensor([[5, 3, 3]])
    eager = hf.Decoded(tokens, 1.0, 1.0, torch.zeros(1, 8), logits)
    flipped = hf.Decoded(torch.tensor([[5, 3, 4]]), 1.0, 1.0, torch.zeros(1, 8), logits)
    with pytest.raises(AssertionError):
        _agree_up_to_ties(eager, flipped, 0.1)
    logits[0, 1, 4] = 0.95  # now a near tie at the second step: the flip is allowed
    _agree_up_to_ties(eager, flipped, 0.1)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_gpu_graph_replay_matches_eager(quantization):
    """The decode step captured in a CUDA graph (fp8: our GEMM kernels inside the HF forward)
    replays deterministically and computes what the eager steps compute."""
    model = hf.apply_quantization(_tiny(device="cuda"), quantization)
    prompt = _prompt(4, 13, "cuda")
    eager = hf.greedy_decode(model, prompt, 8, graph=False, keep_logits=True)
    graphed = hf.greedy_decode(model, prompt, 8, graph=True, keep_logits=True)
    again = hf.greedy_decode(model, prompt, 8, graph=True, keep_logits=True)
    assert torch.equal(again.tokens, graphed.tokens)
    assert torch.equal(again.step_logits, graphed.step_logits)
    torch.testing.assert_close(graphed.prompt_logits, eager.prompt_logits)
    _agree_up_to_ties(eager, graphed, 2e-2)
