"""Draw workflows/inputs/fortress.png: a procedural ice-fortress scene (our own picture, free to redistribute)."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def draw(size=512, seed=7):
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, size)[:, None]
    sky = np.zeros((size, size, 3))
    sky[..., 0] = 20 + 60 * y
    sky[..., 1] = 30 + 40 * (1 - y)
    sky[..., 2] = 80 + 120 * (1 - y)
    img = Image.fromarray(sky.astype(np.uint8))
    d = ImageDraw.Draw(img)
    # aurora bands
    for k in range(3):
        pts = [(x, int(size * (0.18 + 0.06 * k) + 25 * np.sin(x / 40 + k))) for x in range(0, size + 8, 8)]
        d.line(pts, fill=(60, 220 - 30 * k, 150 + 30 * k), width=6)
    # stars
    for _ in range(80):
        x, yy = rng.integers(0, size), rng.integers(0, size // 2)
        d.point((int(x), int(yy)), fill=(255, 255, 255))
    # mountains
    d.polygon([(0, size * 0.7), (size * 0.2, size * 0.45), (size * 0.4, size * 0.68), (size * 0.65, size * 0.4),
               (size, size * 0.66), (size, size), (0, size)], fill=(170, 190, 215))
    # fortress: wall, towers, crenellations, gate
    base = int(size * 0.78)
    d.rectangle([size * 0.22, size * 0.55, size * 0.78, base], fill=(210, 230, 245), outline=(90, 110, 140), width=3)
    for cx in (0.22, 0.4, 0.6, 0.78):
        x0 = int(size * cx) - 22
        top = int(size * (0.38 if cx in (0.4, 0.6) else 0.45))
        d.rectangle([x0, top, x0 + 44, base], fill=(225, 240, 250), outline=(90, 110, 140), width=3)
        d.polygon([(x0 - 4, top), (x0 + 22, top - 50), (x0 + 48, top)], fill=(180, 210, 235), outline=(90, 110, 140))
        for w in range(3):
            d.rectangle([x0 + 8 + w * 12, top + 20, x0 + 14 + w * 12, top + 34], fill=(255, 220, 140))
    for k in range(14):
        x0 = int(size * 0.22) + k * int(size * 0.04)
        d.rectangle([x0, int(size * 0.53), x0 + 10, int(size * 0.55)], fill=(210, 230, 245), outline=(90, 110, 140))
    d.pieslice([size * 0.45, size * 0.64, size * 0.55, size * 0.86], 180, 360, fill=(60, 70, 100))
    d.rectangle([size * 0.45, size * 0.75, size * 0.55, base], fill=(60, 70, 100))
    # snowy ground and a polar bear-ish silhouette
    d.rectangle([0, base, size, size], fill=(235, 242, 250))
    d.ellipse([size * 0.08, size * 0.84, size * 0.22, size * 0.92], fill=(250, 250, 245), outline=(120, 130, 150), width=2)
    d.ellipse([size * 0.19, size * 0.83, size * 0.25, size * 0.88], fill=(250, 250, 245), outline=(120, 130, 150), width=2)
    return img.filter(ImageFilter.SMOOTH)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "workflows/inputs/fortress.png")
    draw().save(out, optimize=True)
    print(out)
