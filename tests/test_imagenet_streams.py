"""ImageNet-scale streams on tiny ImageNet-layout trees the tests write: labels, preprocessing, released vs generated
ImageNet-C, class masking for ImageNet-R, chunk-size invariance and resume mid-stream."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import ctta
from ctta import strategies
from ctta.backbones import create as create_backbone
from ctta.errors import ConfigError, DataNotFoundError
from ctta.streams.files import FileImages
from ctta.streams.imagenet import imagenet_classes, subset_classes

from conftest import interrupt_at

WNIDS = imagenet_classes()[:3]  # n01440764 (class 0), n01443537 (1), n01484850 (2)


def _jpeg(path, size, seed):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)


@pytest.fixture
def tree(tmp_path):
    """val/<wnid>/ with 4 odd-sized images per class, and ImageNet-C/gaussian_noise/5/ (224 x 224) for all."""
    k = 0
    for c, w in enumerate(WNIDS):
        for i in range(4):
            name = f"ILSVRC2012_val_{c * 4 + i:08d}.JPEG"
            _jpeg(tmp_path / "val" / w / name, (300 + 10 * i, 260), k)
            _jpeg(tmp_path / "ImageNet-C" / "gaussian_noise" / "5" / w / name, (224, 224), 1000 + k)
            k += 1
    return tmp_path


def test_file_images_apply_resize_256_and_centre_crop_224_as_torchvision(tree):
    from torchvision import transforms

    files = sorted((tree / "val").rglob("*.JPEG"))
    x = FileImages(files, crop=224, resize=256, workers=3)[torch.tensor([5, 0])]
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.uint8
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
    with Image.open(files[5]) as im:
        assert torch.equal(x[0], tf(im.convert("RGB")))
    one = FileImages(files, crop=224, resize=256, workers=1)[torch.tensor([5, 0])]
    assert torch.equal(one, x)  # threads change nothing


def test_imagenet_c_reads_released_folders_and_generates_the_rest(tree):
    s = ctta.streams.create("imagenet_c", data_root=str(tree), corruptions="gaussian_noise,contrast",
                            num_samples=None, batch_size=4)
    assert [seg.name for seg in s] == ["gaussian_noise-5", "contrast-5"]
    assert s.num_classes == 1000
    assert s.provenance["gaussian_noise-5"]["source"] == "files"
    assert s.provenance["contrast-5"]["source"] == "generated" and s.provenance["contrast-5"]["params"] == "imagenet"
    x, y, _ = s.segments[0].materialise(torch.device("cpu"))
    assert x.shape == (12, 3, 224, 224) and sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # the released file of each sample is what the segment holds (same relative path as the clean image)
    x1, y1, _ = s.segments[1].materialise(torch.device("cpu"))
    assert sorted(y1.tolist()) == sorted(y.tolist())


def test_imagenet_c_generated_domain_is_the_val_image_resized_cropped_then_corrupted(tree):
    from ctta.streams.corruptions import corrupt
    from ctta.streams.corruptions.digital import jpeg_compression

    s = ctta.streams.create("imagenet_c", data_root=str(tree), corruptions="contrast", num_samples=None,
                            batch_size=4, seed=3)
    x, y, _ = s.segments[0].materialise(torch.device("cpu"))
    files = sorted((tree / "val").rglob("*.JPEG"))
    clean = FileImages(files, crop=224, resize=256)[torch.arange(12)].float() / 255
    expected = jpeg_compression(corrupt(clean, "contrast", 5, seed=3, params="imagenet"), 85, None)  # as released
    # the segment is a seeded shuffle of the 12 images: every output is one corrupted clean image
    match = [(expected - xi).abs().flatten(1).amax(1).argmin().item() for xi in x]
    assert sorted(match) == list(range(12))
    assert all(torch.equal(x[i], expected[j]) for i, j in enumerate(match))
    raw = ctta.streams.create("imagenet_c", data_root=str(tree), corruptions="contrast", num_samples=None,
                              batch_size=4, seed=3, jpeg_quality=None).segments[0].materialise(torch.device("cpu"))[0]
    assert not torch.equal(raw, x)


def test_chunk_size_and_workers_do_not_change_a_run_and_resume_continues_mid_stream(tree, tmp_path):
    def stream(workers=None):
        return ctta.streams.create("imagenet_c", data_root=str(tree), corruptions="gaussian_noise,contrast,fog",
                                   num_samples=None, batch_size=4, workers=workers)

    def model():
        torch.manual_seed(0)
        return create_backbone("tiny_cnn", num_classes=1000)

    whole = ctta.run(stream(), strategies.create("tent", model()), device="cpu", progress=False)
    chunked = ctta.run(stream(workers=1), strategies.create("tent", model()), device="cpu", progress=False,
                       chunk_size=4)
    assert whole.steps["correct"].tolist() == chunked.steps["correct"].tolist()
    assert whole.summary["domain_error"] == chunked.summary["domain_error"]

    s = interrupt_at(strategies.create("tent", model()), 5)  # inside the second domain
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        ctta.run(stream(), s, device="cpu", progress=False, out=out, chunk_size=4)
    resumed = ctta.run(stream(), strategies.create("tent", model()), device="cpu", progress=False, out=out,
                       resume=True, chunk_size=8)
    assert resumed.steps["correct"].tolist() == whole.steps["correct"].tolist()


def test_imagenet_c_image_list_pins_the_images_and_bad_roots_say_what_to_do(tree, tmp_path):
    lst = tmp_path / "ids.txt"
    lst.write_text(f"{WNIDS[1]}/ILSVRC2012_val_00000004.JPEG 1\n{WNIDS[2]}/ILSVRC2012_val_00000009.JPEG 2\n")
    s = ctta.streams.create("imagenet_c", data_root=str(tree), corruptions="gaussian_noise", image_list=str(lst),
                            batch_size=2)
    _, y, _ = s.segments[0].materialise(torch.device("cpu"))
    assert sorted(y.tolist()) == [1, 2]
    with pytest.raises(DataNotFoundError, match="val/<wnid>"):
        ctta.streams.create("imagenet_c", data_root=str(tmp_path / "nothing"))
    (tree / "val" / "not_a_wnid").mkdir()
    with pytest.raises(ConfigError, match="not among the 1000 ImageNet class ids"):
        ctta.streams.create("imagenet_c", data_root=str(tree), corruptions="contrast")


def test_imagenet_c_from_the_released_folders_alone(tree):
    import shutil

    shutil.rmtree(tree / "val")
    s = ctta.streams.create("imagenet_c", data_root=str(tree), corruptions="gaussian_noise", num_samples=None,
                            batch_size=4, clean_eval=True)  # the probes need val/: skipped with a warning
    assert [seg.name for seg in s] == ["gaussian_noise-5"]
    with pytest.raises(DataNotFoundError, match="validation"):
        ctta.streams.create("imagenet_c", data_root=str(tree), corruptions="contrast")


def test_imagenet_r_masks_the_1000_way_model_to_its_200_classes(tmp_path):
    sub = subset_classes("imagenet_r")
    assert len(sub) == 200
    full = imagenet_classes()
    for k, w in enumerate(sub[:2]):
        for i in range(3):
            _jpeg(tmp_path / "imagenet-r" / w / f"art_{i}.jpg", (280, 300), 10 * k + i)
    s = ctta.streams.create("imagenet_r", data_root=str(tmp_path), batch_size=3)
    assert s.num_classes == 200 and s.output_classes == [full.index(w) for w in sub]
    x, y, _ = s.segments[0].materialise(torch.device("cpu"))
    assert sorted(y.tolist()) == [0, 0, 0, 1, 1, 1]
    torch.manual_seed(0)
    full_model = create_backbone("tiny_cnn", num_classes=1000)
    from ctta.experiment import build_model

    torch.manual_seed(0)
    masked = build_model({"backbone": {"name": "tiny_cnn"}}, s.num_classes, s.output_classes)
    with torch.no_grad():
        assert torch.allclose(masked(x.float() / 255 if x.dtype == torch.uint8 else x),
                              full_model(x)[:, s.output_classes], atol=1e-6)
    res = ctta.run(s, strategies.create("tent", masked), device="cpu", progress=False)
    assert res.summary["domain_error"]


def test_imagenet_variants_take_held_out_probes(tmp_path):
    for k, w in enumerate(imagenet_classes()[:2]):
        for i in range(6):
            _jpeg(tmp_path / "sketch" / w / f"s_{i}.JPEG", (260, 240), 30 * k + i)
    s = ctta.streams.create("imagenet_sketch", data_root=str(tmp_path), batch_size=2, probes="seen", probe_samples=4)
    assert [seg.name for seg in s] == ["imagenet_sketch", "probes@imagenet_sketch"]
    assert s.segments[0].num_samples == 8 and s.segments[1].num_samples == 4
    with pytest.raises(ConfigError, match="probes"):
        ctta.streams.create("imagenet_sketch", data_root=str(tmp_path), probes="clean")
