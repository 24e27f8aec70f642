"""Bad models and prompts give one clear error naming the problem, and leave no half-written cache entry."""
from __future__ import annotations

import json
import shutil

import pytest

from moe.errors import ContextTooLongError, CorruptModelError, ModelNotFoundError, UnsupportedArchitectureError
from moe.generate import SamplingParams, generate
from moe.loader import default_gguf, load_model
from spectutor.cli import main


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECTUTOR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def copy_with_config(tiny_model, folder, **changes):
    """A copy of the tiny Llama checkpoint in `folder` with some config.json fields changed."""
    shutil.copytree(tiny_model("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_missing_path(home):
    with pytest.raises(ModelNotFoundError, match="/no/such/model"):
        load_model("/no/such/model")


def test_folder_without_config(tmp_path, home):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(str(tmp_path))


def test_unknown_hub_id_is_not_downloaded(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="never downloads"):
        load_model("nobody/not-a-model-xyz")


def test_garbage_gguf_leaves_no_cache_entry(tmp_path, home):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(CorruptModelError, match="bad.gguf"):
        load_model(str(bad))
    models = home / "models"
    assert not models.exists() or not any(models.iterdir())


def test_truncated_gguf_is_named(tmp_path, home):
    src = default_gguf()
    cut = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        cut.write_bytes(f.read(int(src.stat().st_size * 0.9)))
    with pytest.raises(CorruptModelError, match="cut.gguf"):
        load_model(str(cut))
    models = home / "models"
    assert not models.exists() or not any(models.iterdir())


def test_truncated_safetensors_is_named(tiny_model, tmp_path, home):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model("llama"), folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptModelError, match="model.safetensors"):
        load_model(str(folder), with_tokenizer=False)


def test_wrong_shapes_are_named(tiny_model, tmp_path, home):
    folder = copy_with_config(tiny_model, tmp_path / "reshaped", intermediate_size=128)
    with pytest.raises(CorruptModelError, match="shape"):
        load_model(str(folder), with_tokenizer=False)


def test_unsupported_architecture(tiny_model, tmp_path, home):
    folder = copy_with_config(tiny_model, tmp_path / "gpt2ish", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        load_model(str(folder), with_tokenizer=False)


def test_prompt_longer_than_context(tiny_model, home):
    model = load_model(str(tiny_model("llama")), with_tokenizer=False, max_len=64).model
    with pytest.raises(ContextTooLongError, match="70 tokens"):
        generate(model, [1] * 70, SamplingParams(max_new_tokens=4))


@pytest.mark.parametrize("field,value", [("temperature", -1.0), ("top_p", 0.0), ("top_k", -3), ("max_new_tokens", 0)])
def test_bad_sampling_values_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_cli_prints_one_line_not_a_traceback(home, capsys):
    assert main(["generate", "--model", "/no/such/model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/no/such/model" in err[0] and "Traceback" not in err[0]
