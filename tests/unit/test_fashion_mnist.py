"""The Fashion-MNIST testbed's data: the idx files, the fixed validation split, and each
test-time shift's reproducibility and property."""

import numpy as np
import pytest

from raysoup.inputs.data import DataError
from raysoup.testbed.fashion_mnist import (
    SHIFT_NAMES,
    load_fashion_mnist,
    make_shift,
    train_val_split,
)


def test_fashion_mnist_shapes():
    arrays = load_fashion_mnist()
    assert arrays["train_images"].shape == (60000, 1, 28, 28)
    assert arrays["test_labels"].shape == (10000,)
    assert set(np.unique(arrays["train_labels"])) == set(range(10))


def test_missing_data_dir_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYSOUP_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path)):
        load_fashion_mnist()


def test_validation_rows_are_disjoint_from_training_rows():
    train, val = train_val_split(60000, 6000)
    assert len(val) == 6000 and len(np.intersect1d(train, val)) == 0
    assert np.array_equal(val, train_val_split(60000, 6000)[1])  # fixed for every zoo


def test_at_least_five_real_shifts_reproducible():
    images = load_fashion_mnist()["test_images"][:64]
    assert len(SHIFT_NAMES) >= 5
    for i, shift in enumerate(SHIFT_NAMES):
        a, b = make_shift(images, shift, seed=i), make_shift(images, shift, seed=i)
        assert a.dtype == np.uint8 and a.shape == images.shape
        assert np.array_equal(a, b), shift
        assert not np.array_equal(a, images), shift


# Each shift checked against a property of its own, on real images or on probes built so
# that property can be read off.
def test_noise_adds_independent_gaussian_noise_of_std_0_2_of_the_range():
    gray = np.full((100, 1, 28, 28), 128, np.uint8)  # mid-gray: clipping is rare
    residual = make_shift(gray, "noise", seed=0).astype(float) - 128
    assert residual.std() == pytest.approx(0.2 * 255, rel=0.03) and abs(residual.mean()) < 1
    flat = residual.reshape(-1, 28)
    assert abs(np.corrcoef(flat[:, :-1].ravel(), flat[:, 1:].ravel())[0, 1]) < 0.02


def test_blur_spreads_a_point_over_a_5x5_gaussian_of_sigma_1_2_to_1_6():
    from scipy import ndimage

    point = np.zeros((20, 1, 28, 28), np.uint8)
    point[:, :, 14, 14] = 255
    out = make_shift(point, "blur", seed=0).astype(float)
    assert not out[:, :, :12].any() and not out[:, :, 17:].any()  # nothing beyond radius 2
    assert not out[:, :, :, :12].any() and not out[:, :, :, 17:].any()
    assert np.all(np.abs(out.sum(axis=(2, 3)) - 255) <= 13)  # the kernel's energy is 1
    peaks = [
        ndimage.gaussian_filter(point[0, 0].astype(float), s, radius=2)[14, 14] for s in (1.6, 1.2)
    ]  # a wider kernel has a lower peak
    assert np.all((out[:, 0, 14, 14] >= peaks[0] - 0.5) & (out[:, 0, 14, 14] <= peaks[1] + 0.5))
    assert len(set(out[:, 0, 14, 14])) > 1  # sigma drawn per image
    window = out[:, :, 12:17, 12:17]
    np.testing.assert_array_equal(window, window[:, :, ::-1, ::-1])  # a symmetric kernel


def test_contrast_scales_the_deviation_from_the_mean_by_0_25_to_0_35():
    images = load_fashion_mnist()["test_images"][:50]
    out = make_shift(images, "contrast", seed=0).astype(float)
    x = images.astype(float)
    ratio = out.std(axis=(2, 3)) / x.std(axis=(2, 3))
    assert np.all((ratio > 0.25 - 0.01) & (ratio < 0.35 + 0.01)) and ratio.std() > 0.01
    assert np.all(np.abs(out.mean(axis=(2, 3)) - x.mean(axis=(2, 3))) < 0.6)


def test_rotate_turns_a_bar_by_at_most_40_degrees_either_way():
    bar = np.zeros((40, 1, 28, 28), np.uint8)
    bar[:, :, 13:15, 4:24] = 255  # horizontal, through the centre
    out = make_shift(bar, "rotate", seed=0).astype(float)
    ys, xs = np.indices((28, 28)) - 13.5
    angles = []
    for image in out[:, 0]:
        w = image / image.sum()  # principal axis of the intensity's second moments
        cxx, cyy, cxy = (w * xs**2).sum(), (w * ys**2).sum(), (w * xs * ys).sum()
        angles.append(np.degrees(0.5 * np.arctan2(2 * cxy, cxx - cyy)))
    angles = np.array(angles)
    assert np.all(np.abs(angles) <= 41) and angles.min() < -10 and angles.max() > 10


def test_invert_is_255_minus_every_pixel():
    images = load_fashion_mnist()["test_images"][:20]
    assert np.array_equal(make_shift(images, "invert", seed=0), 255 - images)


def test_elastic_moves_pixels_by_less_than_10_pixels():
    from scipy import ndimage

    images = load_fashion_mnist()["test_images"][:30]
    out = make_shift(images, "elastic", seed=0).astype(float)
    x = images.astype(float)
    # Each output pixel interpolates input pixels near it (displacements under 10 pixels).
    lo = ndimage.minimum_filter(x, size=(1, 1, 19, 19)) - 1
    hi = ndimage.maximum_filter(x, size=(1, 1, 19, 19)) + 1
    assert np.all((out >= lo) & (out <= hi))
    assert np.abs(out - x).mean() > 3  # but they do move
