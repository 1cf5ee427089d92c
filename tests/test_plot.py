"""``mpda plot`` on small analysis files written in-process (no solve): where the
observations are drawn.  The plots of real runs are in test_global.py."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PathCollection

from mpda_dist import io, plot

NX, NY = 16, 9  # sphere: longitudes i * 22.5, latitudes -60 .. 60 by 15


def write_output(path: Path, x: np.ndarray, y: np.ndarray, ox, oy, *, lonlat: bool) -> Path:
    """An analysis file laid out as ``mpda run`` writes it (io.write_analysis)."""
    n = len(ox)
    field = np.add.outer(np.cos(np.radians(y)), np.zeros(x.size))
    io.write_analysis(
        path,
        mean=field,
        x=x,
        y=y,
        observations={
            "x": np.asarray(ox, dtype=float),
            "y": np.asarray(oy, dtype=float),
            "value": np.ones(n),
            "noise": np.ones(n),
            "used": np.ones(n, dtype=np.int8),
        },
        background=np.zeros_like(field),
        attrs={},
        lonlat=lonlat,
    )
    return path


def scattered(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """The observation dots' x and the x-limits of the analysis-mean map."""
    fig = plot.figure(str(path))
    try:
        ax = fig.axes[0]
        assert ax.get_title() == "analysis mean"
        (dots,) = [c for c in ax.collections if isinstance(c, PathCollection)]
        return dots.get_offsets()[:, 0].copy(), ax.get_xlim()
    finally:
        plt.close(fig)


def test_sphere_observations_are_drawn_on_the_grid_s_longitudes(tmp_path: Path) -> None:
    """Longitudes in [-180, 180) were drawn as read: the axis ran from -200 to 360 and
    half the dots sat left of the field.  They are wrapped into the drawn span of
    /grid/x (0 .. 337.5, cells ±11.25)."""
    x, y = np.arange(NX) * 360.0 / NX, np.linspace(-60.0, 60.0, NY)
    lon = np.array([-180.0, -90.0, -12.0, -11.0, -1.0, 0.0, 90.0, 179.9, 348.0, 349.0, 600.0])
    # cells: 0 is [-11.25, 11.25), so -12 -> 348 (the last cell), 349 -> -11 (the first)
    path = write_output(tmp_path / "g.h5", x, y, lon, np.zeros(lon.size), lonlat=True)
    got, xlim = scattered(path)
    np.testing.assert_allclose(
        got, [180.0, 270.0, 348.0, -11.0, -1.0, 0.0, 90.0, 179.9, 348.0, -11.0, 240.0]
    )
    assert xlim == pytest.approx((-11.25, 348.75))  # the field's cells, nothing beside
    assert ((got >= xlim[0]) & (got < xlim[1])).all()


def test_rectangle_observations_are_drawn_as_read(tmp_path: Path) -> None:
    x, y = np.linspace(0.0, 2.0, 21), np.linspace(0.0, 1.0, 11)
    ox = np.array([0.0, 0.55, 1.95])
    path = write_output(tmp_path / "r.h5", x, y, ox, [0.5, 0.5, 0.5], lonlat=False)
    got, _ = scattered(path)
    np.testing.assert_array_equal(got, ox)


def test_plot_of_a_sphere_output_writes_the_image(tmp_path: Path) -> None:
    x, y = np.arange(NX) * 360.0 / NX, np.linspace(-60.0, 60.0, NY)
    path = write_output(tmp_path / "g.h5", x, y, [-170.0, 10.0], [0.0, 30.0], lonlat=True)
    out = plot.plot(str(path), str(tmp_path / "map"))
    assert out == str(tmp_path / "map.png") and Path(out).stat().st_size > 0
