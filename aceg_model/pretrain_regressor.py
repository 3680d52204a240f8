"""Stage 2 of CPU pre-training: the regressor on frozen, cached encoder features.

Stage 1 (``aceg-pretrain``) trains the encoder, whose dense correspondence
loss is what gets a CPU-trained encoder going (FINDINGS.md). With the encoder
frozen, every view of a scene is encoded once, and a step is only the
regressor, tens of times cheaper than a full step. Each step is a query
iteration: a scene's codes are seeded from its mapping views (what mapping
does, with rendered positions standing in for a triangulated map) and query
views under strong lighting and viewpoint changes must find their landmarks.

The shipped regressor is linear: its query is the PCA projection of the features
(``--projection-only``). ``--match-projection`` trains that projection alone from the PCA fit,
so that query patches match the landmarks at their true points, and measures it on held scenes
with top-k attention at the shipped temperature, as localization runs it (``train_projection``;
tried, not adopted: models/README.md).
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
import torch.nn.functional as F

from aceg_model.losses import coords_nll
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


def landmark_draw(scenes: list[CachedScene], landmarks: int, patches: int,
                  gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Per scene, ``landmarks`` mapping patches (features, true positions) and ``patches`` query
    patches (features, true points), trimmed to the fewest any scene gave."""
    lm = [sample(cs, False, landmarks, gen) for cs in scenes]
    qs = [sample(cs, True, patches, gen) for cs in scenes]
    L, b = min(len(x[0]) for x in lm), min(len(x[0]) for x in qs)
    return (torch.stack([x[0][:L] for x in lm]), torch.stack([x[1][:L] for x in lm]),
            torch.stack([x[0][:b] for x in qs]), torch.stack([x[1][:b] for x in qs]))


def landmark_distances(gt_Sb3: torch.Tensor, landmarks_SL3: torch.Tensor) -> torch.Tensor:
    """Distances ``S x b x L`` from each patch's true 3D point to every landmark; a patch without
    one (NaN) is placed 1000 km away, so that no radius reaches it."""
    return torch.cdist(torch.nan_to_num(gt_Sb3, nan=1e6), landmarks_SL3)


def landmark_targets(gt_Sb3: torch.Tensor, landmarks_SL3: torch.Tensor, radius_m: float) -> torch.Tensor:
    """Index of the landmark nearest to each patch's true 3D point, or -100 (ignored) beyond ``radius_m``."""
    dist, idx = landmark_distances(gt_Sb3, landmarks_SL3).min(dim=-1)
    return torch.where(dist < radius_m, idx, torch.full_like(idx, -100))


