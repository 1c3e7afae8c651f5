"""Train the bundled tiny DeepSeek-V3-architecture MoE that tests and the default `make quantize` use.

Random weights say nothing about quantization error, so the fixture is a real (if small) language
model: transformers' `DeepseekV3ForCausalLM` (the Kimi-K2.5 / DeepSeek-V3 text architecture) with
MLA attention, a dense first layer, 6 MoE layers of 8 routed experts (top-2, sigmoid router with
DeepSeek's bias-based load balancing) plus one shared expert, and its own byte-level BPE tokenizer.

Recipe (deterministic on a given machine; `make fixture` runs it, ~15 min on 2 CPU cores):
  - Text: `../shared/data/wikitext-2/wiki.valid.tokens` (217k words). Never the test split.
    The last 5% of its lines are held out for early stopping; the rest is training text.
  - Tokenizer: byte-level BPE, vocabulary 2048, trained on the training text only.
  - Model: hidden 256, 7 layers (layer 0 dense, intermediate 512), 4 MLA heads (q_lora_rank 128,
    kv_lora_rank 64, nope/rope/v head dims 32/16/32), 8 routed experts of intermediate 128, top-2,
    1 shared expert, routed_scaling_factor 2.5 (DeepSeek-V3's), untied embeddings. ~7.7M parameters.
  - Optimisation: fp32, AdamW (lr 2e-3, betas 0.9/0.95, weight decay 0.1), 100 warm-up steps then
    cosine decay to 0.1x over 600 steps, batch 16 random windows of 256 tokens, torch seed 0, 2 threads. Every step the
    router's `e_score_correction_bias` moves by 1e-3 towards balanced expert load (DeepSeek-V3's
    auxiliary-loss-free balancing), so every expert gets tokens.
  - Early stopping: held-out loss every 50 steps; stop after 4 evaluations without improvement,
    keep the best weights. Saved in bf16 with `save_pretrained` (safetensors).

The second bundled model, `--arch qwen3_moe` (models/tiny-qwen3-moe), has another routing shape so that
no method is tuned to one model: Qwen3-MoE (GQA attention, 2 KV heads of 64), 6 layers, all MoE, 12
routed experts of intermediate 128, top-4 with normalised softmax weights, no shared expert, no dense
layer; balanced by Qwen's auxiliary router loss (coefficient 0.01) instead of the bias. The same text,
tokenizer recipe and optimisation.

Usage: python models/train_tiny_moe.py [--arch deepseek_v3|qwen3_moe] [--out DIR] [--max-steps N]
"""

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, DeepseekV3Config, PreTrainedTokenizerFast, Qwen3MoeConfig

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens"
EOS = "<|endoftext|>"


def build_tokenizer(text_lines: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text_lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, model_max_length=4096)


def build_config(arch: str, vocab_size: int):
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(
            vocab_size=vocab_size,
            hidden_size=256,
            intermediate_size=512,
            moe_intermediate_size=128,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            num_experts=12,
            num_experts_per_tok=4,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=True,
            router_aux_loss_coef=0.01,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
        )
    return DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=7,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        max_position_embeddings=4096,
        num_nextn_predict_layers=0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        topk_method="noaux_tc",  # how transformers routes it; stated as published, since vLLM reads them
        scoring_func="sigmoid",
    )


class LoadBalancer:
    """Auxiliary-loss-free balancing (DeepSeek-V3): nudge each router's bias against its load."""

    def __init__(self, model, rate: float):
        self.rate, self.counts, self.routers = rate, {}, []
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and hasattr(gate, "e_score_correction_bias"):
                self.routers.append(gate)
                gate.register_forward_hook(self._count)

    def _count(self, module, inputs, outputs):
        topk_indices = outputs[2]
        load = torch.bincount(topk_indices.flatten(), minlength=module.num_experts).float()
        self.counts[module] = self.counts.get(module, 0) + load

    @torch.no_grad()
    def step(self):
        for gate, load in self.counts.items():
            gate.e_score_correction_bias += self.rate * torch.sign(load.mean() - load)
        self.counts = {}


def lr_at(step: int, max_steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def heldout_loss(model, ids: torch.Tensor, seqlen: int) -> float:
    model.eval()
    windows = ids[: ids.numel() // seqlen * seqlen].view(-1, seqlen)
    losses = [model(input_ids=w[None], labels=w[None]).loss.item() for w in windows]
    model.train()
    return sum(losses) / len(losses)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="deepseek_v3", choices=["deepseek_v3", "qwen3_moe"])
    ap.add_argument("--out", help="default: models/tiny-<arch with - for _>")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--patience", type=int, default=4)
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "models" / f"tiny-{args.arch.replace('_', '-')}")

    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    lines = Path(args.data).read_text(encoding="utf-8").splitlines(keepends=True)
    cut = int(len(lines) * 0.95)
    train_text, held_text = "".join(lines[:cut]), "".join(lines[cut:])
    tokenizer = build_tokenizer(lines[:cut], args.vocab_size)
    train_ids = torch.tensor(tokenizer(train_text, add_special_tokens=False)["input_ids"])
    held_ids = torch.tensor(tokenizer(held_text, add_special_tokens=False)["input_ids"])
    print(f"tokens: train {train_ids.numel()}, held-out {held_ids.numel()}", flush=True)

    model = AutoModelForCausalLM.from_config(build_config(args.arch, len(tokenizer))).float()
    model.train()
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", flush=True)
    balancer = LoadBalancer(model, rate=1e-3)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(0)
    best, best_state, bad, t0 = float("inf"), None, 0, time.time()
    for step in range(args.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.max_steps, args.lr, warmup=100)
        starts = torch.randint(0, train_ids.numel() - args.seqlen, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seqlen] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        balancer.step()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.max_steps:
            held = heldout_loss(model, held_ids, args.seqlen)
            print(f"step {step + 1}: train {loss.item():.3f} held-out {held:.3f} "
                  f"(ppl {math.exp(held):.1f}) {time.time() - t0:.0f}s", flush=True)
            if held < best:
                best, bad = held, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= args.patience:
                    print("early stop", flush=True)
                    break

    model.load_state_dict(best_state)
    model.config.output_router_logits = False  # the auxiliary loss was for training only
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(
        {"recipe": "models/train_tiny_moe.py",
         "args": {**vars(args), "out": os.path.relpath(args.out, ROOT), "data": os.path.relpath(args.data, ROOT)},
         "best_heldout_loss": best,
         "best_heldout_ppl": math.exp(best), "train_tokens": train_ids.numel(),
         "heldout_tokens": held_ids.numel()}, indent=2) + "\n")
    print(f"saved {out} (best held-out ppl {math.exp(best):.1f})")


if __name__ == "__main__":
    main()
