"""Exploratory benchmark: how well can the object be found from the LiteMedSAM image embedding with no clicks at all?

Trains a small prompt head for the frozen click segmenter's decoder (query sentence embedding -> 4 sparse prompt
tokens, image embedding -> dense prompt; ~0.2 M parameters) on the train split of the four compact-object datasets,
then reports on the val split:
  1. the IoU of the automatic mask (one decoder pass, no clicks, no ground truth), per dataset;
  2. the IoU when the oracle's click rule chases that automatic mask instead of the ground truth (a click-only agent
     whose object belief is the automatic mask), at the stop thresholds given.
This measures the perception ceiling the compact policy's correction clicks are bounded by (docs/benchmarks.md,
"Experiment: automatic perception"); it is not a shipped component.

    python benchmarks/explore_auto_perception.py --data ../shared/data --cache-dir runs/embeddings --steps 600
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ibisagent import Agent
from ibisagent.env import EnvConfig
from ibisagent.io import load_case_arrays, load_manifest, load_mask, load_rgb
from ibisagent.masks import iou
from ibisagent.segmenters import create_segmenter
from ibisagent.text_encoder import get_text_encoder

COMPACT = ["ph2_dermoscopy", "hc18_fetal_head_ultrasound", "busi_breast_ultrasound", "polyp_colonoscopy_small"]


class PromptHead(nn.Module):
    """Query embedding -> sparse prompt tokens; image embedding -> dense prompt (added to the 'no mask' embedding)."""

    def __init__(self, parts, tokens: int = 4) -> None:
        super().__init__()
        self.parts, self.tokens = parts, tokens
        self.mlp = nn.Sequential(nn.Linear(384, 256), nn.GELU(), nn.Linear(256, tokens * 256))
        self.dense = nn.Sequential(nn.Conv2d(256, 64, 1), nn.GELU(), nn.Conv2d(64, 256, 1))
        nn.init.zeros_(self.dense[2].weight)
        nn.init.zeros_(self.dense[2].bias)

    def forward(self, emb: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        b = emb.shape[0]
        pe = self.parts.prompt_encoder
        dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, 64, 64) + self.dense(emb)
        low, _ = self.parts.mask_decoder(image_embeddings=emb, image_pe=pe.get_dense_pe(),
                                         sparse_prompt_embeddings=self.mlp(txt).view(b, self.tokens, 256),
                                         dense_prompt_embeddings=dense, multimask_output=False)
        return low[:, 0]  # (B, 256, 256) logits over the whole image (aspect not kept)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data")
    ap.add_argument("--cache-dir", default="runs/embeddings")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thresholds", default="0.85,0.9,0.95", help="stop thresholds of the chasing oracle")
    ap.add_argument("--max-steps", type=int, default=6, help="turns of the chasing oracle (Terminate counts)")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.set_num_threads(2)
    seg = create_segmenter("litemedsam-click", cache_dir=args.cache_dir)
    for p in list(seg.parts.prompt_encoder.parameters()) + list(seg.parts.mask_decoder.parameters()):
        p.requires_grad_(False)
    te = get_text_encoder()

    def load(split: str) -> list[tuple]:
        out = []
        for c in load_manifest(args.data, split=split, datasets=COMPACT):
            if c.mask is None:
                continue
            img, gt = load_rgb(c.image), load_mask(c.mask)
            emb = torch.from_numpy(np.asarray(seg.embedding(img), np.float32).reshape(256, 64, 64))
            g256 = np.asarray(Image.fromarray(gt.astype(np.uint8) * 255).resize((256, 256), Image.BILINEAR)) >= 128
            out.append((c, emb, torch.from_numpy(te.encode(c.query)).float(), torch.from_numpy(g256).float(), gt))
        return out

    t0 = time.perf_counter()
    train, val = load("train"), load("val")
    print(f"{len(train)} train / {len(val)} val masks loaded in {time.perf_counter() - t0:.0f}s", flush=True)
    head = PromptHead(seg.parts)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    for step in range(args.steps):
        idx = rng.integers(0, len(train), 8)
        emb = torch.stack([train[i][1] for i in idx])
        txt = torch.stack([train[i][2] for i in idx])
        g = torch.stack([train[i][3] for i in idx])
        flip = torch.from_numpy(rng.random(8) < 0.5)  # mirror augmentation (these queries name no side)
        emb = torch.where(flip[:, None, None, None], emb.flip(-1), emb)
        g = torch.where(flip[:, None, None], g.flip(-1), g)
        logits = head(emb, txt)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * g).sum((1, 2)) + 1) / (p.sum((1, 2)) + g.sum((1, 2)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, g) + dice.mean()
        for group in opt.param_groups:
            group["lr"] = 1e-3 * 0.5 * (1 + np.cos(np.pi * step / args.steps))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step + 1}/{args.steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    head.eval()
    auto: dict[str, np.ndarray] = {}
    rows: dict[str, list[float]] = {}
    with torch.no_grad():
        for c, emb, txt, _, gt in val:
            logits = head(emb[None], txt[None])
            m = F.interpolate(logits[None], size=gt.shape, mode="bilinear", align_corners=False)[0, 0].numpy() > 0
            auto[c.id] = m
            rows.setdefault(c.dataset, []).append(float(iou(m, gt)))
    _report("automatic mask, no clicks", rows, None)
    for thr in [float(t) for t in args.thresholds.split(",")]:
        agent = Agent(policy="oracle", segmenter=seg, policy_kwargs={"iou_threshold": thr},
                      config=EnvConfig(max_steps=args.max_steps))
        rows, steps = {}, []
        for c, *_ in val:
            img, gt = load_case_arrays(c)
            ep = agent.segment(img, c.query, gt=auto[c.id])  # the oracle sees the automatic mask, not the GT
            rows.setdefault(c.dataset, []).append(float(iou(ep.mask, gt)))
            steps.append(len(ep.steps))
        _report(f"oracle clicks chasing the automatic mask, stop at agreement {thr}", rows, float(np.mean(steps)))


def _report(name: str, rows: dict[str, list[float]], steps: float | None) -> None:
    allv = [v for vs in rows.values() for v in vs]
    per = ", ".join(f"{k} {np.mean(v):.3f} ({len(v)})" for k, v in rows.items())
    extra = f", mean steps {steps:.2f}" if steps is not None else ""
    print(f"{name}: IoU {np.mean(allv):.3f} over {len(allv)}{extra}; {per}", flush=True)


if __name__ == "__main__":
    main()
