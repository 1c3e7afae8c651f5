"""The end-to-end scale fine-tune: its gradient, and that it lowers the KL to the original model."""

import json
from pathlib import Path

import torch

from conftest import CALIB_DATA, TINY_MODEL
from gsq import adapter, finetune, stream, walk
from gsq import calib as calibration
from gsq.config import PRESETS, Config
from gsq.eval import load_tokenizer, model_config
from gsq.quantizer import dequant


def test_factor_gradients_are_those_of_autograd():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-2, 2, (3, 8, 256), generator=gen, dtype=torch.int8)
    base = torch.randn(3, 8, 2, generator=gen)
    upstream = torch.randn(3, 8, 256, generator=gen)
    scales = finetune.Scales({0: (codes, base, codes[:, :, :128], base[:, :, :1], None)}, "cpu")
    scales.m[0][0] = torch.rand(3, 8, 2, generator=gen) + 0.5
    leaves = scales.weights(0, torch.float32)
    leaves[0].backward(upstream)
    m = scales.m[0][0].clone().requires_grad_()
    (dequant(codes, base * m) * upstream).sum().backward()
    torch.testing.assert_close(scales.factor_grads(0, leaves)[0], m.grad)
    assert not scales.factor_grads(0, leaves)[1].any()  # the down projection got no gradient


def test_finetune_lowers_the_kl_on_its_windows(quantized):
    """On one block of calibration windows, every step (the same 4 windows) moves the KL down: the
    gradient is the KL's, through every layer and the routers' weights."""
    root = Path(quantized)
    cfg = Config(**{**PRESETS["tiny"], "dataset": CALIB_DATA[1], "num_samples": 4, "seqlen": 64, "batch_size": 4,
                    "finetune_scales": 6, "finetune_lr": 3e-3, "lr_final": 1.0})
    config = model_config(TINY_MODEL)
    arch, tcfg = adapter.arch_of(config), adapter.text_config(config)
    model, ckpt = stream.skeleton(tcfg), stream.Checkpoint(TINY_MODEL)
    device = torch.device("cpu")
    dtype, compute = walk.dtypes(tcfg, device)
    stream.load_globals(ckpt, model, arch, device, compute)
    ids, _ = calibration.calibration_ids(load_tokenizer(TINY_MODEL), cfg.dataset, "text", 4, 64, 0)
    moe = [i for i, layer in enumerate(model.model.layers) if adapter.is_moe(layer)]
    index = json.loads((root / "model.safetensors.index.json").read_text())["weight_map"]
    layers = {i: finetune.read_layer([root / index[arch.expert_key(i, 0, 0) + ".weight_packed"]], arch, i,
                                     adapter.num_experts(model.model.layers[i]), cfg) for i in moe}
    scales = finetune.Scales(layers, device)
    history = finetune.train(model, ckpt, arch, scales, ids, cfg, device, compute)
    assert all(b < a for a, b in zip(history, history[1:])), history
    assert history[-1] < 0.9 * history[0], history
