"""The lean decoder on a CUDA device: parity with transformers and tree equality (skipped without a GPU)."""
from __future__ import annotations

import pytest
import torch

from moe.loader import load_model
from moe.tree import TreeBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("name", ["llama", "qwen2_moe"])
def test_cuda_prefill_and_tree_match_transformers(name, tiny_model, hf_reference):
    folder = tiny_model(name)
    lean = load_model(str(folder), with_tokenizer=False, device="cuda").model
    hf = hf_reference(folder).cuda()
    prompt = list(range(5, 45))
    cache = lean.new_cache(2, 128)
    slot = cache.allocate()
    out = lean(TreeBatch.chains([prompt]), [slot], cache)[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    cache.commit([slot], [list(range(len(prompt)))])
    tree = TreeBatch.make_dummy(1, 16, seed=3, vocab_size=256)
    logits = lean(tree, [slot], cache)[0]
    for node in range(16):
        path = prompt + [int(tree.tokens[0, i]) for i in tree.path_to(0, node)]
        with torch.inference_mode():
            alone = hf(torch.tensor([path], device="cuda")).logits[0, -1]
        torch.testing.assert_close(logits[node], alone, atol=1e-4, rtol=0)
