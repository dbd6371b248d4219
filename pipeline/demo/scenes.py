"""Synthetic laryngoscopic images: one drawn larynx per patient, seen through several views.

The larynx is drawn once per patient in scene coordinates (pink mucosa, two pale vocal
cords around the dark glottic gap, a lesion on one or both cords), then every image is a
different view of it: rotation, zoom, shift, lighting, white balance, blur, specular
glints and the endoscope's circular field. What separates the classes is coarse and
global on purpose (the lesion's colour, bulk and how much of the dark gap it fills), since
the pipeline's encoders mean-pool patch features and cannot see fine texture.

Orientation is the endoscopic one: the anterior commissure at the top, the arytenoids at
the bottom, and the patient's left cord on the image's right.

Every image comes with its lesion mask: the lesion's outline as drawn, through the same
view transform and clipped to the endoscope's field, so it aligns pixel for pixel with the
image (the pointing game of `python -m extract.explain` scores heatmaps against it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from pipeline.demo.patients import EXTERNAL_SITE, INTERNAL_SITE, Lesion, Patient

SCENE_SIZE = 576  # square canvas the larynx is drawn on, in scene pixels
MIDLINE_X = SCENE_SIZE / 2
ANTERIOR_COMMISSURE_Y = 180.0
POSTERIOR_Y = 420.0  # where the cords end, at the vocal processes
VIEW_CENTRE = (MIDLINE_X, 290.0)
VIEW_SPAN = 380.0  # scene pixels across the image's shorter side at zoom 1

WHITE_PLAQUE = np.array([246, 244, 236], dtype=np.float32)
RED_MASS = np.array([188, 58, 60], dtype=np.float32)
GAP_COLOUR = (26, 8, 10)
TRACHEA_RING_COLOUR = (72, 26, 28)


@dataclass(frozen=True)
class Camera:
    """How one hospital's endoscope renders a scene."""

    sizes: tuple[tuple[int, int], ...]  # (width, height) of the images it records
    colour_gain: tuple[float, float, float]  # per-channel cast applied to every image
    contrast: float  # 1 keeps contrast; below 1 flattens it around mid-grey
    field_ratio: float  # endoscope field diameter over the image's shorter side


@dataclass(frozen=True)
class Photo:
    """One rendered image and where its lesion is in it."""

    image: Image.Image  # RGB
    lesion_mask: Image.Image  # mode "1", the image's size; true where the lesion is visible


CAMERAS = {
    INTERNAL_SITE.name: Camera(
        sizes=((448, 336), (400, 320), (384, 288), (352, 352), (320, 256), (288, 288)),
        colour_gain=(1.0, 1.0, 1.0),
        contrast=1.0,
        field_ratio=0.98,
    ),
    # Another hospital's camera: warm yellow cast, flatter contrast, larger sensor images
    # and a field wider than the frame (clipped at top and bottom).
    EXTERNAL_SITE.name: Camera(
        sizes=((512, 384), (480, 400), (456, 456)),
        colour_gain=(1.08, 1.0, 0.78),
        contrast=0.82,
        field_ratio=1.12,
    ),
}


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]-ish: a coarse random grid upsampled smoothly."""
    grid = rng.normal(0, 1, (cells, cells)).astype(np.float32)
    image = Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image)


def _medial_edge(t: np.ndarray, side_sign: float, opening: float) -> np.ndarray:
    """Points on a cord's free (medial) edge at positions t along it; shape [len(t), 2]."""
    x = MIDLINE_X + side_sign * opening * t
    y = ANTERIOR_COMMISSURE_Y + (POSTERIOR_Y - ANTERIOR_COMMISSURE_Y) * t
    return np.stack([x, y], axis=1)


def _cord_width(t: np.ndarray, posterior_width: float) -> np.ndarray:
    return 9.0 + (posterior_width - 9.0) * t


def _polygon(points: np.ndarray) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points]


def _side_sign(side: str) -> float:
    return 1.0 if side == "left" else -1.0  # the patient's left is the image's right


