"""EAGLE-3 checkpoints (speculators / SpecForge): round trips, a hand-written EAGLE-3 forward, refusals, the CLI.

N tokens, D hidden, V target vocabulary, Vd draft vocabulary.
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from drafters.eagle import EagleConfig, EagleHead, load_eagle, save_eagle
from drafters.eagle3_format import export_eagle3, import_eagle3
from moe.loader import load_model
from moe.tree import TreeBatch
from spectutor.cli import main as cli_main

LAYERS = 5
FEATURES = (2, 0, 3)  # unsorted on purpose: export must reorder fc's blocks to ascending layer ids


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    """A tiny random 5-layer Llama saved as a real checkpoint (conftest's tiny models have 3 layers,
    too few for three EAGLE-3 aux ids below the last layer)."""
    import transformers

    from tests.conftest import TINY_COMMON

    folder = tmp_path_factory.mktemp("llama5")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_COMMON, "num_hidden_layers": LAYERS})
                                  ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def target(target_dir):
    return load_model(str(target_dir), with_tokenizer=False, kernels="default").model


def make_head(target, seed: int = 0, feature_norm: bool = False, layers: tuple[int, ...] = FEATURES) -> EagleHead:
    """A head with random weights everywhere (norms too) and an unsorted draft vocabulary."""
    g = torch.Generator().manual_seed(seed)
    cfg = dataclasses.replace(EagleConfig.for_target(target.cfg, layers), feature_norm=feature_norm)
    vocab = torch.randperm(target.cfg.vocab_size, generator=g)[:40]
    head = EagleHead(cfg, vocab, target.embed, max_len=64)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if not name.startswith("embed"):
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if p.dim() == 2 else 1.0) + (p.dim() == 1))
    return head.eval()


def draft_logits(head: EagleHead, tokens: list[int], features: torch.Tensor) -> torch.Tensor:
    """[N] tokens, [N, K*D] features -> [N, V] draft logits of one cached forward over a chain."""
    with torch.no_grad():
        cache = head.new_cache(1, 64)
        slot = cache.allocate()
        tok = torch.tensor([tokens])
        out = head(tok, head.fuse(features[None]), TreeBatch.chains([tokens]), [slot], cache)
        return head.full_logits(head.logits(out))[0]


def in_layer_order(feats: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
    """[N, K*D] blocks in `layers` order -> the same blocks in ascending layer order (what EAGLE-3 reads)."""
    blocks = feats.chunk(len(layers), dim=-1)
    return torch.cat([blocks[i] for i in sorted(range(len(layers)), key=lambda i: layers[i])], dim=-1)


def _inputs(target, n: int = 4, seed: int = 1) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(target.cfg.vocab_size, (n,), generator=g).tolist(),
            torch.randn(n, 3 * target.cfg.hidden_size, generator=g))


def same_logits(a: torch.Tensor, b: torch.Tensor, exact: bool) -> None:
    """Exact, or (fc's input blocks reordered, so its sums run in another order) equal to float rounding."""
    if exact:
        assert torch.equal(a, b)
    else:
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layers", [(0, 2, 3), FEATURES])
@pytest.mark.parametrize("layout", ["speculators", "specforge"])
def test_round_trip_keeps_weights_and_draft_logits(target, tmp_path, layout, layers):
    head = make_head(target, layers=layers)
    exact = list(layers) == sorted(layers)
    export_eagle3(head, tmp_path, layout, target_name="tiny")
    back = import_eagle3(tmp_path, target.cfg, target.embed, max_len=64)
    assert back.cfg == dataclasses.replace(head.cfg, feature_layers=tuple(sorted(layers)))
    assert torch.equal(back.vocab_ids, head.vocab_ids.sort().values)  # draft ids renumbered by target id
    order = torch.argsort(head.vocab_ids)
    assert torch.equal(back.lm_head.weight, head.lm_head.weight[order])
    assert torch.equal(back.fc.weight, in_layer_order(head.fc.weight, layers))
    for name, p in head.state_dict().items():
        if name not in ("lm_head.weight", "fc.weight") and not name.startswith("embed"):
            assert torch.equal(back.state_dict()[name], p), name
    tokens, feats = _inputs(target)
    mine = draft_logits(head, tokens, feats)
    same_logits(draft_logits(back, tokens, in_layer_order(feats, layers)), mine, exact)
    # ... and through our own checkpoint format, as `draft import` writes it
    save_eagle(back, tmp_path / "native", "imported")
    again, version = load_eagle(tmp_path / "native", target.cfg, target.embed, max_len=64)
    assert version == "imported" and not again.cfg.feature_norm and again.feature_norms is None
    same_logits(draft_logits(again, tokens, in_layer_order(feats, layers)), mine, exact)


def test_exported_config_names_the_eagle3_fields(target, tmp_path):
    head = make_head(target)
    export_eagle3(head, tmp_path / "s", "speculators", target_name="tiny")
    export_eagle3(head, tmp_path / "f", "specforge")
    s = json.loads((tmp_path / "s" / "config.json").read_text())
    f = json.loads((tmp_path / "f" / "config.json").read_text())
    aux = [i + 1 for i in sorted(FEATURES)]  # our "output of layer i" is EAGLE-3's id i + 1
    assert s["speculators_model_type"] == "eagle3" and s["norm_before_residual"] is False
    assert s["eagle_aux_hidden_state_layer_ids"] == aux and s["draft_vocab_size"] == 40
    assert s["transformer_layer_config"]["vocab_size"] == target.cfg.vocab_size
    assert s["speculators_config"]["verifier"]["name_or_path"] == "tiny"
    assert f["architectures"] == ["LlamaForCausalLMEagle3"] and f["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == aux


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """[H, N, hd] rotated by position (Hugging Face Llama's rotate-half convention)."""
    hd, n = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(torch.arange(n).float(), inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = torch.cat([-x[..., hd // 2:], x[..., : hd // 2]], dim=-1)
    return x * cos + rot * sin


def eagle3_reference(w: dict, c: dict, embed: torch.Tensor, tokens: list[int], aux: torch.Tensor) -> torch.Tensor:
    """The EAGLE-3 draft layer as published (raw aux states -> fc; norms; [embeds; hidden] -> q/k/v;
    residual over the fused hidden; MLP; final norm; lm_head; d2t), over N causal tokens: [N, V]."""
    eps, h, hkv, hd = c["rms_norm_eps"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    p = "midlayer."
    hidden = aux @ w["fc.weight"].T                                                   # [N, D]
    x = torch.cat([_rms(embed[tokens], w[p + "input_layernorm.weight"], eps),
                   _rms(hidden, w[p + "hidden_norm.weight"], eps)], dim=-1)          # [N, 2D]
    n = len(tokens)
    q = _rope((x @ w[p + "self_attn.q_proj.weight"].T).view(n, h, hd).transpose(0, 1), c["rope_theta"])
    k = _rope((x @ w[p + "self_attn.k_proj.weight"].T).view(n, hkv, hd).transpose(0, 1), c["rope_theta"])
    v = (x @ w[p + "self_attn.v_proj.weight"].T).view(n, hkv, hd).transpose(0, 1)
    k, v = k.repeat_interleave(h // hkv, 0), v.repeat_interleave(h // hkv, 0)        # [H, N, hd]
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(n, h * hd) @ w[p + "self_attn.o_proj.weight"].T
    x = hidden + attn
    y = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
    x = x + (F.silu(y @ w[p + "mlp.gate_proj.weight"].T) * (y @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    logits = _rms(x, w["norm.weight"], eps) @ w["lm_head.weight"].T                   # [N, Vd]
    full = torch.full((n, embed.shape[0]), float("-inf"))
    full[:, torch.arange(w["d2t"].numel()) + w["d2t"]] = logits
    return full


def write_specforge_by_hand(folder, target, aux_ids=(1, 3, 4), d2t_shift: int = 0, overrides: dict | None = None) -> dict:
    """A SpecForge-style EAGLE-3 folder from the published names, random weights, a sorted draft vocabulary."""
    from safetensors.torch import save_file

    tc = target.cfg
    d, h, hkv, hd, inner, vd = tc.hidden_size, 4, 2, 24, 80, 32
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    one = lambda: 1.0 + torch.randn(d, generator=g) * 0.2  # noqa: E731
    vocab = torch.randperm(tc.vocab_size, generator=g)[:vd].sort().values
    t2d = torch.zeros(tc.vocab_size, dtype=torch.bool)
    t2d[vocab] = True
    p = "midlayer."
    w = {"fc.weight": rnd(d, 3 * d), "norm.weight": one(), "lm_head.weight": rnd(vd, d),
         "d2t": vocab - torch.arange(vd) + d2t_shift, "t2d": t2d, "embed_tokens.weight": target.embed.weight.detach().clone(),
         p + "input_layernorm.weight": one(), p + "hidden_norm.weight": one(), p + "post_attention_layernorm.weight": one(),
         p + "self_attn.q_proj.weight": rnd(h * hd, 2 * d), p + "self_attn.k_proj.weight": rnd(hkv * hd, 2 * d),
         p + "self_attn.v_proj.weight": rnd(hkv * hd, 2 * d), p + "self_attn.o_proj.weight": rnd(d, h * hd),
         p + "mlp.gate_proj.weight": rnd(inner, d), p + "mlp.up_proj.weight": rnd(inner, d),
         p + "mlp.down_proj.weight": rnd(d, inner)}
    c = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": d,
         "intermediate_size": inner, "num_attention_heads": h, "num_key_value_heads": hkv, "head_dim": hd,
         "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_theta": 500.0, "rope_scaling": None,
         "max_position_embeddings": 128, "vocab_size": tc.vocab_size, "draft_vocab_size": vd, "hidden_act": "silu",
         "tie_word_embeddings": True, "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux_ids)},
         **(overrides or {})}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(w, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(c))
    return {"weights": w, "config": c}


def test_imported_head_computes_the_published_eagle3_layer(target, tmp_path):
    ck = write_specforge_by_hand(tmp_path, target)
    head = import_eagle3(tmp_path, target.cfg, target.embed, max_len=64)
    assert head.cfg.feature_layers == (0, 2, 3) and head.feature_norms is None
    tokens, aux = _inputs(target, n=5, seed=3)
    ref = eagle3_reference(ck["weights"], ck["config"], target.embed.weight.detach(), tokens, aux)
    got = draft_logits(head, tokens, aux)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # the same head re-exported as speculators reads back identical
    export_eagle3(head, tmp_path / "s", "speculators")
    assert torch.equal(draft_logits(import_eagle3(tmp_path / "s", target.cfg, target.embed, 64), tokens, aux), got)


@pytest.mark.parametrize("change, field", [
    (dict(overrides={"hidden_size": 32}), "hidden_size"),
    (dict(aux_ids=(1, 3, LAYERS)), "eagle_aux_hidden_state_layer_ids"),
    (dict(d2t_shift=300), "d2t"),
    (dict(overrides={"vocab_size": 300}), "vocab_size"),
    (dict(overrides={"norm_before_residual": True}), "norm_before_residual"),
])
def test_import_refuses_what_does_not_fit(target, tmp_path, change, field):
    write_specforge_by_hand(tmp_path, target, **change)
    with pytest.raises(ValueError, match=field):
        import_eagle3(tmp_path, target.cfg, target.embed)


def test_import_warns_when_the_checkpoint_embedding_is_not_the_targets(target, tmp_path):
    from safetensors.torch import load_file, save_file

    write_specforge_by_hand(tmp_path, target)
    w = load_file(str(tmp_path / "model.safetensors"))
    w["embed_tokens.weight"] = w["embed_tokens.weight"] + 1.0
    save_file(w, str(tmp_path / "model.safetensors"))
    with pytest.warns(UserWarning, match="embed_tokens"):
        import_eagle3(tmp_path, target.cfg, target.embed)


def test_export_refuses_feature_norms_and_unexportable_layers(target, tmp_path):
    with pytest.raises(ValueError, match="feature_norm"):
        export_eagle3(make_head(target, feature_norm=True), tmp_path)
    last = EagleHead(dataclasses.replace(EagleConfig.for_target(target.cfg, (0, 1, LAYERS - 1)), feature_norm=False),
                     torch.arange(8), target.embed)
    with pytest.raises(ValueError, match="feature_layers"):
        export_eagle3(last, tmp_path)


def test_cli_export_then_import(target, target_dir, tmp_path, capsys):
    head = make_head(target)
    save_eagle(head, tmp_path / "ours", "v7")
    assert cli_main(["draft", "export", "--from", str(tmp_path / "ours"), "--to", str(tmp_path / "e3"),
                     "--layout", "specforge", "--model", str(target_dir)]) == 0
    assert cli_main(["draft", "import", "--from", str(tmp_path / "e3"), "--to", str(tmp_path / "back"),
                     "--model", str(target_dir)]) == 0
    back, version = load_eagle(tmp_path / "back", target.cfg, target.embed, max_len=64)
    tokens, feats = _inputs(target)
    assert version == "imported"
    same_logits(draft_logits(back, tokens, in_layer_order(feats, FEATURES)), draft_logits(head, tokens, feats), False)
    capsys.readouterr()
    assert cli_main(["draft", "export", "--from", str(tmp_path / "ours"), "--to", str(tmp_path / "x"),
                     "--layout", "tensorrt", "--model", str(target_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tensorrt" in err[0] and "--layout" in err[0]
