"""Frame preparation shared by the frame backbones: checks, centre crops, resizing, normalisation.

Crops are specified in pixels at the protocol's reference short side of 256 (docs/design/features.md:
short side 256, centre crop 224 x 300, ...). Frames decoded at another short side get the same crop
scaled to their size, so the field of view never depends on the decode resolution; the crop is then
resized to the backbone's input size.

The published RG / Fis-V features prepared images otherwise, one uint8 image at a time: a JPEG file
written and read by OpenCV, then torchvision's PIL transforms. `jpeg_round_trip` and `pil_resize_crop`
redo those two steps exactly, for any image (RGB frames or grey flow images).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

REFERENCE_SHORT_SIDE = 256
# The published features' PIL geometry: Resize(256), CenterCrop((224, 300)), Resize((224, 224)).
PIL_SHORT_SIDE = 256
PIL_CROP = (224, 300)  # height, width
PIL_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def as_frames(batch: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Validate a frame batch: uint8 RGB shaped (B, F, H, W, 3)."""
    frames = torch.from_numpy(batch) if isinstance(batch, np.ndarray) else batch
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.uint8:
        kind = f"{type(batch).__name__} {getattr(batch, 'dtype', '')}"
        raise TypeError(f"frames must be a uint8 tensor, got {kind}")
    if frames.ndim != 5 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be shaped (B, F, H, W, 3), got {tuple(frames.shape)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0:
        raise ValueError(f"empty frame batch {tuple(frames.shape)}")
    return frames


def centre_crop_box(height: int, width: int, crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width) of a reference-size crop scaled to this frame, clamped to it."""
    scale = min(height, width) / REFERENCE_SHORT_SIDE
    crop_h = min(height, max(1, round(crop[0] * scale)))
    crop_w = min(width, max(1, round(crop[1] * scale)))
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def crop_resize(
    frames: torch.Tensor, crop: tuple[int, int], size: int, device: torch.device
) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) -> float (B, F, 3, size, size) in [0, 255] on `device`.

    The crop happens on uint8 before the copy to the device, so only the needed pixels travel.
    """
    frames = as_frames(frames)
    batch, num_frames, height, width, _ = frames.shape
    top, left, crop_h, crop_w = centre_crop_box(height, width, crop)
    x = frames[:, :, top : top + crop_h, left : left + crop_w].to(device, non_blocking=True)
    x = x.reshape(batch * num_frames, crop_h, crop_w, 3).permute(0, 3, 1, 2).float()
    if (crop_h, crop_w) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.reshape(batch, num_frames, 3, size, size)


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or not (
            images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        kind = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise ValueError(f"images must be a uint8 array shaped (N, H, W) or (N, H, W, 3), got {kind}")


def pil_resize_crop(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) grey or (N, H, W, 3) RGB -> uint8 (N, 224, 224[, 3]) by torchvision's PIL transforms
    Resize(256), CenterCrop((224, 300)), Resize((224, 224)), bilinear: the published features' geometry.

    Each PIL resize returns uint8 again (PIL resamples 8-bit images in fixed point), as the published
    transforms did; the crop is taken at the reference short side, not scaled as `centre_crop_box` does."""
    _check_images(images)
    return np.stack([_pil_resize_crop_one(image) for image in images])


def _pil_resize_crop_one(image: np.ndarray) -> np.ndarray:
    height, width = image.shape[:2]
    short, long = min(height, width), max(height, width)
    new_long = int(PIL_SHORT_SIDE * long / short)  # torchvision truncates the long side, it does not round
    size = (PIL_SHORT_SIDE, new_long) if width <= height else (new_long, PIL_SHORT_SIDE)  # PIL's (w, h)
    resized = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    crop = _pil_centre_crop(resized, PIL_CROP)
    return np.asarray(Image.fromarray(crop).resize((PIL_SIZE, PIL_SIZE), Image.BILINEAR))


def _pil_centre_crop(image: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """torchvision's CenterCrop: a side shorter than the crop is first padded with zeros (the odd pixel
    after), and the offsets are Python's round() of half the excess, which rounds .5 to even."""
    crop_h, crop_w = crop
    pad_h, pad_w = max(crop_h - image.shape[0], 0), max(crop_w - image.shape[1], 0)
    if pad_h or pad_w:
        pads = [(pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2)] + [(0, 0)] * (image.ndim - 2)
        image = np.pad(image, pads)
    top = int(round((image.shape[0] - crop_h) / 2.0))
    left = int(round((image.shape[1] - crop_w) / 2.0))
    return np.ascontiguousarray(image[top : top + crop_h, left : left + crop_w])


def jpeg_round_trip(images: np.ndarray, quality: int) -> np.ndarray:
    """uint8 (N, H, W) grey or (N, H, W, 3) RGB -> the same images after an OpenCV JPEG encode (imwrite's
    encoder at `quality`) and decode; quality 0: no round trip, the images themselves.

    RGB images are encoded in BGR order and decoded back to it before returning to RGB: what a frame
    decoded by OpenCV (BGR), written with imwrite and read with imread + BGR2RGB went through, as the
    published features' frames did. Encoding RGB as if it were BGR would subsample the wrong chroma."""
    _check_images(images)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise ValueError(f"JPEG quality must be an integer from 0 (no round trip) to 100, got {quality!r}")
    if quality == 0:
        return images
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    colour = images.ndim == 4

    def round_trip(image: np.ndarray) -> np.ndarray:
        ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1] if colour else image), params)
        if not ok:
            raise RuntimeError(f"OpenCV could not JPEG-encode a {image.shape} image")
        decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR if colour else cv2.IMREAD_GRAYSCALE)
        return decoded[..., ::-1] if colour else decoded

    return np.ascontiguousarray(np.stack([round_trip(image) for image in images]))


def normalise(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Pixels in [0, 255] with channels on dim -3 -> (x / 255 - mean) / std."""
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x / 255.0 - mean_t) / std_t


def uniform_frame_indices(num_frames: int, count: int) -> torch.Tensor:
    """`count` indices spread evenly over `num_frames` (the centre of each of `count` equal bins)."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_frames / count).long()


def dummy_frames(num_frames: int, short_side: int = REFERENCE_SHORT_SIDE) -> torch.Tensor:
    """One all-grey clip at the decode size, with the 300/224 aspect the RGB crop needs. Short side 0
    (frames at their source resolution, size unknown here) gives the reference size."""
    short_side = short_side or REFERENCE_SHORT_SIDE
    width = round(short_side * 300 / 224)
    return torch.full((1, num_frames, short_side, width, 3), 128, dtype=torch.uint8)


def count_flops(fn, *args) -> float:
    """FLOPs of one call as counted by torch's FlopCounterMode (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return float(counter.get_total_flops())


def one_clip_per_call(forward, x: torch.Tensor) -> torch.Tensor:
    """forward(x) on a GPU; on a CPU one clip (row of x) per call, concatenated.

    oneDNN picks its convolution and matmul kernels by the shape of the call, and they round
    differently: a batched call would make a clip's features depend on which clips
    shared its batch (--batch-segments, the number of processes). A CPU runs one segment per batch by
    default, so this costs nothing there; a GPU keeps its batches (and bf16)."""
    if x.device.type != "cpu":
        return forward(x)
    return torch.cat([forward(x[i : i + 1]) for i in range(len(x))])