def train(model: AcegModel, scenes: list[CachedScene], out: Path, minutes: float, scenes_per_step: int = 8,
          landmarks: int = 2048, patches: int = 512, lr: float = 1e-3, w_match: float = 1.0,
          position_noise_m: float = 0.02, match_radius_m: float = 0.05, seed: int = 0) -> None:
    """Query iterations on frozen features: per scene, landmarks seeded from mapping views (keys from
    their features, positions from the rendered coordinates plus noise, like a triangulated map),
    then query-view patches (strong photometric and viewpoint changes) regress their coordinates.
    Losses: 3D error + Laplace NLL (trains the uncertainty), and a cross-entropy that makes each
    query attend to the landmark at its true 3D point (metric learning for the keys)."""
    gen = torch.Generator().manual_seed(seed)
    model.encoder.requires_grad_(False)
    model.regressor.requires_grad_(True)
    opt = torch.optim.AdamW(model.regressor.parameters(), lr=lr, weight_decay=0.01)
    t0, step, log = time.perf_counter(), 0, out / "regressor_log.jsonl"
    while time.perf_counter() - t0 < minutes * 60:
        frac = (time.perf_counter() - t0) / (minutes * 60)
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
        pick = torch.randperm(len(scenes), generator=gen)[:scenes_per_step].tolist()
        lm_f, lm_pos, feats, gt = landmark_draw([scenes[i] for i in pick], landmarks, patches, gen)
        L = lm_pos.shape[1]
        noisy = lm_pos + position_noise_m * torch.randn(lm_pos.shape, generator=gen)
        codes = torch.stack([model.regressor.seed_codes(f, p) for f, p in zip(lm_f, noisy)])
        coords, log_sigma, logits = model.regressor.regress(feats, codes, return_logits=True)
        l_coords = coords_nll(coords.reshape(-1, 3), log_sigma.reshape(-1), gt.reshape(-1, 3))
        target = landmark_targets(gt, lm_pos, match_radius_m)
        l_match = F.cross_entropy(logits.reshape(-1, L), target.reshape(-1), ignore_index=-100) \
            if (target >= 0).any() else logits.sum() * 0.0
        opt.zero_grad(set_to_none=True)
        (l_coords + w_match * l_match).backward()
        torch.nn.utils.clip_grad_norm_(model.regressor.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            with torch.no_grad():
                err = (coords - gt).norm(dim=-1)
                ok = torch.isfinite(err)
                sig = log_sigma[ok].exp()
                # Does the uncertainty rank errors? Median error of the most and least confident halves.
                order = sig.argsort()
                e = err[ok][order]
                line = {"step": step, "elapsed_s": round(time.perf_counter() - t0, 1),
                        "coords": round(l_coords.item(), 3), "match": round(l_match.item(), 3),
                        "median_err_cm": round(100 * e.median().item(), 1),
                        "median_err_cm_confident_half": round(100 * e[: len(e) // 2].median().item(), 1),
                        "matched_frac": round((target >= 0).float().mean().item(), 3),
                        "temperature": round(model.regressor.log_temperature.exp().item(), 1)}
            print(json.dumps(line), flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(line) + "\n")
        step += 1
    model.requires_grad_(True)


def matching_loss(q_SbK: torch.Tensor, keys_SLK: torch.Tensor, gt_Sb3: torch.Tensor, lm_pos_SL3: torch.Tensor,
                  temperature: float, radius_m: float) -> torch.Tensor:
    """How much attention misses the landmarks near each patch's true point: -log of the softmax mass
    (at ``temperature``, over all L landmarks) on those within ``radius_m``, averaged over the
    patches that have one. Unit queries and keys.

    Every landmark within the radius counts as right, so near-duplicate landmarks (a dense map
    has several within a few cm) do not compete with each other as they would under a
    one-target cross-entropy."""
    logits_SbL = temperature * torch.einsum("sbk,slk->sbl", q_SbK, keys_SLK)
    near_SbL = landmark_distances(gt_Sb3, lm_pos_SL3) < radius_m
    has_Sb = near_SbL.any(dim=-1)
    if not has_Sb.any():
        return logits_SbL.sum() * 0.0
    missed_Sb = logits_SbL.logsumexp(-1) - logits_SbL.masked_fill(~near_SbL, float("-inf")).logsumexp(-1)
    return missed_Sb[has_Sb].mean()


@torch.no_grad()
def matching_quality(model: AcegModel, scenes: list[CachedScene], landmarks: int = 8192, patches: int = 1024,
                     radius_m: float = 0.05, seed: int = 0) -> dict[str, float]:
    """Landmark matching on held scenes with a fixed draw: of the query patches that have a landmark
    within ``radius_m``, the share whose best-matching key is one (``top1``), and the share whose
    regressed coordinate (top-k attention, as localization runs it) lands within the radius (``coord``)."""
    gen = torch.Generator().manual_seed(seed)
    reg = model.regressor
    top1, coord, n = 0.0, 0.0, 0
    for cs in scenes:
        lm_f, lm_pos, q_f, gt = landmark_draw([cs], landmarks, patches, gen)
        near = landmark_distances(gt, lm_pos) < radius_m
        has = near.any(dim=-1)
        codes = reg.seed_codes(lm_f[0], lm_pos[0]).unsqueeze(0)
        q = reg.queries(q_f)[1]
        best = (q @ F.normalize(codes[..., : reg.config.key_dim], dim=-1).transpose(1, 2)).argmax(dim=-1)
        coords, _ = reg(q_f, codes)
        top1 += near.gather(-1, best.unsqueeze(-1))[..., 0][has].float().sum().item()
        coord += ((coords - gt).norm(dim=-1) < radius_m)[has].float().sum().item()
        n += int(has.sum())
    return {"top1": top1 / max(n, 1), "coord": coord / max(n, 1), "patches": n}


def train_projection(model: AcegModel, scenes: list[CachedScene], held: list[CachedScene], out: Path,
                     minutes: float, scenes_per_step: int = 4, landmarks: int = 8192, patches: int = 512,
                     lr: float = 3e-4, radius_m: float = 0.05, temperature: float | None = None,
                     max_steps: int | None = None, seed: int = 0) -> list[dict]:
    """Train only the query projection (from its PCA fit) to put each query patch's attention on the
    landmarks at its true point (``matching_loss``), with the regressor otherwise as it runs: linear,
    at its fixed temperature. Keys and queries share the projection, so both sides move.
    ``temperature`` (default: the regressor's) is the loss's only: which key ranks first does not
    depend on it, and a softer one spreads the gradient over more than the hardest landmark.

    Stops after ``minutes`` or ``max_steps``, whichever comes first. Returns the log: the mean
    loss, and ``matching_quality`` on ``held``, at the start, every 100 steps and at the end."""
    gen = torch.Generator().manual_seed(seed)
    reg = model.regressor
    model.requires_grad_(False)
    reg.query.requires_grad_(True)
    params = list(reg.query.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tau = float(reg.log_temperature.exp()) if temperature is None else temperature
    t0, step, history, losses, log = time.perf_counter(), 0, [], [], out / "projection_log.jsonl"
    while True:
        frac = (time.perf_counter() - t0) / (minutes * 60)
        if max_steps is not None:
            frac = max(frac, step / max_steps)
        if step % 100 == 0 or frac >= 1:
            line = {"step": step, "elapsed_s": round(time.perf_counter() - t0, 1),
                    **{k: round(v, 4) for k, v in matching_quality(model, held, radius_m=radius_m).items()}}
            if losses:  # mean training loss since the last line
                line["loss"] = round(float(np.mean(losses)), 4)
                losses = []
            history.append(line)
            print(json.dumps(line), flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(line) + "\n")
        if frac >= 1:
            break
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))
        pick = torch.randperm(len(scenes), generator=gen)[:scenes_per_step].tolist()
        lm_f, lm_pos, q_f, gt = landmark_draw([scenes[i] for i in pick], landmarks, patches, gen)
        keys = reg.queries(lm_f)[1]
        q = reg.queries(q_f)[1]
        loss = matching_loss(q, keys, gt, lm_pos, tau, radius_m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
    model.requires_grad_(True)
    return history


def with_encoder_of(path: Path) -> AcegModel:
    """A model with the current regressor design and the (frozen) encoder of the checkpoint at ``path``."""
    from aceg_model.encoder import EncoderConfig
    from aceg_model.model import MODEL_KIND, ModelConfig
    from aceg_model.safe_files import load_tensors, read_meta

    meta = read_meta(path, kind=MODEL_KIND)["config"]
    model = AcegModel(ModelConfig(encoder=EncoderConfig.from_dict(meta["encoder"]), image_height=int(meta["image_height"])))
    tensors, _ = load_tensors(path, kind=MODEL_KIND)
    model.encoder.load_state_dict({k[len("encoder."):]: v for k, v in tensors.items() if k.startswith("encoder.")})
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Stage 2: train the regressor (+ per-scene codes) on frozen, cached "
                                "encoder features of a scene bank.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="stage-1 model (its encoder is kept frozen)")
    p.add_argument("--bank", type=Path, required=True, help="folder of pre-rendered scenes")
    p.add_argument("--scenes", type=int, default=64, help="how many bank scenes to cache")
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time (minutes)")
    p.add_argument("--out", type=Path, required=True, help="output folder (model.safetensors, log)")
    p.add_argument("--projection-only", action="store_true",
                   help="no training: fit the query projection by PCA of the mapping views' features "
                        "(Regressor.fit_query_projection) and save")
    p.add_argument("--match-projection", action="store_true",
                   help="fit the query projection by PCA, then train it alone for --minutes so that query "
                        "patches match the landmarks at their true points (train_projection)")
    p.add_argument("--held", type=int, default=8, help="with --match-projection: bank scenes after the "
                   "first --scenes, kept out of training to measure matching")
    p.add_argument("--lr", type=float, default=3e-4, help="with --match-projection: peak learning rate")
    p.add_argument("--match-temperature", type=float, default=None,
                   help="with --match-projection: the loss's temperature (default: the regressor's)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.lr <= 0 or args.held < 0 or args.scenes < 1:
        p.error("--minutes and --lr must be > 0, --held >= 0 and --scenes >= 1")
    torch.manual_seed(0)
    model = with_encoder_of(args.model)
    rng = np.random.default_rng(0)
    files = sorted(args.bank.glob("scene-*.npz"))[: args.scenes + (args.held if args.match_projection else 0)]
    t0 = time.perf_counter()
    scenes = [cache_scene(model, load_views(f), rng) for f in files]
    print(f"cached {len(scenes)} scenes in {time.perf_counter() - t0:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.projection_only or args.match_projection:
        scenes, held = scenes[: args.scenes], scenes[args.scenes:]
        feats = torch.cat([cs.feats_VPF[: cs.n_mapping].flatten(0, 1) for cs in scenes])
        kept = model.regressor.fit_query_projection(feats)
        print(f"query projection from {len(feats)} patches keeps {100 * kept:.1f} % of the variance")
        info = {"query_projection": {"scenes": len(scenes), "patches": len(feats), "variance_kept": kept}}
        if args.match_projection:
            history = train_projection(model, scenes, held, args.out, args.minutes, lr=args.lr,
                                       temperature=args.match_temperature)
            info["match_projection"] = {"minutes": args.minutes, "lr": args.lr, "held_scenes": len(held),
                                        "temperature": args.match_temperature,
                                        "first": history[0], "last": history[-1]}
    else:
        train(model, scenes, args.out, args.minutes)
        info = {"stage2": {"scenes": len(scenes), "minutes": args.minutes}}
    info.update(bank=str(args.bank), encoder_from=str(args.model))
    model.save(args.out / "model.safetensors", info)
    print(f"wrote {args.out / 'model.safetensors'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
