"""Stage 2 of CPU pre-training: the regressor and per-scene codes on frozen, cached encoder features.

With the encoder frozen, every view of a scene is encoded once; a training
step is then only the regressor (cross-attention over the codes), tens of
times cheaper than a full step, so a CPU can afford the thousands of
mapping/query iterations the scene-coordinate loss needs to get going
(FINDINGS.md: it stayed at the predict-the-mean level for thousands of
full iterations). Same losses and the same alternation as ``pretrain``:
mapping iterations update codes + regressor on mapping views, query
iterations update the regressor alone on query views (codes fixed).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aceg_model.encoder import patch_centres
from aceg_model.losses import ReprojectionLossConfig, coords_nll, reprojection_nll
from aceg_model.model import AcegModel, prepare_image
from aceg_model.pretrain_data import SceneViews, T_cam_map, load_views, patch_coords


@dataclass
class CachedScene:
    """Encoder features of every view of one scene, with geometry at the patch centres."""

    feats_VPF: torch.Tensor  # float16
    coords_VP3: torch.Tensor  # scene coords relative to the scene centre; NaN where nothing was hit
    T_cam_map_V44: torch.Tensor
    K_V33: torch.Tensor
    n_mapping: int


@torch.inference_mode()
def cache_scene(model: AcegModel, scene: SceneViews, rng: np.random.Generator) -> CachedScene:
    from aceg_model.scene import PRESETS

    views = scene.mapping + scene.queries
    # Photometric changes are drawn once per view here (mild on mapping, strong on query views).
    images, Ks = [], []
    for i, v in enumerate(views):
        preset = PRESETS["random_mild"] if i < len(scene.mapping) else PRESETS["random_strong"]
        img, K = prepare_image(preset.apply(v.image, rng), v.intrinsics, model.config.image_height)
        images.append(img)
        Ks.append(K.K)
    feats = torch.cat([model.encoder(torch.stack(images[i:i + 16])) for i in range(0, len(images), 16)])
    V, D, h, w = feats.shape
    centre = torch.as_tensor(scene.centre_3, dtype=torch.float32)
    coords = torch.stack([patch_coords(vw, h, w)[0] for vw in views]) - centre
    T = np.stack([T_cam_map(vw, scene.centre_3) for vw in views])
    return CachedScene(feats.flatten(2).transpose(1, 2).half(), coords, torch.as_tensor(T, dtype=torch.float32),
                       torch.as_tensor(np.stack(Ks), dtype=torch.float32), len(scene.mapping))


def sample(cs: CachedScene, query: bool, n: int, gen: torch.Generator):
    """n patches (with ground truth) from the mapping or the query views of a cached scene."""
    lo, hi = (cs.n_mapping, len(cs.feats_VPF)) if query else (0, cs.n_mapping)
    v = torch.randint(lo, hi, (n * 2,), generator=gen)
    p = torch.randint(cs.feats_VPF.shape[1], (n * 2,), generator=gen)
    ok = torch.isfinite(cs.coords_VP3[v, p]).all(dim=1)
    v, p = v[ok][:n], p[ok][:n]
    return cs.feats_VPF[v, p].float(), cs.coords_VP3[v, p], v, p


def train(model: AcegModel, scenes: list[CachedScene], out: Path, minutes: float, scenes_per_step: int = 8,
          patches: int = 512, lr: float = 3e-4, code_lr: float = 0.02, w_reproj: float = 0.05, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.encoder.requires_grad_(False)
    model.regressor.requires_grad_(True)
    codes = [torch.nn.Parameter(c) for c in model.regressor.init_codes(len(scenes), gen)]
    opt = torch.optim.AdamW(model.regressor.parameters(), lr=lr, weight_decay=0.01)
    code_opt = torch.optim.Adam(codes, lr=code_lr)
    loss_cfg = ReprojectionLossConfig()
    pix_P2 = patch_centres(model.config.image_height // 8, scenes[0].feats_VPF.shape[1] // (model.config.image_height // 8))
    t0, step, log = time.perf_counter(), 0, out / "regressor_log.jsonl"
    while time.perf_counter() - t0 < minutes * 60:
        frac = (time.perf_counter() - t0) / (minutes * 60)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
        pick = torch.randperm(len(scenes), generator=gen)[:scenes_per_step].tolist()
        stats = {}
        for phase in ("mapping", "query"):
            batch = [sample(scenes[i], phase == "query", patches, gen) for i in pick]
            b = min(len(x[0]) for x in batch)
            feats = torch.stack([x[0][:b] for x in batch])
            gt = torch.stack([x[1][:b] for x in batch])
            c = torch.stack([codes[i] if phase == "mapping" else codes[i].detach() for i in pick])
            coords, log_sigma = model.regressor(feats, c)
            loss = coords_nll(coords.reshape(-1, 3), log_sigma.reshape(-1), gt.reshape(-1, 3))
            T = torch.cat([scenes[i].T_cam_map_V44[x[2][:b]] for i, x in zip(pick, batch)])
            K = torch.cat([scenes[i].K_V33[x[2][:b]] for i, x in zip(pick, batch)])
            pix = torch.cat([pix_P2[x[3][:b]] for x in batch])
            l_rep, _ = reprojection_nll(coords.reshape(-1, 3), log_sigma.reshape(-1), pix, T, K, frac, loss_cfg)
            opt.zero_grad(set_to_none=True)
            code_opt.zero_grad(set_to_none=True)
            (loss + w_reproj * l_rep).backward()
            torch.nn.utils.clip_grad_norm_(model.regressor.parameters(), 1.0)
            opt.step()
            if phase == "mapping":
                code_opt.step()
            stats[phase] = round(100 * (coords - gt).norm(dim=-1).median().item(), 1)
        if step % 50 == 0:
            line = {"step": step, "elapsed_s": round(time.perf_counter() - t0, 1), "median_err_cm": stats}
            print(json.dumps(line), flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(line) + "\n")
        step += 1
    model.requires_grad_(True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Stage 2: train the regressor (+ per-scene codes) on frozen, cached "
                                "encoder features of a scene bank.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="stage-1 model (its encoder is kept frozen)")
    p.add_argument("--bank", type=Path, required=True, help="folder of pre-rendered scenes")
    p.add_argument("--scenes", type=int, default=64, help="how many bank scenes to cache")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time (minutes)")
    p.add_argument("--out", type=Path, required=True, help="output folder (model.safetensors, log)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = AcegModel.load(args.model)
    rng = np.random.default_rng(0)
    files = sorted(args.bank.glob("scene-*.npz"))[: args.scenes]
    t0 = time.perf_counter()
    scenes = [cache_scene(model, load_views(f), rng) for f in files]
    print(f"cached {len(scenes)} scenes in {time.perf_counter() - t0:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    train(model, scenes, args.out, args.minutes)
    model.save(args.out / "model.safetensors", {"stage2": {"scenes": len(scenes), "minutes": args.minutes,
                                                          "bank": str(args.bank)}})
    print(f"wrote {args.out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