def _draw_larynx(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    mucosa: np.ndarray,
    opening: float,
    posterior_width: float,
) -> None:
    t = np.linspace(0, 1, 24)
    fold_colour = tuple(int(c) for c in mucosa * np.array([0.92, 0.8, 0.82]))
    cord_colour = tuple(int(c) for c in rng.normal([224, 192, 182], 6).clip(0, 255))
    arytenoid_colour = tuple(int(c) for c in (mucosa * 1.08).clip(0, 255))
    epiglottis_colour = tuple(int(c) for c in (mucosa * 1.12).clip(0, 255))
    draw.ellipse([MIDLINE_X - 92, 70, MIDLINE_X + 92, 168], fill=epiglottis_colour)
    for side_sign in (-1.0, 1.0):
        medial = _medial_edge(t, side_sign, opening)
        width = _cord_width(t, posterior_width)
        # The ventricular fold: a pink ridge overhanging the true cord's lateral edge.
        fold_inner = medial + np.stack([side_sign * width * 0.75, 0 * t], axis=1)
        fold_outer = fold_inner + np.stack([side_sign * (16 + 40 * np.sqrt(t)), 0 * t], axis=1)
        draw.polygon(_polygon(np.vstack([fold_inner, fold_outer[::-1]])), fill=fold_colour)
    gap = np.vstack([_medial_edge(t, -1.0, opening), _medial_edge(t, 1.0, opening)[::-1]])
    draw.polygon(_polygon(gap), fill=GAP_COLOUR)
    for ring in range(3):  # tracheal rings seen deep through the gap
        ring_y = 300 + 40 * ring + rng.uniform(-8, 8)
        depth = (ring_y - ANTERIOR_COMMISSURE_Y) / (POSTERIOR_Y - ANTERIOR_COMMISSURE_Y)
        half_width = 0.55 * opening * depth
        draw.arc(
            [MIDLINE_X - half_width, ring_y - 12, MIDLINE_X + half_width, ring_y + 12],
            200,
            340,
            fill=TRACHEA_RING_COLOUR,
            width=3,
        )
    for side_sign in (-1.0, 1.0):
        medial = _medial_edge(t, side_sign, opening)
        lateral = medial + np.stack([side_sign * _cord_width(t, posterior_width), 0 * t], axis=1)
        draw.polygon(_polygon(np.vstack([medial, lateral[::-1]])), fill=cord_colour)
        arytenoid_x = MIDLINE_X + side_sign * (opening + posterior_width * 0.5)
        draw.ellipse(
            [arytenoid_x - 36, POSTERIOR_Y - 16, arytenoid_x + 36, POSTERIOR_Y + 44],
            fill=arytenoid_colour,
        )


def _draw_vessels(draw: ImageDraw.ImageDraw, rng: np.random.Generator, mucosa: np.ndarray) -> None:
    colour = tuple(int(c) for c in mucosa * np.array([0.78, 0.55, 0.6]))
    for _ in range(rng.integers(3, 7)):
        start = rng.uniform(60, SCENE_SIZE - 60, 2)
        drift = rng.normal(0, 10, 2) * np.arange(6)[:, None]
        wiggle = rng.normal(0, 14, (6, 2)).cumsum(axis=0)
        draw.line(_polygon(start + drift + wiggle), fill=colour, width=int(rng.integers(1, 3)))


def _lesion_colour(severity: float) -> np.ndarray:
    return WHITE_PLAQUE + (RED_MASS - WHITE_PLAQUE) * severity**1.2


