"""Sample images the demo draws with Pillow: a bar chart, a book cover, and two street scenes."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def bar_chart() -> Image.Image:
    image = Image.new("RGB", (480, 320), "white")
    draw = ImageDraw.Draw(image)
    draw.text((140, 10), "Jobs per day", fill="black", font=_font(24))
    draw.line((40, 290, 460, 290), fill="black", width=2)
    for i, height in enumerate((120, 200, 90, 240, 160)):
        left = 60 + i * 80
        draw.rectangle((left, 290 - height, left + 50, 290), fill=("#4e79a7", "#f28e2b", "#e15759",
                                                                    "#76b7b2", "#59a14f")[i])
        draw.text((left + 10, 295), ("Mon", "Tue", "Wed", "Thu", "Fri")[i], fill="black", font=_font(14))
    return image


def book_cover() -> Image.Image:
    image = Image.new("RGB", (300, 450), "#8b1e3f")
    draw = ImageDraw.Draw(image)
    draw.rectangle((20, 20, 280, 430), outline="#f5e6c8", width=4)
    draw.text((45, 120), "THE QUIET", fill="#f5e6c8", font=_font(36))
    draw.text((45, 165), "QUEUE", fill="#f5e6c8", font=_font(36))
    draw.text((70, 360), "Ada Lovelace", fill="white", font=_font(22))
    return image


def street_scene(night: bool) -> Image.Image:
    sky, road = ("#0b1a3a", "#2b2b2b") if night else ("#87ceeb", "#555555")
    image = Image.new("RGB", (480, 320), sky)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 220, 480, 320), fill=road)
    for x in (20, 150, 300):
        draw.rectangle((x, 90, x + 110, 220), fill="#a0522d" if night else "#cd853f")
        for wx in (x + 15, x + 65):
            draw.rectangle((wx, 120, wx + 25, 150), fill="#ffd700" if night else "#dfefff")
    draw.rectangle((180, 240, 300, 280), fill="#1f4fbf")
    if night:
        draw.ellipse((400, 20, 440, 60), fill="#f0f0d0")
    else:
        draw.ellipse((400, 20, 460, 80), fill="#ffdd33")
    return image


def write_samples(folder: Path) -> dict[str, Path]:
    """Draw the sample images into `folder`; returns their paths by name."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {"bar_chart.png": bar_chart(), "book_cover.png": book_cover(),
              "street_day.png": street_scene(night=False), "street_night.png": street_scene(night=True)}
    paths = {}
    for name, image in images.items():
        image.save(folder / name)
        paths[name] = folder / name
    return paths
