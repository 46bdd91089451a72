"""Picture of the demo data: generated DeepLesion slices, and the views the pretraining
dataset makes from one patch (their middle slices).

    python tools/demo_figure.py --data_root demo_data/DeepLesion --out docs/demo.png
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw

from dataset import SSLDataset, ViewConfig

TILE = 192


def window(hu: np.ndarray, level: float = 40, width: float = 400) -> np.ndarray:
    return (np.clip((hu - level + width / 2) / width, 0, 1) * 255).astype(np.uint8)


def tile(arr: np.ndarray, caption: str) -> Image.Image:
    img = Image.fromarray(arr).resize((TILE, TILE), Image.BILINEAR).convert("RGB")
    ImageDraw.Draw(img).text((4, 4), caption, fill=(255, 220, 0))
    return img


def main() -> None:
    parser = argparse.ArgumentParser("demo figure")
    parser.add_argument("--data_root", default="demo_data/DeepLesion")
    parser.add_argument("--out", default="docs/demo.png")
    parser.add_argument("--seed", default=0, type=int)
    args = parser.parse_args()

    png_root = os.path.join(args.data_root, "Images_png")
    top = []
    for folder in sorted(os.listdir(png_root))[:4]:
        files = sorted(os.listdir(os.path.join(png_root, folder)))
        name = files[len(files) // 2]
        hu = np.asarray(Image.open(os.path.join(png_root, folder, name))).astype(np.int32) - 32768
        top.append(tile(window(hu), f"{folder}/{name}"))

    ds = SSLDataset(args.data_root, "SSL_data_deeplesion.txt", ViewConfig(local_crops_number=2), seed=args.seed)
    views, _ = ds[(len(ds) // 2, 0)]
    bottom = []
    for k, v in enumerate(views):
        mid = v[0, v.shape[1] // 2].numpy()  # augmented intensities: window each view on its own range
        lo, hi = np.percentile(mid, [1, 99])
        scaled = (np.clip((mid - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
        bottom.append(tile(scaled, ("global" if k < 2 else "local") + f" view {k}, middle slice"))

    cols = max(len(top), len(bottom))
    canvas = Image.new("RGB", (cols * TILE, 2 * TILE), (0, 0, 0))
    for row, tiles in enumerate((top, bottom)):
        for c, t in enumerate(tiles):
            canvas.paste(t, (c * TILE, row * TILE))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    canvas.save(args.out)
    print(
        f"figure: {args.out} (top: generated slices, W400/L40; bottom: augmented pretraining views, 1-99th percentile window, of {os.path.basename(ds.paths[len(ds) // 2])})"
    )


if __name__ == "__main__":
    main()
