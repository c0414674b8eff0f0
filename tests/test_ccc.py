"""CCC: the walk (CCC's find_path rule on a hand-computed case), fractional severities, the pair order, the
calibration with a tiny model, and a run of the generated stream on a tiny ImageNet-layout tree."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import ctta
from ctta import strategies
from ctta.backbones import create as create_backbone
from ctta.errors import ConfigError
from ctta.streams.ccc import find_walk, level_at, pair_sequence
from ctta.streams.corruptions.core import CORRUPTIONS
from ctta.streams.files import resized_crop_box
from ctta.streams.imagenet import imagenet_classes


def test_walk_follows_cccs_rule_on_a_hand_computed_matrix():
    acc = np.array([[80, 60, 40], [50, 30, 20], [30, 10, 5]], dtype=float)
    # by hand: from (2, 0) the two next steps tie (mean 26 either way) and the tie goes to (i, j + 1)
    assert find_walk(acc, 30) == [(2, 0), (2, 1), (1, 1), (1, 2), (0, 2)]
    walk = find_walk(acc, 75)
    assert walk[0][1] == 0 and walk[-1][0] == 0
    assert all((b == (a[0] - 1, a[1])) or (b == (a[0], a[1] + 1)) for a, b in zip(walk, walk[1:]))


def test_fractional_severities_interpolate_from_the_identity_level():
    for c in ("gaussian_noise", "contrast", "fog", "glass_blur", "impulse_noise"):
        for s in range(1, 6):
            assert level_at(c, float(s)) == CORRUPTIONS.get(c).levels["imagenet"][s - 1]
    assert level_at("gaussian_noise", 0.5) == pytest.approx(0.04)
    assert level_at("contrast", 0.25) == pytest.approx(1 - 0.25 * 0.6)
    assert level_at("shot_noise", 0.5) == pytest.approx(120.0)  # 1 / c interpolated from 0, as CCC does
    assert level_at("fog", 1.5) == pytest.approx((1.75, 2.0))
    with pytest.raises(ConfigError):
        level_at("contrast", 0)


def test_pairs_chain_and_are_seeded():
    noises = ("a", "b", "c", "d")
    seq = [p for _, p in zip(range(20), pair_sequence(noises, 44))]
    assert all(n1 != n2 for n1, n2 in seq)
    assert all(seq[k][1] == seq[k + 1][0] for k in range(19))
    assert seq == [p for _, p in zip(range(20), pair_sequence(noises, 44))]
    assert seq != [p for _, p in zip(range(20), pair_sequence(noises, 45))]


def test_random_resized_crop_box_is_inside_the_image_and_seeded():
    for seed in range(50):
        top, left, h, w = resized_crop_box(260, 300, np.random.default_rng(seed))
        assert 0 <= top <= 260 - h and 0 <= left <= 300 - w and h > 0 and w > 0
    assert resized_crop_box(260, 300, np.random.default_rng([3, 7])) == \
        resized_crop_box(260, 300, np.random.default_rng([3, 7]))


@pytest.fixture
def val(tmp_path):
    rng = np.random.default_rng(0)
    for c, w in enumerate(imagenet_classes()[:2]):
        for i in range(3):
            p = tmp_path / "val" / w / f"ILSVRC2012_val_{c * 3 + i:08d}.JPEG"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (250, 280, 3), dtype=np.uint8)).save(p)
    return tmp_path


def _model():
    torch.manual_seed(0)
    return create_backbone("tiny_cnn", num_classes=1000)


def test_ccc_runs_any_length_from_a_clean_folder_calibrated_by_the_model(val, tmp_path, monkeypatch):
    monkeypatch.setenv("CTTA_BENCH_CACHE", str(tmp_path / "cache"))
    kw = dict(data_root=str(val), baseline="hard", speed=5, num_images=23, batch_size=4, severity_step=2.5,
              calibration_images=3, seed=43)
    s = ctta.streams.create("ccc", model=_model(), **kw)
    assert sum(seg.num_samples for seg in s) == 23
    for seg in s:
        walk = seg.meta["walk"]
        assert seg.meta["n1"] != seg.meta["n2"]
        assert all(a in (0, 2.5, 5) and b in (0, 2.5, 5) for a, b in walk)
    first = s.segments[0].meta["walk"]
    assert first[0][1] == 0  # a walk starts with n2 off
    x, y, _ = s.segments[0].materialise(torch.device("cpu"))
    assert x.shape[1:] == (3, 224, 224) and set(y.tolist()) <= {0, 1}
    assert list((tmp_path / "cache" / "ccc").glob("calibration-*.pt"))

    def no_recalibration(*a, **k):
        raise AssertionError("calibrated again")

    monkeypatch.setattr("ctta.streams.ccc.calibrate_pair", no_recalibration)
    again = ctta.streams.create("ccc", model=_model(), **kw)  # the calibration comes from the cache now
    assert [seg.meta for seg in again] == [seg.meta for seg in s]
    a = ctta.run(s, strategies.create("bn", _model()), device="cpu", progress=False)
    b = ctta.run(again, strategies.create("bn", _model()), device="cpu", progress=False, chunk_size=4)
    assert a.steps["correct"].tolist() == b.steps["correct"].tolist()


def test_ccc_reads_cccs_accuracy_matrix_and_names_what_is_missing(val, tmp_path):
    grid = 3
    mats = {"n1_gaussian_noise_n2_shot_noise": np.full((grid, grid), 5.0)}
    path = tmp_path / "ccc_accuracy_matrix.pickle"
    path.write_bytes(pickle.dumps(mats))
    with pytest.raises(ConfigError, match="has no entry"):
        ctta.streams.create("ccc", data_root=str(val), baseline="hard", speed=5, num_images=500,
                            severity_step=2.5, accuracy_matrix=str(path))
    with pytest.raises(ConfigError, match="accuracy matrix"):
        ctta.streams.create("ccc", data_root=str(val), baseline="hard", speed=5, num_images=10)
    with pytest.raises(ConfigError, match="baseline"):
        ctta.streams.create("ccc", data_root=str(val), baseline="impossible", accuracy_matrix=str(path))


def test_ccc_reads_released_webdataset_shards_in_order(tmp_path, monkeypatch):
    import io
    import tarfile

    monkeypatch.setenv("CTTA_BENCH_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    folder = tmp_path / "baseline_20_transition+speed_1000_seed_44"
    folder.mkdir()
    pixels, labels = [], []
    for shard in range(2):
        with tarfile.open(folder / f"serial_{shard:05d}.tar", "w") as tf:
            for i in range(5):
                img = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=85)
                label = int(rng.integers(0, 1000))
                for ext, data in (("info", b"++dir++x"), ("input.jpg", buf.getvalue()),
                                  ("output.cls", str(label).encode())):
                    member = tarfile.TarInfo(f"sample_{shard * 5 + i}.{ext}")
                    member.size = len(data)
                    tf.addfile(member, io.BytesIO(data))
                buf.seek(0)
                pixels.append(np.asarray(Image.open(buf).convert("RGB")))
                labels.append(label)
    s = ctta.streams.create("ccc", shards=str(folder), num_images=8, batch_size=4)
    assert [seg.name for seg in s] == ["serial_00000", "serial_00001"]
    assert [seg.num_samples for seg in s] == [5, 3]
    xs, ys = zip(*[seg.materialise(torch.device("cpu"))[:2] for seg in s])
    x, y = torch.cat(xs), torch.cat(ys)
    assert y.tolist() == labels[:8]
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(np.stack(pixels[:8])).permute(0, 3, 1, 2))
    chunked = torch.cat([c[0] for seg in s for c in seg.chunks(torch.device("cpu"), chunk_size=2)])
    assert torch.equal(chunked, x)
    with pytest.raises(Exception, match="serial_"):
        ctta.streams.create("ccc", shards=str(tmp_path / "cache"))
