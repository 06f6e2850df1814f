"""The chunked training loss: the Hugging Face loss and gradients, one chunk's logits at a time."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from gradprune.config import ModelParams, TrainParams, params_from_dict
from gradprune.config.schema import ParamError
from gradprune.models.llama import build_llama
from gradprune.plan import plan_stages, read_llama_config
from gradprune.training.loop import chunked_lm_loss, train_lm

TINY = ModelParams(layers=2, hidden=32, heads=4, kv_heads=2, ffn=64)
VOCAB, CONTEXT = 64, 16


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("chunk", [1, 4, 7, 15, 100])
def test_chunked_loss_and_gradients_equal_the_whole_batch_ones(chunk):
    model = build_llama(TINY, VOCAB, CONTEXT, eos_token_id=0, seed=3)
    twin = copy.deepcopy(model)
    batch = _blocks(3, 1)
    whole = model(input_ids=batch, labels=batch).loss
    whole.backward()
    chunked = chunked_lm_loss(twin, batch, chunk, bf16=False)
    chunked.backward()
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7,
                                   msg=lambda m: f"{name}: {m}")


def test_training_with_a_chunked_loss_follows_the_whole_one():
    blocks = _blocks(16, 2)
    cfg = TrainParams(steps=3, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=1,
                      eval_every=3, eval_blocks=4)
    models = []
    for loss_chunk in (None, 5):
        model = build_llama(TINY, VOCAB, CONTEXT, eos_token_id=0, seed=4)
        train_lm(model, blocks, blocks[:4], dataclasses.replace(cfg, loss_chunk=loss_chunk),
                 seed=1, bf16=False)
        models.append(model)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-6)


def test_loss_chunk_is_checked_and_planned():
    with pytest.raises(ParamError) as err:
        params_from_dict({"finetune": {"loss_chunk": 0}})
    assert err.value.key == "finetune.loss_chunk"
    from pathlib import Path

    config = read_llama_config(Path(__file__).resolve().parents[1] / "presets"
                               / "llama2-7b-config.json")
    whole = plan_stages(config, params_from_dict({}))["finetune"].device["logits"]
    chunked = plan_stages(config, params_from_dict({"finetune": {"loss_chunk": 32}}))
    assert whole == 16 * 32000 * 16 * 256
    assert chunked["finetune"].device["logits"] == 16 * 32000 * 16 * 32
