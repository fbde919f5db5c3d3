"""Regenerate rar_reference.json from bytedance/1d-tokenizer's own RAR (modeling/rar.py), never from our model.

    git clone https://github.com/bytedance/1d-tokenizer /tmp/1d-tokenizer
    python tests/models/generator/make_rar_reference.py --official /tmp/1d-tokenizer [--out PATH]

Needs torch and timm (rar.py imports timm's Mlp). Only modeling/rar.py and modeling/modules/base_model.py are
imported, unmodified, from a staging folder with empty package __init__ files: the official
modeling/modules/__init__.py also imports the tokenizers' losses, which need more packages and are not used here.

What the file holds:
- "keys": the state-dict keys and shapes of RAR-B as released (rar_b.bin: 768 wide, 24 blocks, 16 heads, MLP 3072,
  256 tokens, MaskGIT-VQGAN's 1024 codes, 1000 classes), built on the meta device.
- "tiny": a tiny RAR with weights torch.randn(shape, generator=g) * 0.2 for each state-dict key in sorted order
  (g = torch.Generator().manual_seed(seed)); then "train": plain SGD steps on the official loss (ARLoss: cross
  entropy of the shuffled logits against the shuffled tokens) with the given per-sample orders (some random
  permutations, some raster, as RAR's training draws them); after those steps:
  "permuted": forward_fn(tokens, class, orders) logits in generation order (what the loss sees);
  "raster": the KV-cache decoding loop of RAR.generate with classifier-free guidance, but with the tokens forced
  (so no sampling randomness), recording the guided logits of every step;
  "greedy": the same loop taking the argmax of each step's guided logits, and the smallest top-1 / top-2 gap
  (a tie would make a greedy comparison meaningless).
Labels in this file are ours: 0 .. C-1 a class, C the "no class" label (RAR's none_condition_id).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_seq_len=16,
            condition_num_classes=5, codebook_size=64)
RAR_B = dict(hidden_size=768, num_hidden_layers=24, num_attention_heads=16, intermediate_size=3072,
             image_seq_len=256, condition_num_classes=1000, codebook_size=1024)
SEED, LR, TRAIN_STEPS, BATCH, GUIDANCE, GUIDANCE_POW = 1234, 0.05, 3, 4, 3.0, 1.5


class Node(dict):
    """The attribute access (config.model.generator.x) and .get of the OmegaConf config rar.py reads."""

    def __getattr__(self, name):
        return self[name]


def official_config(sizes: dict) -> Node:
    generator = {k: v for k, v in sizes.items() if k != "codebook_size"}
    generator.update(dropout=0.0, attn_drop=0.0, use_checkpoint=False)
    return Node(model=Node(generator=Node(generator), vq_model=Node(codebook_size=sizes["codebook_size"])))


def import_official(root: Path):
    stage = Path(tempfile.mkdtemp(prefix="rar_official_"))
    (stage / "modeling" / "modules").mkdir(parents=True)
    (stage / "modeling" / "__init__.py").write_text("")
    (stage / "modeling" / "modules" / "__init__.py").write_text("from .base_model import BaseModel\n")
    shutil.copy(root / "modeling" / "rar.py", stage / "modeling" / "rar.py")
    shutil.copy(root / "modeling" / "modules" / "base_model.py", stage / "modeling" / "modules" / "base_model.py")
    sys.path.insert(0, str(stage))
    from modeling.rar import RAR

    return RAR


def class_ids(model, labels: torch.Tensor) -> torch.Tensor:
    """Our labels (C = no class) -> RAR's condition ids."""
    ids = labels + model.target_codebook_size + 1
    return torch.where(labels == model.condition_num_classes, torch.full_like(ids, model.none_condition_id), ids)


def draw_batch(g: torch.Generator, sizes: dict, permuted: list[bool]):
    L, n = sizes["image_seq_len"], len(permuted)
    tokens = torch.randint(0, sizes["codebook_size"], (n, L), generator=g)
    labels = torch.randint(0, sizes["condition_num_classes"] + 1, (n,), generator=g)    # incl. "no class"
    orders = torch.stack([torch.randperm(L, generator=g) if p else torch.arange(L) for p in permuted])
    return tokens, labels, orders


