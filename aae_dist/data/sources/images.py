"""`images:DIR`: DIR/<class>/*.png|jpg, resized to --image-size and read as grey or RGB.

The files are listed first and decoded a chunk at a time as the writer asks, so a folder of any size
passes through bounded memory; the seeded holdout shuffles the file list exactly as it shuffled the images."""

from __future__ import annotations

from ...errors import UserError
from .base import Opened, Option, Source, holdout_indices, indexed_chunks

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def list_images(folder: str) -> tuple[list[str], list[tuple[str, int]]]:
    """The class folders and every (image URL, label), in the order the images become samples."""
    from ... import storage

    fs, root = storage.filesystem(folder)
    classes = [c for c in storage.listdir(folder) if fs.isdir(f"{root}/{c}")]
    if not classes:
        raise UserError(f"no class sub-folders in {storage.redact(folder)}: images:DIR needs DIR/<class>/*.png")
    files = [(storage.join(folder, cls, name), label) for label, cls in enumerate(classes)
             for name in storage.listdir(storage.join(folder, cls)) if name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise UserError(f"no PNG/JPEG images under {storage.redact(folder)}")
    return classes, files


def decode(url: str, image_size: int, channels: int):
    """One image as uint8 (C, H, W)."""
    import io

    import numpy as np
    from PIL import Image

    from ... import storage

    try:
        img = Image.open(io.BytesIO(storage.read_bytes(url)))
        img = img.convert("L" if channels == 1 else "RGB").resize((image_size, image_size), Image.BILINEAR)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"cannot decode image {storage.redact(url)}: {exc}") from None
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def open_images(folder: str, opts: dict) -> Opened:
    import numpy as np

    from ... import storage

    size, channels = opts["image_size"], opts["channels"]
    if channels not in (1, 3):
        raise UserError(f"--channels must be 1 or 3, got {channels}")
    classes, files = list_images(folder)
    parts = holdout_indices(len(files), opts["test_fraction"])

    def take(idx):
        x = np.stack([decode(files[i][0], size, channels) for i in idx])
        return x, np.asarray([files[i][1] for i in idx], dtype=np.int64)

    return Opened(name=f"images:{storage.redact(folder)}", dtype=np.dtype(np.uint8), shape=(channels, size, size),
                  counts={k: len(v) for k, v in parts.items()}, chunks=lambda split: indexed_chunks(take, parts[split], 256),
                  num_classes=len(classes), labels=True, class_names=classes)


SOURCE = Source(scheme="images", usage="images:DIR", open=open_images, options=(
    Option("--image-size", "images: resize to SIZE x SIZE", int, 28),
    Option("--channels", "images: 1 (grey) or 3 (RGB)", int, 1),
))