def _draw_lesion(
    scene: Image.Image,
    rng: np.random.Generator,
    lesion: Lesion,
    side: str,
    opening: float,
    posterior_width: float,
) -> Image.Image:
    """Paint the lesion on one cord: bulkier, redder and more irregular as severity grows.

    Returns its outline as a mode "L" mask of the scene (255 inside)."""
    side_sign = _side_sign(side)
    severity = lesion.severity
    t = np.linspace(lesion.start, lesion.end, 20)
    span = np.sin(np.pi * np.linspace(0.02, 0.98, t.size)) ** 0.5  # rounded ends
    irregularity = 0.05 + 0.4 * severity
    half_thickness = (
        _cord_width(t, posterior_width)
        / 2
        * (1.4 + 3.0 * severity)
        * span
        * (1 + irregularity * rng.normal(0, 1, t.size)).clip(0.5, 2.0)
    )
    centre = _medial_edge(t, side_sign, opening)
    centre[:, 0] += side_sign * _cord_width(t, posterior_width) / 2
    outline = np.vstack(
        [
            centre - np.stack([side_sign * half_thickness, 0 * t], axis=1),
            (centre + np.stack([side_sign * half_thickness, 0 * t], axis=1))[::-1],
        ]
    )
    outline_mask = Image.new("L", scene.size, 0)
    ImageDraw.Draw(outline_mask).polygon(_polygon(outline), fill=255)
    # Smooth plaques fade into the cord; irregular masses have sharp borders.
    mask = outline_mask.filter(ImageFilter.GaussianBlur(0.8 + 3.0 * (1 - severity)))
    colour = _lesion_colour(severity) * rng.uniform(0.96, 1.04, 3)
    paint = Image.new("RGB", scene.size, tuple(int(c) for c in colour.clip(0, 255)))
    scene.paste(paint, (0, 0), mask)
    draw = ImageDraw.Draw(scene)
    for _ in range(int(2 + 14 * severity)):  # surface bumps: keratin flecks or friable nodules
        index = rng.integers(t.size)
        x = centre[index, 0] + rng.uniform(-0.7, 0.7) * half_thickness[index]
        y = centre[index, 1] + rng.uniform(-6, 6)
        radius = rng.uniform(1.5, 2.5 + 6 * severity)
        shade = rng.choice([0.78, 1.1]) if severity > 0.5 else rng.uniform(0.95, 1.04)
        fleck = tuple(int(c) for c in (colour * shade).clip(0, 255))
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fleck)
    return outline_mask


