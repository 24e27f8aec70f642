"""Kernel choice by measurement (moe/kernels.py): parity gate, cache, forcing, bad values."""
from __future__ import annotations

import json

import pytest
import torch

import moe.kernels as kernels
from moe.cpu_kernels import PackedLinear, pack_linears, packing_available, unpack_linears
from moe.kernels import PARITY_ATOL, WIDTHS, choose
from moe.loader import load_model
from moe.tree import TreeBatch

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN packing")


def _packed(model) -> int:
    return sum(isinstance(m, PackedLinear) for m in model.modules())


def _logits(model, tokens=(5, 9, 2, 7, 1)) -> torch.Tensor:
    cache = model.new_cache(1, 16)
    return model(TreeBatch.chains([list(tokens)]), [cache.allocate()], cache)[0]


def test_auto_times_every_candidate_keeps_parity_and_caches_the_verdict(tiny_model, tmp_path, monkeypatch) -> None:
    folder = tiny_model("llama")
    model = load_model(str(folder), with_tokenizer=False, kernels="default").model
    reference = _logits(model)
    cache = tmp_path / "kernels.json"
    choice = choose(model, "auto", cache)
    assert choice.how == "measured" and choice.kernels in kernels.available()
    assert set(choice.ms) == set(kernels.available()) and all(sorted(ms) == list(WIDTHS) for ms in choice.ms.values())
    assert all(t > 0 for ms in choice.ms.values() for t in ms.values())
    assert choice.max_diff["default"] == 0.0 and choice.max_diff["onednn"] <= PARITY_ATOL
    assert choice.speedup("default") == pytest.approx(1.0)
    assert choice.kernels == max(kernels.available(), key=choice.speedup)  # the fastest, both being exact enough
    assert (_packed(model) > 0) == (choice.kernels == "onednn")
    torch.testing.assert_close(_logits(model), reference, atol=PARITY_ATOL, rtol=0)
    saved = json.loads(cache.read_text())
    assert list(saved) == [kernels.machine_key(model.cfg, torch.float32)]
    assert saved[next(iter(saved))]["kernels"] == choice.kernels

    # A second model of the same shapes on this machine reads the verdict instead of timing again.
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: pytest.fail("measured again despite the cache"))
    again = load_model(str(folder), with_tokenizer=False, kernels="default").model
    cached = choose(again, "auto", cache)
    assert cached.how == "cached" and cached.kernels == choice.kernels and cached.ms == choice.ms
    assert (_packed(again) > 0) == (choice.kernels == "onednn")


def test_a_candidate_that_moves_the_logits_is_never_chosen(tiny_model, tmp_path, monkeypatch) -> None:
    model = load_model(str(tiny_model("llama")), with_tokenizer=False, kernels="default").model
    real_apply, real_undo = kernels.apply, kernels.undo

    def faulty_apply(m, name, keep_dense=False):  # oneDNN, but with the head 1% off
        real_apply(m, name, keep_dense)
        if name == "onednn":
            m.norm.weight.data.mul_(1.01)

    def faulty_undo(m):
        if _packed(m):
            m.norm.weight.data.div_(1.01)
        real_undo(m)

    monkeypatch.setattr(kernels, "apply", faulty_apply)
    monkeypatch.setattr(kernels, "undo", faulty_undo)
    choice = kernels.measure(model, model)
    assert choice.max_diff["onednn"] > PARITY_ATOL and choice.kernels != "onednn"
    assert "refused for parity: onednn" in choice.summary()
    assert _packed(model) == 0  # measurement leaves the model as it found it


def test_pack_then_unpack_gives_back_the_same_tensors_and_logits(tiny_model) -> None:
    model = load_model(str(tiny_model("qwen2_moe")), with_tokenizer=False, kernels="default").model
    before = {n: p for n, p in model.named_parameters()}
    reference = _logits(model)
    n = pack_linears(model, keep_dense=True)
    assert n > 0 and _packed(model) == n
    assert unpack_linears(model) == n and _packed(model) == 0
    after = dict(model.named_parameters())
    assert set(after) == set(before) and all(after[k] is before[k] for k in before)
    assert torch.equal(_logits(model), reference)


def test_forced_and_inapplicable_choices(tiny_model, tmp_path) -> None:
    folder = str(tiny_model("llama"))
    forced = load_model(folder, with_tokenizer=False, kernels="onednn")
    assert forced.kernels.how == "forced" and forced.kernels.kernels == "onednn" and _packed(forced.model) > 0
    plain = load_model(folder, with_tokenizer=False, kernels="default")
    assert plain.kernels.kernels == "default" and _packed(plain.model) == 0
    bf16 = load_model(folder, with_tokenizer=False, dtype="bf16", kernels="auto")
    assert bf16.kernels.how == "only candidate" and _packed(bf16.model) == 0
    with pytest.raises(ValueError, match="'mkl-magic'"):
        load_model(folder, with_tokenizer=False, kernels="mkl-magic")


def test_draft_lm_follows_the_forced_kernels(tiny_model) -> None:
    from drafters.registry import DrafterConfig, build_drafter

    folder = str(tiny_model("llama"))
    target = load_model(folder, with_tokenizer=False, kernels="default")
    for name, packed in (("default", False), ("onednn", True)):
        d = build_drafter(DrafterConfig("draft-lm", draft_layers=1, kernels=name), folder,
                          target.config.vocab_size, 2, 64, target.config, target=target.model)
        assert d.kernels.kernels == name and (_packed(d.model) > 0) == packed
    with pytest.raises(ValueError, match="'fast'"):
        DrafterConfig("draft-lm", kernels="fast")


@pytest.mark.parametrize("argv", [["generate", "--prompt", "hi", "--kernels", "bogus"],
                                  ["serve", "--kernels", "bogus"], ["prepare", "--kernels", "bogus"]])
def test_an_unknown_kernels_value_is_one_line_and_exit_2(argv, capsys) -> None:
    from spectutor.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--kernels" in err and "'bogus'" in err


def test_a_model_that_cannot_be_timed_alone_takes_the_cached_verdict_or_the_default(tiny_model, tmp_path,
                                                                                     monkeypatch) -> None:
    folder = str(tiny_model("llama"))
    cache = tmp_path / "kernels.json"
    monkeypatch.setattr(kernels, "measure", lambda *a, **k: pytest.fail("an expert-parallel rank timed alone"))
    model = load_model(folder, with_tokenizer=False, kernels="default").model
    choice = choose(model, "auto", cache, measurable=False)
    assert choice.kernels == "default" and choice.how.startswith("not measured") and _packed(model) == 0
    kernels._write(cache, kernels.machine_key(model.cfg, torch.float32),
                   kernels.KernelChoice("onednn", "measured", {"default": {1: 2.0}, "onednn": {1: 1.0}}, {}))
    again = choose(model, "auto", cache, measurable=False)
    assert again.kernels == "onednn" and again.how == "cached" and _packed(model) > 0
