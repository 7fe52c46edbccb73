"""Camera images checked and made into model inputs, by openpi's rule (uint8, PIL) and by LeRobot's (float, torch)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pi0.errors import BadRequest

MIN_IMAGE_SIDE = 8  # px: smaller is no camera image (a 1 x 1 "image" would be blown up to the model's size)


MAX_ASPECT = 16  # longest side over shortest: beyond it the resized image keeps a few rows of pixels


def checked_image(image: Any, name: str = "image", prefer_chw: bool = False) -> np.ndarray:
    """A robot's 3-channel image, HWC or CHW (`prefer_chw` decides a 3 x H x 3 tie), validated: integers
    in [0, 255] or finite floats in [0, 1], at least MIN_IMAGE_SIDE px a side, an aspect ratio up to
    MAX_ASPECT. Returns it HWC, as given otherwise. Raises BadRequest naming the key and the shape."""
    a = np.asarray(image)
    if a.dtype.kind not in "uif":
        raise BadRequest(f"{name} must be a uint8 or float array, got dtype {a.dtype}")
    if a.ndim != 3 or 3 not in (a.shape[0], a.shape[-1]):
        raise BadRequest(f"{name} must be HWC or CHW with 3 channels, got shape {list(a.shape)}")
    if a.shape[0] == 3 and (prefer_chw or a.shape[-1] != 3):
        a = np.transpose(a, (1, 2, 0))
    h, w = a.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE or max(h, w) > MAX_ASPECT * min(h, w):
        raise BadRequest(f"{name} is {h} x {w} px (shape {list(np.asarray(image).shape)}): a camera image needs at "
                         f"least {MIN_IMAGE_SIDE} px a side and an aspect ratio up to {MAX_ASPECT}:1")
    if a.dtype.kind in "ui":  # uint8, or e.g. pixel lists from JSON
        if a.size and (a.min() < 0 or a.max() > 255):
            raise BadRequest(f"{name}: integer pixels must lie in [0, 255], got [{a.min()}, {a.max()}]")
        return a
    if not np.isfinite(a).all():
        raise BadRequest(f"{name} holds NaN or infinite values")
    if a.size and (a.min() < 0.0 or a.max() > 1.0):
        raise BadRequest(f"{name}: float images must be in [0, 1], got [{a.min():.3g}, {a.max():.3g}]")
    return a


def to_uint8_hwc(image: Any, name: str = "image") -> np.ndarray:
    """uint8 (or other integers in [0, 255]), or float in [0, 1] (x255, truncated as openpi does); HWC or CHW
    -> uint8 HWC, 3 channels."""
    a = checked_image(image, name)
    if a.dtype.kind in "ui":
        return np.ascontiguousarray(a.astype(np.uint8, copy=False))
    return np.ascontiguousarray((255 * a).astype(np.uint8))


def resize_with_pad_uint8(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """openpi's rule (tf.image.resize_with_pad via PIL): keep the aspect ratio, bilinear, zero padding
    centred. uint8 HWC -> uint8 [height, width, 3]."""
    from PIL import Image

    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    ratio = max(w / width, h / height)
    rh, rw = int(h / ratio), int(w / ratio)
    resized = Image.fromarray(image).resize((rw, rh), resample=Image.BILINEAR)
    out = Image.new(resized.mode, (width, height), 0)
    out.paste(resized, (max(0, int((width - rw) / 2)), max(0, int((height - rh) / 2))))
    return np.asarray(out)


def image_to_model(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 HWC (any size) -> float32 CHW [3, size, size] in [-1, 1]."""
    x = resize_with_pad_uint8(image, size, size).astype(np.float32) / 255.0 * 2.0 - 1.0
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def to_float_chw(image: np.ndarray) -> torch.Tensor:
    """An image `checked_image` passed (HWC) -> float32 [3, H, W]: floats in [0, 1] as LeRobot takes them (no uint8
    step), integers / 255."""
    a = np.ascontiguousarray(np.transpose(image, (2, 0, 1)))
    if a.dtype.kind in "ui":
        return torch.from_numpy(a).float() / 255
    return torch.from_numpy(a.astype(np.float32, copy=False))


def resize_with_pad_float(image: torch.Tensor, size: int) -> torch.Tensor:
    """[3, H, W] float in [0, 1] -> [3, size, size]: LeRobot's (openpi's torch) rule."""
    _, h, w = image.shape
    if (h, w) == (size, size):
        return image
    ratio = max(w / size, h / size)
    rh, rw = int(h / ratio), int(w / ratio)
    x = F.interpolate(image[None], size=(rh, rw), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    top, rem_h = divmod(size - rh, 2)
    left, rem_w = divmod(size - rw, 2)
    return F.pad(x, (left, left + rem_w, top, top + rem_h), mode="constant", value=0.0)[0]
