"""Episodes on film: frames captioned, written as mp4 (PyAV) and as a contact sheet (png)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def caption(frame: np.ndarray, prompt: str, step: int, success: bool) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.fromarray(frame)
    draw = ImageDraw.Draw(img)
    text = f"{prompt}  step {step}" + ("  success" if success else "")
    draw.rectangle([0, 0, img.width, 14], fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(120, 255, 120) if success else (255, 255, 255))
    return np.asarray(img)


def write_video(frames: list[np.ndarray], path: str | os.PathLike, fps: int) -> Path:
    """H.264 mp4 (PyAV), MPEG-4 part 2 where this PyAV build has no H.264 encoder."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        try:
            stream = out.add_stream("libx264", fps, options={"crf": "23", "preset": "veryfast"})
        except Exception:  # noqa: BLE001 - no libx264 in this FFmpeg build
            stream = out.add_stream("mpeg4", fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def contact_sheet(films: list[list[np.ndarray]], out: str | os.PathLike, held: int, columns: int = 6,
                  width: int = 160) -> Path:
    """A png with one row per filmed episode: `columns` frames evenly spaced over the episode (less the `held`
    frames that end each film)."""
    from PIL import Image

    rows = []
    for frames in films:
        last = len(frames) - held
        pick = np.linspace(0, max(0, last), columns).round().astype(int)
        rows.append(np.concatenate([frames[i] for i in pick], axis=1))
    sheet = Image.fromarray(np.concatenate(rows, axis=0))
    sheet = sheet.resize((width * columns, round(sheet.height * width * columns / sheet.width)))
    sheet.save(out)
    return Path(out)