def decode(model, labels, forced, greedy: bool):
    """RAR.generate's KV-cache loop (guidance schedule and all), recording each step's guided logits."""
    n, L = labels.shape[0], model.image_seq_len
    condition = class_ids(model, labels)
    ids = torch.full((n, 0), -1, dtype=torch.long)
    model.enable_kv_cache()
    steps = []
    for step in range(L):
        scale_step = (1 - torch.cos(((step / L) ** torch.tensor([GUIDANCE_POW])) * torch.pi)) * 1 / 2
        cfg_scale = (GUIDANCE - 1) * scale_step + 1
        logits = model.forward_fn(torch.cat([ids, ids]), torch.cat([condition, model.get_none_condition(condition)]),
                                  orders=None, is_sampling=True)
        cond, uncond = logits[:n], logits[n:]
        guided = (uncond + (cond - uncond) * cfg_scale)[:, -1]
        steps.append(guided)
        chosen = guided.argmax(dim=-1, keepdim=True) if greedy else forced[:, step:step + 1]
        ids = torch.cat([ids, chosen], dim=-1)
    model.disable_kv_cache()
    return ids, torch.stack(steps, dim=1)                                  # [n, L], [n, L, V]


def floats(t: torch.Tensor):
    """fp32 values as JSON numbers with 9 significant digits (enough to round-trip fp32 exactly)."""
    return json.loads(json.dumps(t.tolist()), parse_float=lambda v: float(f"{float(v):.9g}"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--official", required=True, type=Path, help="a checkout of bytedance/1d-tokenizer")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("rar_reference.json"))
    parser.add_argument("--commit", default=None, help="the checkout's commit (default: git rev-parse in it)")
    args = parser.parse_args(argv)
    RAR = import_official(args.official)
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", str(args.official), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True, check=True).stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            commit = "unknown"
    import timm

    with torch.device("meta"):
        keys = {k: list(v.shape) for k, v in RAR(official_config(RAR_B)).state_dict().items()}

    torch.manual_seed(0)
    model = RAR(official_config(TINY)).eval()
    g = torch.Generator().manual_seed(SEED)
    own = model.state_dict()
    model.load_state_dict({k: torch.randn(own[k].shape, generator=g) * 0.2 for k in sorted(own)})

    train = []
    for _ in range(TRAIN_STEPS):
        tokens, labels, orders = draw_batch(g, TINY, [True, False, True, True])
        logits, shuffled = model.forward_fn(tokens, class_ids(model, labels), return_labels=True, orders=orders)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].permute(0, 2, 1), shuffled)   # = ARLoss
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
        train.append({"tokens": tokens.tolist(), "labels": labels.tolist(), "orders": orders.tolist(),
                      "loss": loss.item()})

    tokens, labels, orders = draw_batch(g, TINY, [True, False, True])
    with torch.no_grad():
        permuted = model.forward_fn(tokens, class_ids(model, labels), orders=orders)[:, :-1]
        forced_labels = torch.tensor([0, 3, TINY["condition_num_classes"]])
        forced = torch.randint(0, TINY["codebook_size"], (3, TINY["image_seq_len"]), generator=g)
        _, raster = decode(model, forced_labels, forced, greedy=False)
        greedy_tokens, greedy_logits = decode(model, forced_labels, None, greedy=True)
    top2 = greedy_logits.topk(2, dim=-1).values
    reference = {
        "source": f"bytedance/1d-tokenizer@{commit} modeling/rar.py run unmodified with timm {timm.__version__} and "
                  f"torch {torch.__version__} by tests/models/generator/make_rar_reference.py (its docstring says how)",
        "rar_b": {"config": RAR_B, "keys": keys},
        "tiny": {"config": TINY, "seed": SEED, "init": "torch.randn(shape, generator=g) * 0.2 per key, sorted",
                 "lr": LR, "train": train,
                 "permuted": {"tokens": tokens.tolist(), "labels": labels.tolist(), "orders": orders.tolist(),
                              "logits": floats(permuted)},
                 "raster": {"labels": forced_labels.tolist(), "tokens": forced.tolist(), "guidance": GUIDANCE,
                            "guidance_pow": GUIDANCE_POW, "logits": floats(raster)},
                 "greedy": {"labels": forced_labels.tolist(), "guidance": GUIDANCE, "guidance_pow": GUIDANCE_POW,
                            "tokens": greedy_tokens.tolist(),
                            "min_top2_gap": float((top2[..., 0] - top2[..., 1]).min())}},
    }
    args.out.write_text(json.dumps(reference, separators=(",", ":")) + "\n")
    print(f"wrote {args.out}: min greedy top-2 gap {reference['tiny']['greedy']['min_top2_gap']:.4f}")


if __name__ == "__main__":
    main()
