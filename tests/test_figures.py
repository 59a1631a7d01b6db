"""Figures (drift.figures): bilinear upsampling and the map overlays' shared colour scale."""

import numpy as np
import pytest
import torch

from drift import figures


def test_upsample_matches_torch_and_skimage(rng):
    from skimage.transform import resize

    for h, w, H, W in ((3, 3, 13, 17), (5, 2, 123, 7), (1, 4, 5, 9)):
        m = torch.rand(h, w, generator=rng, dtype=torch.float64)
        ref = torch.nn.functional.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
        got = figures.upsample_bilinear(m.numpy(), (H, W))
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got, resize(m.numpy(), (H, W), order=1, mode="edge", anti_aliasing=False),
                                   rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        figures.upsample_bilinear(np.zeros(3), (4, 4))


def test_map_overlays_share_one_colour_scale_per_row(rng):
    rows = []
    for i in range(3):
        tl = torch.rand(3, 5, generator=rng, dtype=torch.float64).numpy() * (i + 1)
        ft = torch.rand(3, 5, generator=rng, dtype=torch.float64).numpy() * 2
        img = torch.rand(13, 17, generator=rng, dtype=torch.float64).numpy() if i != 1 else None
        rows.append(figures.MapRow(f"row {i}", tl, ft, img))
    fig = figures.map_overlays(rows, (13, 17))
    panels = [ax for ax in fig.axes if ax.get_title() in ("TL (transfer)", "FT (fine-tuned)")]
    assert len(panels) == 6
    for i, row in enumerate(rows):
        tl_ax, ft_ax = panels[2 * i], panels[2 * i + 1]
        tl_im, ft_im = tl_ax.get_images()[-1], ft_ax.get_images()[-1]
        ref = [torch.nn.functional.interpolate(torch.as_tensor(m)[None, None], size=(13, 17), mode="bilinear",
                                               align_corners=False)[0, 0].numpy() for m in (row.tl, row.ft)]
        vmax = max(ref[0].max(), ref[1].max())  # the scale of what is drawn: the upsampled maps
        assert tl_im.get_clim() == ft_im.get_clim() == pytest.approx((0.0, vmax), rel=1e-12)
        np.testing.assert_allclose(np.asarray(tl_im.get_array()), ref[0], rtol=1e-12)
        np.testing.assert_allclose(np.asarray(ft_im.get_array()), ref[1], rtol=1e-12)
    assert sum(1 for ax in fig.axes if ax.get_label() == "<colorbar>") == 3
    assert figures.to_png(fig)[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="at least one row"):
        figures.map_overlays([], (4, 4))