def _draw_scene(patient: Patient, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The patient's larynx on a SCENE_SIZE square canvas, before any camera view, and the
    mask of its lesion(s) (mode "L", 255 inside)."""
    mucosa = rng.normal([204, 108, 106], 8).clip(0, 255)
    texture = 1 + 0.1 * _smooth_noise(rng, SCENE_SIZE, 7)[..., None]
    base = (np.broadcast_to(mucosa, (SCENE_SIZE, SCENE_SIZE, 3)) * texture).clip(0, 255)
    scene = Image.fromarray(base.astype(np.uint8))
    opening = rng.uniform(26, 56)  # half-width of the glottic gap at the vocal processes
    posterior_width = rng.uniform(30, 42)
    draw = ImageDraw.Draw(scene)
    _draw_vessels(draw, rng, mucosa)
    _draw_larynx(draw, rng, mucosa, opening, posterior_width)
    lesion = Image.new("L", scene.size, 0)
    for side in patient.lesion.sides:
        outline = _draw_lesion(scene, rng, patient.lesion, side, opening, posterior_width)
        lesion = ImageChops.lighter(lesion, outline)
    return scene.filter(ImageFilter.GaussianBlur(1.2)), lesion


def _view(
    scene: Image.Image, lesion: Image.Image, rng: np.random.Generator, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """An affine view of the scene (rotation, zoom, shift) as floats in [0, 1], and the
    same view of the lesion mask as booleans."""
    width, height = size
    angle = np.deg2rad(rng.uniform(-5, 5))
    scale = VIEW_SPAN / min(width, height) / rng.uniform(0.9, 1.15)
    centre_x, centre_y = np.array(VIEW_CENTRE) + rng.normal(0, 12, 2)
    a, b = scale * np.cos(angle), -scale * np.sin(angle)
    d, e = scale * np.sin(angle), scale * np.cos(angle)
    # Image.transform maps each output pixel (x, y) to the input (a x + b y + c, d x + e y + f).
    c = centre_x - a * width / 2 - b * height / 2
    f = centre_y - d * width / 2 - e * height / 2
    view, lesion_view = (
        layer.transform(
            size, Image.Transform.AFFINE, (a, b, c, d, e, f), resample=Image.Resampling.BILINEAR
        )
        for layer in (scene, lesion)
    )
    pixels = np.asarray(view, dtype=np.float32)  # a new array: asarray converts the bytes
    pixels /= 255
    return pixels, np.asarray(lesion_view) >= 128


def _radius_from(size: tuple[int, int], centre: tuple[float, float]) -> np.ndarray:
    width, height = size
    x = np.arange(width, dtype=np.float32) - np.float32(centre[0])
    y = np.arange(height, dtype=np.float32)[:, None] - np.float32(centre[1])
    return np.sqrt(x**2 + y**2)


GLINT_BLUR = 1.2  # Gaussian radius of a glint's soft edge, in image pixels
# Glints cover a few hundred pixels of an image: they are blurred and blended only within
# their box widened by this margin, wider than the blur reaches (one lit pixel spreads 3
# pixels at GLINT_BLUR), so every pixel is what blurring and blending the whole image gives
# (the same integer blur, and x * 1 + 0 == x elsewhere) at a fraction of the cost.
GLINT_MARGIN = 8


def _glints(
    rng: np.random.Generator, size: tuple[int, int]
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Specular highlights of the light on wet mucosa: the box (rows, columns) holding
    them and their [h, w] mask in [0, 1] there (zero everywhere else)."""
    width, height = size
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    for _ in range(rng.integers(1, 6)):
        x, y = rng.normal([width / 2, height / 2], [width / 5, height / 5])
        rx, ry = rng.uniform(1.5, 5, 2)
        draw.ellipse([x - rx, y - ry, x + rx, y + ry], fill=int(rng.integers(180, 256)))
    drawn = mask.getbbox()
    if drawn is None:  # every glint fell outside the frame
        return (slice(0, 0), slice(0, 0)), np.zeros((0, 0), dtype=np.float32)
    left, top = max(drawn[0] - GLINT_MARGIN, 0), max(drawn[1] - GLINT_MARGIN, 0)
    right, bottom = min(drawn[2] + GLINT_MARGIN, width), min(drawn[3] + GLINT_MARGIN, height)
    blurred = mask.crop((left, top, right, bottom)).filter(ImageFilter.GaussianBlur(GLINT_BLUR))
    glints = np.asarray(blurred, dtype=np.float32) / 255
    return (slice(top, bottom), slice(left, right)), glints


def _photograph(
    scene: Image.Image,
    lesion: Image.Image,
    rng: np.random.Generator,
    camera: Camera,
    size: tuple[int, int],
) -> Photo:
    """One endoscopic image of `scene`: a random view, lighting and blur through `camera`;
    the lesion mask in the same view, where the field shows it."""
    width, height = size
    pixels, lesion_pixels = _view(scene, lesion, rng, size)
    light_centre = (width / 2 + rng.normal(0, width / 10), height / 2 + rng.normal(0, height / 10))
    falloff = rng.uniform(0.25, 0.5)
    lighting = 1 - falloff * (_radius_from(size, light_centre) / (0.6 * min(size))) ** 2
    colour = rng.uniform(0.9, 1.1) * rng.normal(1, 0.03, 3) * np.array(camera.colour_gain)
    pixels *= lighting.clip(0.15, 1)[..., None] * colour.astype(np.float32)
    # In place, in the same order as 0.5 + (pixels - 0.5) * contrast: the same floats.
    pixels -= 0.5
    pixels *= camera.contrast
    pixels += 0.5
    pixels.clip(0, 1, out=pixels)
    box, glints = _glints(rng, size)
    under_glints = pixels[box]  # a view: pixels * (1 - glints) + glints, where glints > 0
    under_glints *= 1 - glints[..., None]
    under_glints += glints[..., None]
    field_radius = camera.field_ratio * min(size) / 2
    field = ((field_radius - _radius_from(size, (width / 2, height / 2))) / 2).clip(0, 1)
    pixels *= field[..., None]
    pixels *= 255
    pixels += 0.5
    image = Image.fromarray(pixels.astype(np.uint8))
    # Defocus: a box kernel is close to the disc a lens blurs to, and 3x cheaper than a Gaussian.
    image = image.filter(ImageFilter.BoxBlur(rng.uniform(0.3, 1.6)))
    # Outside the endoscope's field (black) a lesion is not visible.
    return Photo(image, Image.fromarray(lesion_pixels & (field > 0.5)))


def render_images(patient: Patient) -> list[Photo]:
    """All of a patient's images with their lesion masks, from the patient's own "scene"
    random stream (the masks draw nothing from it: the images do not depend on them)."""
    rng = patient.rng("scene")
    camera = CAMERAS[patient.site.name]
    size = camera.sizes[rng.integers(len(camera.sizes))]  # one device per examination
    scene, lesion = _draw_scene(patient, rng)
    return [_photograph(scene, lesion, rng, camera, size) for _ in range(patient.image_count)]
