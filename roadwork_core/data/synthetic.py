"""Procedurally drawn street scenes for a roadwork / no-roadwork demo drop.

A scene is planned first (every random choice made, as a list of draw calls with their geometry) and
rendered second, so the same plan can be rendered with and without its roadwork cues; that is how
the tests prove that a positive really shows its cues.

Geometry: a road in one-point perspective. `s` in (0, 1] is the depth scale of a ground point
(0 at the horizon, 1 at the bottom edge); an object standing there is `s * H` pixels per unit height.
`u` is the lateral position in road half-widths (|u| <= 1 on the road, up to 1.4 on the pavement).

Roadwork cues (positives): traffic cones, striped barriers, ROAD WORK signs, workers in hi-vis vests,
construction vehicles, some of them small and off-centre. Hard negatives carry orange things that
are not roadwork: orange cars, bins, storefront awnings, people in orange. Cues are drawn after the
rest of the scene, so a positive's cue is never fully hidden behind a car (that would be label noise).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from roadwork_core.io import atomic_dir, atomic_write_text

TIMES_OF_DAY = ("day", "dusk", "night")
WEATHERS = ("clear", "rain", "fog", "snow")
SCENES = ("urban", "suburban", "highway")
CUE_KINDS = ("cone", "barrier", "sign", "worker", "construction_vehicle")
HARD_NEGATIVE_KINDS = ("orange_car", "orange_bin", "orange_storefront", "orange_person")

# (width, height) with sampling weights: mostly landscape dashcam / street-view frames, some portrait.
SIZES = (
    (320, 240),
    (480, 360),
    (640, 480),
    (640, 360),
    (800, 600),
    (960, 540),
    (1280, 720),
    (360, 480),
    (480, 640),
)
SIZE_WEIGHTS = (0.10, 0.16, 0.20, 0.14, 0.10, 0.10, 0.06, 0.07, 0.07)

SKY = {  # time of day -> (zenith, horizon) RGB
    "day": ((70, 130, 210), (185, 215, 240)),
    "dusk": ((60, 50, 110), (250, 150, 90)),
    "night": ((5, 8, 25), (30, 35, 60)),
}
CAR_COLOURS = (
    (235, 235, 235),
    (25, 25, 28),
    (160, 165, 170),
    (30, 50, 110),
    (150, 20, 25),
    (40, 90, 60),
    (90, 90, 95),
)
CLOTHES = ((40, 40, 60), (90, 30, 30), (30, 70, 120), (200, 200, 200), (60, 60, 60), (120, 90, 60))
SKIN = ((240, 200, 170), (200, 150, 110), (140, 95, 60), (90, 60, 40))
ORANGE = (255, 110, 0)
HIVIS = ((205, 255, 0), (255, 120, 0))
WHITE, BLACK = (245, 245, 245), (15, 15, 15)

Box = tuple[int, int, int, int]
DrawFn = Callable[[ImageDraw.ImageDraw], None]


@dataclass(frozen=True)
class CueBox:
    kind: str  # one of CUE_KINDS
    box: Box  # (x0, y0, x1, y1) pixels, inside the image, x1 > x0 and y1 > y0


@dataclass
class Scene:
    image: Image.Image
    label: int  # 1 = roadwork
    metadata: dict[str, str]  # time_of_day, weather, scene
    cues: list[CueBox] = field(default_factory=list)


@dataclass
class ScenePlan:
    """Every random choice of a scene; `render_scene` turns it into pixels without further randomness."""

    size: tuple[int, int]
    label: int
    metadata: dict[str, str]
    horizon: int
    background: list[DrawFn]  # ground, road, buildings, objects: far to near
    emissive: list[DrawFn]  # lights drawn after the night / dusk grade
    cues: list[tuple[CueBox, DrawFn]]
    weather_seed: int


# ---------------------------------------------------------------------------------------------
# Planning


MIN_SCENE_SIDE = 64  # below this the far cues are under a pixel


def _scaled(w: int, h: int, scale: float) -> tuple[int, int]:
    if not scale > 0:
        raise ValueError(f"scale={scale} must be > 0 (1 draws the scenes at their full size)")
    sw, sh = round(w * scale), round(h * scale)
    if min(sw, sh) < MIN_SCENE_SIDE:
        raise ValueError(
            f"scale={scale} draws a {w}x{h} scene at {sw}x{sh}, under the {MIN_SCENE_SIDE} px this generator "
            f"draws cues at; use a scale of at least {MIN_SCENE_SIDE / min(w, h):.2f}"
        )
    return sw, sh


class _Road:
    def __init__(self, rng: np.random.Generator, w: int, h: int):
        self.w, self.h = w, h
        self.horizon = int(h * rng.uniform(0.34, 0.5))
        self.vx = w / 2 + rng.uniform(-0.12, 0.12) * w  # vanishing point x
        self.half_bottom = w * rng.uniform(0.45, 0.8)  # road half-width at the bottom edge

    def y(self, s: float) -> float:
        return self.horizon + s * (self.h - self.horizon)

    def x(self, s: float, u: float) -> float:
        return self.vx + u * self.half_bottom * s


def plan_scene(
    rng: np.random.Generator,
    *,
    positive: bool,
    hard_negative: bool = False,
    size: tuple[int, int] | None = None,
    scale: float = 1.0,
) -> ScenePlan:
    """Every random choice of one scene. `size` fixes (width, height), else it is drawn from SIZES;
    `scale` multiplies it (the same scene, drawn smaller: the random choices do not depend on it)."""
    w, h = size if size is not None else SIZES[rng.choice(len(SIZES), p=SIZE_WEIGHTS)]
    w, h = _scaled(w, h, scale)
    meta = {
        "time_of_day": str(rng.choice(TIMES_OF_DAY, p=(0.55, 0.2, 0.25))),
        "weather": str(rng.choice(WEATHERS, p=(0.55, 0.2, 0.13, 0.12))),
        "scene": str(rng.choice(SCENES, p=(0.45, 0.35, 0.2))),
    }
    road = _Road(rng, w, h)
    background: list[DrawFn] = [_ground_fn(road, meta)]
    emissive: list[DrawFn] = []
    _plan_buildings(rng, road, meta, background, emissive, orange_awning=hard_negative and rng.random() < 0.5)

    objects: list[tuple[float, DrawFn]] = []
    n_cars = {"urban": 3, "suburban": 2, "highway": 4}[meta["scene"]]
    for _ in range(rng.integers(0, n_cars + 1)):
        s, u = rng.uniform(0.08, 0.85), rng.uniform(-0.8, 0.8)
        objects.append((s, _car_fn(road, s, u, CAR_COLOURS[rng.integers(len(CAR_COLOURS))], meta, emissive)))
    if meta["scene"] != "highway":
        for _ in range(rng.integers(0, 4)):
            s, u = rng.uniform(0.1, 0.9), rng.choice((-1, 1)) * rng.uniform(1.05, 1.35)
            clothes = CLOTHES[rng.integers(len(CLOTHES))]
            objects.append((s, _person_fn(road, s, u, clothes, SKIN[rng.integers(len(SKIN))], None)))
    for _ in range(rng.integers(0, {"urban": 3, "suburban": 5, "highway": 6}[meta["scene"]])):
        s, u = rng.uniform(0.05, 0.9), rng.choice((-1, 1)) * rng.uniform(1.4, 2.2)
        objects.append((s, _tree_fn(road, s, u, rng.uniform(0.6, 1.1))))

    if hard_negative or (positive and rng.random() < 0.15):  # orange must not be a shortcut for roadwork
        for _ in range(rng.integers(1, 4)):
            objects.append(_hard_negative(rng, road, str(rng.choice(HARD_NEGATIVE_KINDS)), meta, emissive))
    objects.sort(key=lambda o: o[0])  # far to near
    background.extend(fn for _, fn in objects)

    cues = _plan_cues(rng, road) if positive else []
    return ScenePlan(
        size=(w, h),
        label=int(positive),
        metadata=meta,
        horizon=road.horizon,
        background=background,
        emissive=emissive,
        cues=cues,
        weather_seed=int(rng.integers(2**31)),
    )


def _ground_fn(road: _Road, meta: dict[str, str]) -> DrawFn:
    w, h, hz = road.w, road.h, road.horizon
    verge = {"urban": (120, 120, 115), "suburban": (80, 130, 60), "highway": (100, 130, 70)}[meta["scene"]]
    if meta["weather"] == "snow":
        verge = (225, 228, 235)

    def quad(u0: float, u1: float) -> list[tuple[float, float]]:
        return [(road.x(0, u0), hz), (road.x(0, u1), hz), (road.x(1.0, u1), h), (road.x(1.0, u0), h)]

    def draw(d: ImageDraw.ImageDraw) -> None:
        d.rectangle((0, hz, w, h), fill=verge)
        if meta["scene"] != "highway":
            d.polygon(quad(-1.4, 1.4), fill=(150, 150, 148))  # pavement
        d.polygon(quad(-1.0, 1.0), fill=(62, 62, 66))  # asphalt
        for u in (-0.97, 0.97):  # solid edge lines
            d.polygon(quad(u - 0.02, u + 0.02), fill=(220, 220, 220))
        lanes = (0.0,) if meta["scene"] != "highway" else (-0.33, 0.33)
        colour = (230, 200, 40) if meta["scene"] == "suburban" else (230, 230, 230)
        for u in lanes:  # dashes evenly spaced in distance z = 1/s, so they shrink toward the horizon
            for m in range(24):
                z0, z1 = 1 + 1.6 * m, 1.8 + 1.6 * m
                s0, s1 = 1 / z0, 1 / z1
                d.polygon(
                    [(road.x(s1, u - 0.02), road.y(s1)), (road.x(s1, u + 0.02), road.y(s1)),
                     (road.x(s0, u + 0.02), road.y(s0)), (road.x(s0, u - 0.02), road.y(s0))],
                    fill=colour,
                )  # fmt: skip

    return draw


def _plan_buildings(
    rng: np.random.Generator,
    road: _Road,
    meta: dict[str, str],
    out: list[DrawFn],
    emissive: list[DrawFn],
    *,
    orange_awning: bool,
) -> None:
    scene = meta["scene"]
    if scene == "highway":
        return
    night = meta["time_of_day"] != "day"
    for side in (-1, 1):
        z = 1.0
        facades = []
        while z < 14:
            span = rng.uniform(1.0, 3.0)
            gap = rng.uniform(0.5, 2.5) if scene == "suburban" else 0.0
            z0, z1 = z + gap, z + gap + span
            z = z1
            height = rng.uniform(0.5, 1.6) if scene == "urban" else rng.uniform(0.25, 0.45)
            colour = tuple(int(c) for c in rng.integers(70, 200, 3))
            facades.append((z0, z1, height, colour))
        awning_at = int(rng.integers(len(facades))) if orange_awning and side == 1 else -1
        for i, (z0, z1, height, colour) in enumerate(reversed(facades)):  # far to near
            lit = rng.random(12) < 0.4 if night else np.zeros(12, bool)
            awning = ORANGE if len(facades) - 1 - i == awning_at else None
            out.append(_facade_fn(road, side, 1 / z1, 1 / z0, height, colour, awning, None))
            if night:
                emissive.append(_facade_fn(road, side, 1 / z1, 1 / z0, height, colour, None, lit))


def _facade_fn(
    road: _Road,
    side: int,
    s_far: float,
    s_near: float,
    height: float,
    colour: tuple[int, ...],
    awning: tuple[int, int, int] | None,
    lit: np.ndarray | None,
) -> DrawFn:
    u = side * 1.5

    def at(a: float, v: float) -> tuple[float, float]:  # a in [0,1] far->near, v in [0,1] up the wall
        s = s_far + a * (s_near - s_far)
        return road.x(s, u), road.y(s) - v * height * s * road.h

    def quad(a0: float, a1: float, v0: float, v1: float) -> list[tuple[float, float]]:
        return [at(a0, v0), at(a1, v0), at(a1, v1), at(a0, v1)]

    def draw(d: ImageDraw.ImageDraw) -> None:
        if lit is None:
            d.polygon(quad(0, 1, 0, 1), fill=colour, outline=tuple(int(c * 0.7) for c in colour))
        for k in range(12):  # a 3 x 4 grid of windows; at night only the lit ones, drawn after the grade
            r, c = divmod(k, 4)
            if lit is not None and not lit[k]:
                continue
            fill = (255, 220, 140) if lit is not None else (60, 80, 100)
            d.polygon(quad(0.08 + c * 0.23, 0.23 + c * 0.23, 0.45 + r * 0.17, 0.56 + r * 0.17), fill=fill)
        if awning is not None:
            d.polygon(quad(0.05, 0.95, 0.22, 0.32), fill=awning)

    return draw


def _standing_box(road: _Road, s: float, u: float, height: float, width: float) -> Box:
    """Box of an object of `height` x `width` (in units of s*H) standing at (s, u), kept inside the image."""
    px = s * road.h
    hpx, wpx = max(height * px, 8.0), max(width * px, 5.0)
    x = min(max(road.x(s, u), wpx / 2 + 1), road.w - wpx / 2 - 1)
    y = min(road.y(s), road.h - 1)
    return int(x - wpx / 2), int(max(y - hpx, 0)), int(x + wpx / 2), int(y)


def _car_fn(road: _Road, s: float, u: float, colour, meta: dict[str, str], emissive: list[DrawFn]) -> DrawFn:
    x0, y0, x1, y1 = _standing_box(road, s, u, 0.28, 0.55)
    hgt = y1 - y0

    def draw(d: ImageDraw.ImageDraw) -> None:
        d.rectangle((x0, y0 + 0.45 * hgt, x1, y1 - 0.12 * hgt), fill=colour)
        inset = 0.18 * (x1 - x0)
        d.polygon([(x0 + inset, y0 + 0.45 * hgt), (x0 + inset * 1.4, y0), (x1 - inset * 1.4, y0), (x1 - inset, y0 + 0.45 * hgt)], fill=colour)  # fmt: skip
        d.polygon([(x0 + inset * 1.3, y0 + 0.42 * hgt), (x0 + inset * 1.6, y0 + 0.08 * hgt), (x1 - inset * 1.6, y0 + 0.08 * hgt), (x1 - inset * 1.3, y0 + 0.42 * hgt)], fill=(70, 90, 110))  # fmt: skip
        r = 0.14 * hgt
        for wx in (x0 + 0.2 * (x1 - x0), x1 - 0.2 * (x1 - x0)):
            d.ellipse((wx - r, y1 - 2 * r, wx + r, y1), fill=BLACK)

    if meta["time_of_day"] != "day":

        def lights(d: ImageDraw.ImageDraw) -> None:  # fmt: skip
            r = max(1.0, 0.06 * hgt)
            for lx in (x0 + 0.12 * (x1 - x0), x1 - 0.12 * (x1 - x0)):
                d.ellipse((lx - r, y0 + 0.6 * hgt - r, lx + r, y0 + 0.6 * hgt + r), fill=(255, 60, 50))

        emissive.append(lights)
    return draw


def _person_fn(road: _Road, s: float, u: float, clothes, skin, vest: tuple[int, int, int] | None) -> DrawFn:
    x0, y0, x1, y1 = _standing_box(road, s, u, 0.5, 0.16)
    hgt, wid = y1 - y0, x1 - x0

    def draw(d: ImageDraw.ImageDraw) -> None:
        cx = (x0 + x1) / 2
        d.rectangle((cx - 0.3 * wid, y0 + 0.55 * hgt, cx + 0.3 * wid, y1), fill=(35, 35, 45))  # legs
        d.rectangle((x0, y0 + 0.17 * hgt, x1, y0 + 0.58 * hgt), fill=vest or clothes)  # torso
        if vest is not None:  # retro-reflective bands
            for v in (0.3, 0.45):
                d.rectangle((x0, y0 + v * hgt, x1, y0 + (v + 0.04) * hgt), fill=(225, 225, 225))
        d.ellipse((cx - 0.3 * wid, y0 + 0.04 * hgt, cx + 0.3 * wid, y0 + 0.17 * hgt), fill=skin)
        if vest is not None:  # hard hat
            d.chord((cx - 0.38 * wid, y0, cx + 0.38 * wid, y0 + 0.12 * hgt), 180, 360, fill=(250, 215, 0))

    return draw


def _tree_fn(road: _Road, s: float, u: float, scale: float) -> DrawFn:
    x0, y0, x1, y1 = _standing_box(road, s, u, 0.9 * scale, 0.45 * scale)
    hgt, wid = y1 - y0, x1 - x0

    def draw(d: ImageDraw.ImageDraw) -> None:
        cx = (x0 + x1) / 2
        d.rectangle((cx - 0.06 * wid, y0 + 0.5 * hgt, cx + 0.06 * wid, y1), fill=(90, 60, 35))
        d.ellipse((x0, y0, x1, y0 + 0.65 * hgt), fill=(40, 100, 45))

    return draw


def _bin_fn(road: _Road, s: float, u: float, colour) -> DrawFn:
    x0, y0, x1, y1 = _standing_box(road, s, u, 0.14, 0.09)

    def draw(d: ImageDraw.ImageDraw) -> None:
        d.rectangle((x0, y0 + 0.15 * (y1 - y0), x1, y1), fill=colour)
        d.rectangle((x0 - 1, y0, x1 + 1, y0 + 0.15 * (y1 - y0)), fill=tuple(int(c * 0.7) for c in colour))

    return draw


def _hard_negative(
    rng: np.random.Generator, road: _Road, kind: str, meta: dict[str, str], emissive: list[DrawFn]
) -> tuple[float, DrawFn]:
    s = rng.uniform(0.12, 0.9)
    if kind == "orange_car":
        return s, _car_fn(road, s, rng.uniform(-0.8, 0.8), ORANGE, meta, emissive)
    if kind == "orange_person":
        return s, _person_fn(road, s, rng.choice((-1, 1)) * rng.uniform(1.05, 1.35), ORANGE, SKIN[0], None)
    # bins, and storefronts on highways where there are no facades: an orange kerbside object
    return s, _bin_fn(
        road, s, rng.choice((-1, 1)) * rng.uniform(1.05, 1.35), (255, 120 + int(rng.integers(30)), 0)
    )


# ---------------------------------------------------------------------------------------------
# Roadwork cues


def _plan_cues(rng: np.random.Generator, road: _Road) -> list[tuple[CueBox, DrawFn]]:
    cues: list[tuple[CueBox, DrawFn]] = []
    for _ in range(rng.choice((1, 2, 3, 4), p=(0.4, 0.3, 0.2, 0.1))):
        kind = str(rng.choice(CUE_KINDS, p=(0.3, 0.2, 0.2, 0.15, 0.15)))
        small = rng.random() < 0.35  # small and off-centre: only a tile at full resolution shows it
        s = rng.uniform(0.06, 0.2) if small else rng.uniform(0.25, 0.95)
        u = rng.choice((-1, 1)) * (rng.uniform(0.9, 1.5) if small else rng.uniform(0.2, 1.2))
        if kind == "cone":
            for i in range(rng.integers(1, 5)):  # a row of cones along the lane
                si = s / (1 + 0.35 * i)
                box = _standing_box(road, si, u, 0.14, 0.08)
                cues.append((CueBox("cone", box), _cone_fn(box)))
        elif kind == "barrier":
            box = _standing_box(road, s, u, 0.16, rng.uniform(0.35, 0.6))
            red = bool(rng.random() < 0.5)
            cues.append((CueBox("barrier", box), _barrier_fn(box, (210, 20, 20) if red else ORANGE)))
        elif kind == "sign":
            box = _standing_box(road, s, u, 0.42, 0.22)
            cues.append((CueBox("sign", box), _sign_fn(box, us_style=bool(rng.random() < 0.6))))
        elif kind == "worker":
            box = _standing_box(road, s, u, 0.5, 0.16)
            vest = HIVIS[rng.integers(2)]
            cues.append(
                (CueBox("worker", box), _person_fn(road, s, u, vest, SKIN[rng.integers(len(SKIN))], vest))
            )
        else:
            box = _standing_box(road, s, u, 0.45, 0.75)
            cues.append(
                (CueBox("construction_vehicle", box), _excavator_fn(box, flip=bool(rng.random() < 0.5)))
            )
    cues.sort(key=lambda c: c[0].box[3])  # far (higher up) to near
    return cues


def _cone_fn(box: Box) -> DrawFn:
    x0, y0, x1, y1 = box
    hgt, cx = y1 - y0, (x0 + x1) / 2

    def half(v: float) -> float:  # half-width of the cone body at relative height v (0 bottom, 1 top)
        return (x1 - x0) * 0.42 * (1 - v) + 0.5

    def draw(d: ImageDraw.ImageDraw) -> None:
        base = y1 - 0.12 * hgt
        d.rectangle((x0, base, x1, y1), fill=(230, 90, 0))
        d.polygon([(cx - half(0), base), (cx, y0), (cx + half(0), base)], fill=ORANGE)
        for v0, v1 in ((0.3, 0.42), (0.58, 0.68)):
            ya, yb = base - v0 * (base - y0), base - v1 * (base - y0)
            d.polygon([(cx - half(v0), ya), (cx + half(v0), ya), (cx + half(v1), yb), (cx - half(v1), yb)], fill=WHITE)  # fmt: skip

    return draw


def _barrier_fn(box: Box, stripe) -> DrawFn:
    x0, y0, x1, y1 = box
    hgt, wid = y1 - y0, x1 - x0

    def draw(d: ImageDraw.ImageDraw) -> None:
        top, bot = y0, y0 + 0.5 * hgt
        for lx in (x0 + 0.1 * wid, x1 - 0.1 * wid):  # legs
            d.rectangle((lx - max(1, 0.03 * wid), bot, lx + max(1, 0.03 * wid), y1), fill=(90, 90, 90))
        d.rectangle((x0, top, x1, bot), fill=WHITE)
        sw = max(4.0, hgt * 0.5)  # stripe period
        slant = 0.4 * sw
        k = x0 - sw
        while k < x1:
            pts = [(k, top), (k + sw / 2, top), (k + sw / 2 - slant, bot), (k - slant, bot)]
            d.polygon([(min(max(px, x0), x1), py) for px, py in pts], fill=stripe)
            k += sw
        d.rectangle((x0, top, x1, bot), outline=(40, 40, 40))

    return draw


@lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _sign_fn(box: Box, *, us_style: bool) -> DrawFn:
    x0, y0, x1, y1 = box
    wid = x1 - x0
    cx, cy = (x0 + x1) / 2, y0 + wid / 2

    def draw(d: ImageDraw.ImageDraw) -> None:
        d.rectangle((cx - max(1, 0.05 * wid), cy, cx + max(1, 0.05 * wid), y1), fill=(110, 110, 110))  # post
        r = wid / 2
        if us_style:  # orange diamond, black border, "ROAD WORK"
            d.polygon(
                [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=(255, 140, 0), outline=BLACK
            )
            size = int(r * 0.42)
            if size >= 6:
                d.text((cx, cy - size * 0.55), "ROAD", fill=BLACK, font=_font(size), anchor="mm")
                d.text((cx, cy + size * 0.55), "WORK", fill=BLACK, font=_font(size), anchor="mm")
            else:
                d.rectangle((cx - 0.3 * r, cy - 0.1 * r, cx + 0.3 * r, cy + 0.1 * r), fill=BLACK)
        else:  # European: red-bordered white triangle with a digging worker glyph
            d.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], fill=(200, 20, 20))
            q = 0.65 * r
            d.polygon([(cx, cy - q + 0.15 * r), (cx + q, cy + 0.65 * r), (cx - q, cy + 0.65 * r)], fill=WHITE)
            d.line(
                (cx - 0.25 * r, cy + 0.55 * r, cx + 0.05 * r, cy - 0.05 * r),
                fill=BLACK,
                width=max(1, int(0.1 * r)),
            )
            d.ellipse((cx - 0.1 * r, cy - 0.25 * r, cx + 0.1 * r, cy - 0.05 * r), fill=BLACK)
            d.line(
                (cx + 0.3 * r, cy + 0.2 * r, cx + 0.1 * r, cy + 0.55 * r),
                fill=BLACK,
                width=max(1, int(0.08 * r)),
            )

    return draw


def _excavator_fn(box: Box, *, flip: bool) -> DrawFn:
    x0, y0, x1, y1 = box
    hgt, wid = y1 - y0, x1 - x0

    def X(a: float) -> float:  # relative x, mirrored when the arm points left
        return x0 + (1 - a if flip else a) * wid

    def draw(d: ImageDraw.ImageDraw) -> None:
        yellow = (240, 185, 0)
        d.rounded_rectangle((x0, y1 - 0.18 * hgt, x1, y1), radius=max(1, int(0.08 * hgt)), fill=(45, 45, 45))
        d.rectangle(
            (min(X(0.05), X(0.6)), y1 - 0.45 * hgt, max(X(0.05), X(0.6)), y1 - 0.18 * hgt), fill=yellow
        )
        d.rectangle(
            (min(X(0.1), X(0.38)), y1 - 0.78 * hgt, max(X(0.1), X(0.38)), y1 - 0.45 * hgt), fill=yellow
        )
        d.rectangle((min(X(0.15), X(0.33)), y1 - 0.72 * hgt, max(X(0.15), X(0.33)), y1 - 0.52 * hgt), fill=(80, 110, 130))  # fmt: skip
        arm = max(2, int(0.07 * hgt))
        d.line(
            (X(0.5), y1 - 0.4 * hgt, X(0.78), y0 + 0.02 * hgt, X(0.97), y1 - 0.45 * hgt),
            fill=yellow,
            width=arm,
        )
        d.polygon(
            [(X(0.88), y1 - 0.45 * hgt), (X(1.0), y1 - 0.45 * hgt), (X(0.96), y1 - 0.25 * hgt)],
            fill=(60, 60, 60),
        )
        beacon = max(1.0, 0.04 * hgt)
        d.ellipse(
            (X(0.24) - beacon, y1 - 0.78 * hgt - 2 * beacon, X(0.24) + beacon, y1 - 0.78 * hgt), fill=ORANGE
        )

    return draw


# ---------------------------------------------------------------------------------------------
# Rendering


def render_scene(plan: ScenePlan, *, cues: bool = True) -> Image.Image:
    """Pixels of `plan`; `cues=False` renders the identical scene without its roadwork cues."""
    w, h = plan.size
    meta = plan.metadata
    zenith, horizon_colour = SKY[meta["time_of_day"]]
    t = np.linspace(0.0, 1.0, max(plan.horizon, 1))[:, None]  # (H_sky, 1)
    sky = (np.array(zenith) * (1 - t) + np.array(horizon_colour) * t).astype(np.uint8)  # (H_sky, 3)
    img = Image.new("RGB", (w, h))
    img.paste(Image.fromarray(sky[:, None, :]).resize((w, max(plan.horizon, 1))), (0, 0))
    d = ImageDraw.Draw(img)
    for fn in plan.background:
        fn(d)
    if cues:
        for _, fn in plan.cues:
            fn(d)

    tod = meta["time_of_day"]
    if tod == "night":
        img = Image.blend(img, Image.new("RGB", (w, h), (8, 12, 35)), 0.62)
    elif tod == "dusk":
        img = Image.blend(img, Image.new("RGB", (w, h), (120, 60, 70)), 0.28)
    d = ImageDraw.Draw(img)
    for fn in plan.emissive:
        fn(d)
    return _weather(img, meta["weather"], plan.horizon, np.random.default_rng(plan.weather_seed))


def _weather(img: Image.Image, weather: str, horizon: int, rng: np.random.Generator) -> Image.Image:
    w, h = img.size
    if weather == "fog":
        # haze thickest at the horizon, thinning toward the camera: alpha per row (H, 1) -> (H, W) mask
        rows = np.arange(h, dtype=np.float32)
        alpha = rng.uniform(0.45, 0.75) * np.exp(-np.abs(rows - horizon) / (0.45 * h))
        mask = Image.fromarray((alpha * 255).astype(np.uint8)[:, None]).resize((w, h))
        return Image.composite(Image.new("RGB", (w, h), (200, 202, 205)), img, mask)
    d = ImageDraw.Draw(img)
    if weather == "rain":
        n = int(w * h / 1500)
        xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
        length, slant = rng.uniform(0.02, 0.05) * h, rng.uniform(-0.3, 0.3)
        for x, y in zip(xs, ys, strict=True):
            d.line((x, y, x + slant * length, y + length), fill=(175, 180, 190), width=1)
    elif weather == "snow":
        n = int(w * h / 900)
        xs, ys, rs = rng.uniform(0, w, n), rng.uniform(0, h, n), rng.uniform(0.6, 2.2, n)
        for x, y, r in zip(xs, ys, rs, strict=True):
            d.ellipse((x - r, y - r, x + r, y + r), fill=(240, 240, 245))
    return img


def draw_scene(
    rng: np.random.Generator,
    *,
    positive: bool,
    hard_negative: bool = False,
    size: tuple[int, int] | None = None,
    scale: float = 1.0,
) -> Scene:
    """One street scene. Positives carry >= 1 roadwork cue (boxes in `cues`); negatives carry none."""
    plan = plan_scene(
        rng, positive=positive, hard_negative=hard_negative and not positive, size=size, scale=scale
    )
    return Scene(
        image=render_scene(plan),
        label=plan.label,
        metadata=dict(plan.metadata),
        cues=[c for c, _ in plan.cues],
    )


# ---------------------------------------------------------------------------------------------
# Demo drop


MASK_COLUMNS = ("mask_x", "mask_y")  # the validator's "mask centre" of the roadwork object, in pixels


def mask_point_columns(cues: list[CueBox]) -> dict[str, str]:
    """labels.csv cells for the centre of the largest cue box ("" for both when there is none)."""
    if not cues:
        return dict.fromkeys(MASK_COLUMNS, "")
    x0, y0, x1, y1 = max(cues, key=lambda c: (c.box[2] - c.box[0]) * (c.box[3] - c.box[1])).box
    return {"mask_x": str((x0 + x1) // 2), "mask_y": str((y0 + y1) // 2)}


def _image_rng(seed: int, version: str, stream: str, index: int) -> np.random.Generator:
    # The version is hashed in, so two drops made with the same seed hold different images.
    tag = int.from_bytes(hashlib.sha256(f"{version}/{stream}".encode()).digest()[:8], "little")
    return np.random.default_rng([seed, tag, index])


def _jpeg_bytes(img: Image.Image, rng: np.random.Generator) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(rng.integers(60, 96)))
    return buf.getvalue()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _draw_labelled(
    seed: int, version: str, i: int, positive_rate: float, hard_negative_rate: float, scale: float
):
    """Labelled scene `i` of a drop -> (file name, JPEG bytes, labels.csv row); its own RNG stream."""
    rng = _image_rng(seed, version, "labelled", i)
    positive = bool(rng.random() < positive_rate)
    scene = draw_scene(
        rng, positive=positive, hard_negative=bool(rng.random() < hard_negative_rate), scale=scale
    )
    name = f"images/{i:06d}.jpg"
    row = {"file": name, "label": scene.label, **scene.metadata, **mask_point_columns(scene.cues)}
    return name, _jpeg_bytes(scene.image, rng), row


def _draw_unlabelled(
    seed: int, version: str, i: int, positive_rate: float, hard_negative_rate: float, scale: float
):
    rng = _image_rng(seed, version, "unlabelled", i)
    scene = draw_scene(rng, positive=bool(rng.random() < positive_rate), hard_negative=True, scale=scale)
    return f"unlabelled/{i:06d}.jpg", _jpeg_bytes(scene.image, rng), None


def _drawn(draw: Callable, n: int, args: tuple, workers: int):
    """draw(*args[:2], i, *args[2:]) for i in 0..n-1, in order; in `workers` processes when > 1 (every
    scene has its own RNG stream, so the images are the same bytes whatever the number of workers)."""
    jobs = [(args[0], args[1], i, *args[2:]) for i in range(n)]
    if workers <= 1 or n < 2:
        yield from (draw(*job) for job in jobs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork: the children inherit the loaded modules instead of importing them again (Linux)
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        yield from pool.map(draw, *zip(*jobs), chunksize=max(1, min(64, n // (4 * workers))))


def make_demo_drop(
    out: Path,
    version: str,
    n: int = 2000,
    seed: int = 0,
    positive_rate: float = 0.5,
    *,
    n_unlabelled: int = 0,
    hard_negative_rate: float = 0.3,
    workers: int = 1,
    scale: float = 1.0,
) -> Path:
    """Write a labels.csv drop of `n` synthetic scenes to `out/version/` and return that folder.

    Layout: `images/<index>.jpg`, `labels.csv` (file, label, time_of_day, weather, scene, mask_x,
    mask_y: the centre of the largest cue box of a positive, blank for a negative), optional
    `unlabelled/<index>.jpg`, and `_READY` last. The drop is built under a temporary name and renamed
    into place, so a crash never leaves a half-written drop under the final name. `workers` > 1 draws
    the scenes in that many processes; the drop is byte for byte the same. `scale` < 1 draws the same
    scenes smaller (0.5: 160x120 to 640x360 instead of 320x240 to 1280x720), for quick drops whose
    images are cheaper to hash, decode and train on.
    """
    if not 0.0 <= positive_rate <= 1.0:
        raise ValueError(f"positive_rate={positive_rate} must be within [0, 1]")
    if n < 1:
        raise ValueError(f"n={n}: a drop needs at least one image")
    if workers < 1:
        raise ValueError(f"workers={workers}: use 1 (this process) or more")
    for w, h in SIZES:
        _scaled(w, h, scale)  # a scale too small for any of the sizes fails here, before any drawing
    from roadwork_core.data.drops import version_name_problem

    if (problem := version_name_problem(version)) is not None:  # '' made the inbox itself the drop
        raise ValueError(f"version {version!r} {problem}; name the drop like v0001 or 2026-11-23")
    drop = Path(out) / version
    rows = []
    args = (seed, version, positive_rate, hard_negative_rate, scale)
    # Writing (and fsyncing) happens in threads so that disk waits overlap with drawing.
    with atomic_dir(drop) as tmp, ThreadPoolExecutor(max_workers=4) as writer:
        (tmp / "images").mkdir()
        if n_unlabelled:
            (tmp / "unlabelled").mkdir()
        writes = []
        for name, data, row in _drawn(_draw_labelled, n, args, workers):
            writes.append(writer.submit(_write_file, tmp / name, data))
            rows.append(row)
        for name, data, _ in _drawn(_draw_unlabelled, n_unlabelled, args, workers):
            writes.append(writer.submit(_write_file, tmp / name, data))
        for done in writes:
            done.result()  # re-raises a failed write (disk full, permissions) before _READY exists
        table = pd.DataFrame(
            rows, columns=["file", "label", "time_of_day", "weather", "scene", *MASK_COLUMNS]
        )
        atomic_write_text(tmp / "labels.csv", table.to_csv(index=False))
        atomic_write_text(tmp / "_READY", f"{version}\n")
    return drop


DETECTION_FORMATS = ("yolo", "coco")


def make_detection_drop(
    out: Path,
    version: str,
    n: int = 200,
    seed: int = 0,
    fmt: str = "yolo",
    positive_rate: float = 0.5,
    *,
    hard_negative_rate: float = 0.3,
) -> Path:
    """Write a drop of `n` synthetic scenes with detection labels (the cue boxes) to `out/version/`.

    `yolo`: `images/<index>.jpg`, `labels/<index>.txt` (`class cx cy w h`, normalized; a negative's
    file is empty) and `classes.txt` (CUE_KINDS). `coco`: `images/<index>.jpg` and
    `annotations/instances.json` (`bbox` = [x, y, w, h] in pixels, categories = CUE_KINDS, ids from 1).
    `_READY` last; built under a temporary name like `make_demo_drop`.
    """
    if fmt not in DETECTION_FORMATS:
        raise ValueError(f"fmt={fmt!r} is not a detection format; use one of {', '.join(DETECTION_FORMATS)}")
    if n < 1:
        raise ValueError(f"n={n}: a drop needs at least one image")
    drop = Path(out) / version
    images, annotations = [], []
    with atomic_dir(drop) as tmp:
        (tmp / "images").mkdir()
        (tmp / ("labels" if fmt == "yolo" else "annotations")).mkdir()
        for i in range(n):
            rng = _image_rng(seed, version, "detection", i)  # both formats: the same scenes
            positive = bool(rng.random() < positive_rate)
            scene = draw_scene(rng, positive=positive, hard_negative=bool(rng.random() < hard_negative_rate))
            w, h = scene.image.size
            _write_file(tmp / f"images/{i:06d}.jpg", _jpeg_bytes(scene.image, rng))
            if fmt == "yolo":
                lines = [
                    f"{CUE_KINDS.index(c.kind)} {(c.box[0] + c.box[2]) / 2 / w:.6f} {(c.box[1] + c.box[3]) / 2 / h:.6f} "
                    f"{(c.box[2] - c.box[0]) / w:.6f} {(c.box[3] - c.box[1]) / h:.6f}"
                    for c in scene.cues
                ]
                atomic_write_text(tmp / f"labels/{i:06d}.txt", "".join(line + "\n" for line in lines))
            else:
                images.append({"id": i + 1, "file_name": f"images/{i:06d}.jpg", "width": w, "height": h})
                for c in scene.cues:
                    x0, y0, x1, y1 = c.box
                    annotations.append(
                        {"id": len(annotations) + 1, "image_id": i + 1, "category_id": CUE_KINDS.index(c.kind) + 1,
                         "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
                    )  # fmt: skip
        if fmt == "yolo":
            atomic_write_text(tmp / "classes.txt", "".join(k + "\n" for k in CUE_KINDS))
        else:
            categories = [{"id": k + 1, "name": name} for k, name in enumerate(CUE_KINDS)]
            doc = {"images": images, "annotations": annotations, "categories": categories}
            atomic_write_text(tmp / "annotations/instances.json", json.dumps(doc))
        atomic_write_text(tmp / "_READY", f"{version}\n")
    return drop
