"""The synthetic global problem: a surface-temperature climatology, satellite swaths.

Fields are ``(ny, nx)``, latitude first, on the grid of :mod:`mpda_dist.sphere`
(longitudes ``i·360/nx``, latitudes over ``lat_range``).  Observation coordinates are
longitude and latitude in degrees.
"""

from __future__ import annotations

import math

import numpy as np

from mpda_dist import sphere
from mpda_dist.observations import Observations

SIDEREAL_DAY_S = 86164.0905
# Sun-synchronous: the orbit plane turns eastward once a year with the Sun.
NODAL_PRECESSION_DEG_PER_S = 360.0 / (365.2422 * 86400.0)


def climatology(ny: int, nx: int, lat_range: tuple[float, float]) -> np.ndarray:
    """A zonal-mean surface-temperature climatology in kelvin, ``(ny, nx)``: about 300 K
    at the equator falling to about 250 K at ±80°, slightly colder in the south."""
    lat = np.radians(sphere.latitudes(ny, lat_range))
    t = 300.0 - 48.0 * np.sin(lat) ** 2 + 3.0 * np.sin(lat)
    return np.repeat(t[:, None], nx, axis=1)


def _unit(lon_deg: np.ndarray, lat_deg: np.ndarray) -> np.ndarray:
    lon, lat = np.radians(lon_deg), np.radians(lat_deg)
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], -1)


def ground_track(
    t: np.ndarray,
    node_lon_deg: float,
    phase_deg: float,
    inclination_deg: float = 98.7,
    period_minutes: float = 101.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Sub-satellite longitude and latitude (degrees) at times ``t`` (s) of a circular
    orbit whose ascending node is at ``node_lon_deg`` at ``t = 0`` with argument of
    latitude ``phase_deg``; the Earth turns underneath (sidereal day) and the node
    precesses as a sun-synchronous orbit's does."""
    inc = math.radians(inclination_deg)
    u = math.radians(phase_deg) + 2.0 * math.pi * t / (period_minutes * 60.0)
    lat = np.degrees(np.arcsin(np.sin(inc) * np.sin(u)))
    node = node_lon_deg + NODAL_PRECESSION_DEG_PER_S * t - 360.0 * t / SIDEREAL_DAY_S
    lon = node + np.degrees(np.arctan2(math.cos(inc) * np.sin(u), np.cos(u)))
    return np.mod(lon, 360.0), lat


MAX_TRACK_POINTS = 10**7
"""Track points of all satellites together at most (a quarter swath apart): the
default 4 satellites over 3 h at 0.14° take about 10⁵; ten million is 240 MB."""


def satellite_swaths(
    shape: tuple[int, int],
    lat_range: tuple[float, float],
    satellites: int = 4,
    swath_km: float = 120.0,
    window_hours: float = 3.0,
    inclination_deg: float = 98.7,
    period_minutes: float = 101.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Boolean ``(ny, nx)`` mask of the nodes seen within ``swath_km / 2`` of any
    ground track during the window (interior rows only: the clip rows are never
    observed).  Ascending nodes are spread evenly in longitude, phases drawn from
    ``rng`` (fixed when None)."""
    from scipy.spatial import cKDTree

    ny, nx = shape
    r = sphere.EARTH_RADIUS_KM
    # Track points closer than a quarter swath (and a grid spacing), so the distance to
    # the nearest point is the cross-track distance to within a few percent.
    step_km = min(swath_km / 4.0, 2 * math.pi * r / nx)
    speed = 2 * math.pi * r / (period_minutes * 60.0)  # ground speed, km/s
    dt = step_km / speed
    count = satellites * window_hours * 3600.0 / dt
    if count > MAX_TRACK_POINTS:
        raise ValueError(
            f"observations.synthetic.tracks: {satellites} satellites over window_hours = "
            f"{window_hours:g} with swath_km = {swath_km:g} need {count:.3g} track points "
            f"(at most {MAX_TRACK_POINTS:.0e}); give a shorter window or a wider swath"
        )
    t = np.arange(0.0, window_hours * 3600.0, dt)
    rng = rng or np.random.default_rng(0)
    points = []
    for s in range(satellites):
        lon, lat = ground_track(
            t, 360.0 * s / satellites, rng.uniform(0, 360), inclination_deg, period_minutes
        )
        points.append(_unit(lon, lat))
    tree = cKDTree(np.concatenate(points))
    glon, glat = np.meshgrid(
        sphere.longitudes(nx), sphere.latitudes(ny, lat_range)[1:-1], indexing="xy"
    )
    dist, _ = tree.query(_unit(glon.ravel(), glat.ravel()), k=1)
    chord = 2.0 * math.sin(swath_km / 2.0 / r / 2.0)
    mask = np.zeros(shape, dtype=bool)
    mask[1:-1] = (dist <= chord).reshape(ny - 2, nx)
    return mask


def observe(
    truth: np.ndarray,
    lat_range: tuple[float, float],
    mask: np.ndarray,
    noise: float,
    rng: np.random.Generator,
) -> Observations:
    """Observations of ``truth`` at the nodes of ``mask`` with ``N(0, noise²)`` errors;
    coordinates are the nodes' longitude and latitude (degrees)."""
    ny, nx = truth.shape
    iy, ix = np.nonzero(mask)
    value = truth[iy, ix] + noise * rng.standard_normal(len(iy))
    return Observations(
        sphere.longitudes(nx)[ix],
        sphere.latitudes(ny, lat_range)[iy],
        value,
        np.full(len(iy), float(noise)),
    )


def random_mask(shape: tuple[int, int], fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A random ``fraction`` of the interior nodes (every column, rows 1..ny-2)."""
    ny, nx = shape
    n = (ny - 2) * nx
    mask = np.zeros(shape, dtype=bool)
    flat = rng.choice(n, size=max(1, int(round(fraction * n))), replace=False)
    mask[1 + flat // nx, flat % nx] = True
    return mask


def coverage(mask: np.ndarray, lat_range: tuple[float, float]) -> tuple[float, float]:
    """Share of the observable nodes (the interior rows: the clip rows never are)
    observed, and the same weighted by area (cos lat)."""
    w = sphere.area_weights(mask.shape[0], lat_range)[1:-1, None]
    inner = mask[1:-1]
    return float(inner.mean()), float(np.sum(w * inner) / np.sum(np.broadcast_to(w, inner.shape)))
