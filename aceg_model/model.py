"""The ACE-G network (encoder + regressor), image preparation, and its checkpoint file.

A checkpoint is a safetensors file (``aceg_model.safe_files``) whose metadata
carries the full ``ModelConfig``, so loading rebuilds the exact network.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import torch
from torch import nn

from aceg_model.encoder import STRIDE, Encoder, EncoderConfig
from aceg_model.frames import Intrinsics
from aceg_model.regressor import Regressor, RegressorConfig

MODEL_KIND = "aceg-model"


@dataclass
class ModelConfig:
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    regressor: RegressorConfig = field(default_factory=RegressorConfig)
    image_height: int = 240  # px; working resolution (ACE uses 480; 240 keeps a 2-core CPU fast)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return cls(EncoderConfig.from_dict(d["encoder"]), RegressorConfig(**d["regressor"]), int(d["image_height"]))


class AcegModel(nn.Module):
    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = config or ModelConfig()
        if self.config.regressor.feat_dim != self.config.encoder.out_dim:
            raise ValueError("regressor.feat_dim must equal encoder.out_dim")
        self.encoder = Encoder(self.config.encoder)
        self.regressor = Regressor(self.config.regressor)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def model_hash(self) -> str:
        from aceg_model.safe_files import tensor_hash

        return tensor_hash(self.state_dict())

    def save(self, path, extra_meta: dict | None = None) -> None:
        from aceg_model.safe_files import save_tensors

        meta = {"config": asdict(self.config), "model_hash": self.model_hash(), **(extra_meta or {})}
        save_tensors(path, {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, meta, kind=MODEL_KIND)

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "AcegModel":
        from aceg_model.safe_files import load_tensors, read_meta

        meta = read_meta(path, kind=MODEL_KIND)
        try:
            config = ModelConfig.from_dict(meta["config"])
        except (KeyError, TypeError) as e:  # a checkpoint of an older network design
            raise ValueError(f"{path}: model config does not match this version of aceg_model ({e}); "
                             "use a checkpoint made by this version") from e
        model = cls(config)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tensors, meta = load_tensors(path, kind=MODEL_KIND, expected_shapes=shapes)
        model.load_state_dict(tensors)
        if model.model_hash() != meta["model_hash"]:
            raise ValueError(f"{path}: model hash does not match its tensors (file altered?)")
        # Channels-last conv weights: the same features (to 2e-6), 12.2 -> 10.0 ms per 320x240
        # image on the 2-core CPU (oneDNN's preferred layout; the input may stay NCHW).
        return model.to(device, memory_format=torch.channels_last).eval()


def working_size(width: int, height: int, target_height: int) -> tuple[int, int]:
    """(w, h) of the working image: height ``target_height``, aspect kept, both multiples of 8."""
    h = max(STRIDE, round(target_height / STRIDE) * STRIDE)
    w = max(STRIDE, round(width * h / height / STRIDE) * STRIDE)
    return w, h


def prepare_image(image: np.ndarray, intrinsics: Intrinsics, target_height: int) -> tuple[torch.Tensor, Intrinsics]:
    """uint8 RGB/grey image -> grey ``image_1HW`` float in [0, 1] at working size, and matching intrinsics."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    w, h = working_size(grey.shape[1], grey.shape[0], target_height)
    small = cv2.resize(grey, (w, h), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(small).float().div_(255.0).unsqueeze(0), intrinsics.resized(w, h)


def to_original_pixels(pixels_N2: np.ndarray, resized: Intrinsics, original: Intrinsics) -> np.ndarray:
    """Pixels of an image resized by ``prepare_image`` (intrinsics ``resized``) -> pixels of the
    original image (pixel-centre convention, per axis)."""
    sx, sy = resized.width / original.width, resized.height / original.height
    out = np.asarray(pixels_N2, dtype=np.float64).copy()
    out[:, 0] = (out[:, 0] + 0.5) / sx - 0.5
    out[:, 1] = (out[:, 1] + 0.5) / sy - 0.5
    return out


def pick_device(device: str = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device; use 'auto' or 'cpu'")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")
    return torch.device(device)
