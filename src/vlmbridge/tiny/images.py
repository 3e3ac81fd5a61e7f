"""Generated pictures for the demo and the tests (no image files in the repository)."""

from __future__ import annotations

from typing import Any

__all__ = ["demo_picture", "noise_picture"]


def demo_picture(width: int = 320, height: int = 240) -> Any:
    """A recognisable scene: sky, ground, a sun, a house. Deterministic."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), (135, 190, 235))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, height * 2 // 3, width, height), fill=(70, 150, 60))
    r = min(width, height) // 8
    draw.ellipse((width - 3 * r, r, width - r, 3 * r), fill=(250, 210, 40))
    bx, by, bw, bh = width // 5, height // 3, width // 3, height // 3
    draw.rectangle((bx, by + bh // 3, bx + bw, by + bh), fill=(180, 60, 50))
    draw.polygon([(bx - 10, by + bh // 3), (bx + bw // 2, by - 10), (bx + bw + 10, by + bh // 3)], fill=(90, 50, 40))
    draw.rectangle((bx + bw // 2 - 10, by + bh - 40, bx + bw // 2 + 10, by + bh), fill=(60, 40, 30))
    return img


def noise_picture(width: int, height: int, seed: int) -> Any:
    """Random RGB noise: two seeds give two different pictures of the same size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
