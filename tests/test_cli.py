"""The command line end to end on temporary data, and each bad input's one-line error."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from ctta.cli import main


def _run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_end_to_end_writes_every_output(tmp_path, npz_dataset, capsys):
    out = tmp_path / "run"
    code, stdout, err = _run(capsys, "--stream", "cifar10c", "--strategy", "source,tent", "--backbone", "tiny_cnn",
                             "--data-root", str(npz_dataset), "--corruptions", "gaussian_noise,contrast",
                             "--num-samples", "20", "--batch-size", "10", "--device", "cpu", "--out", str(out),
                             "--no-progress", "-q", "--set", "strategy.lr=0.01")
    assert code == 0, err
    assert "gaussian" in stdout and "mean" in stdout and "tent" in stdout
    for strategy in ("source", "tent"):
        d = out / strategy
        for f in ("steps.csv", "segments.csv", "domains.csv", "summary.json", "config.yaml", "accuracy_over_time.png"):
            assert (d / f).is_file(), (strategy, f)
        steps = pd.read_csv(d / "steps.csv")
        assert len(steps) == 2 * 2 + 2 * 2  # 2 domains + 2 clean probes, 2 batches each
        assert json.loads((d / "summary.json").read_text())["stream_spec"]["num_samples"] == 20
    assert (out / "comparison.csv").is_file() and (out / "accuracy_over_time.png").is_file()
    assert "lr: 0.01" in (out / "tent" / "config.yaml").read_text()


def test_cli_list(capsys):
    code, out, _ = _run(capsys, "list")
    assert code == 0
    for name in ("cifar10c", "digits_c", "cotta", "tent", "bn", "source", "resnet20_cifar", "wrn28_10_cifar"):
        assert name in out


@pytest.mark.parametrize("args, message", [
    (["--stream", "cifar10x", "--strategy", "tent"], "unknown stream 'cifar10x'. Did you mean 'cifar10c'?"),
    (["--stream", "cifar10c", "--strategy", "tnet"], "unknown strategy 'tnet'. Did you mean 'tent'?"),
    (["--stream", "cifar10c", "--strategy", "tent", "--set", "strategy.momentum=3"], "no hyperparameter 'momentum'"),
    (["--stream", "cifar10c", "--strategy", "tent", "--set", "stream.sevrity=3"], "stream 'cifar10c' has no option 'sevrity'"),
    (["--stream", "cifar10c", "--strategy", "tent", "--device", "tpu"], "device"),
    (["--stream", "cifar10c", "--strategy", "tent", "--corruptions", "gausian_noise"], "unknown corruption"),
    (["--stream", "cifar10c", "--strategy", "tent", "--order", "sideways"], "order must be one of"),
    (["--stream", "cifar10c", "--strategy", "finetune"], "strategy 'finetune' cannot run stream 'cifar10c'"),
])
def test_cli_bad_input_is_one_line(tmp_path, npz_dataset, capsys, args, message):
    code, _, err = _run(capsys, "--corruptions", "gaussian_noise", *args, "--data-root", str(npz_dataset),
                        "--backbone", "tiny_cnn", "--no-progress",
                        "-q", "--out", str(tmp_path / "r"))
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--severity", "6"], "severity must be an integer from 1 to 5"),
    (["--batch-size", "0"], "expected a positive integer"),
])
def test_cli_bad_numbers(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["--stream", "cifar10c", "--strategy", "tent", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_missing_dataset_says_where_and_how(tmp_path, capsys):
    code, _, err = _run(capsys, "--stream", "cifar10c", "--strategy", "source", "--data-root", str(tmp_path / "nope"),
                        "--corruptions", "contrast", "--backbone", "tiny_cnn", "-q", "--no-progress")
    assert code == 2 and str(tmp_path / "nope") in err and "download" in err


def test_cli_checkpoint_that_does_not_fit(tmp_path, npz_dataset, capsys):
    import torch

    bad = tmp_path / "bad.th"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, bad)
    code, _, err = _run(capsys, "--stream", "cifar10c", "--strategy", "source", "--data-root", str(npz_dataset),
                        "--corruptions", "contrast", "--backbone", "resnet20_cifar", "--weights", str(bad), "-q",
                        "--no-progress")
    assert code == 2 and "conv1.weight" in err


def test_cli_malformed_config(tmp_path, capsys):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("stream:\n  name: cifar10c\n strategy: tent\n")
    code, _, err = _run(capsys, "--config", str(cfg))
    assert code == 2 and "not valid YAML" in err


def test_cli_resume_after_a_finished_run_gives_the_same_table(tmp_path, npz_dataset, capsys):
    args = ["--stream", "cifar10c", "--strategy", "source,bn", "--backbone", "tiny_cnn", "--data-root",
            str(npz_dataset), "--corruptions", "contrast", "--num-samples", "20", "--batch-size", "10", "--device",
            "cpu", "--out", str(tmp_path / "r"), "--no-progress", "-q"]
    assert main(args) == 0
    first = (tmp_path / "r" / "comparison.csv").read_text()
    (tmp_path / "r" / "bn" / "checkpoint.pt").unlink()  # as if interrupted before bn started
    assert main(args + ["--resume"]) == 0
    capsys.readouterr()
    assert (tmp_path / "r" / "comparison.csv").read_text().split("\n")[1].split(",")[:3] == \
        first.split("\n")[1].split(",")[:3]


def test_cli_corrupt_writes_the_c_layout(tmp_path, capsys):
    import numpy as np

    out = tmp_path / "digits-c"
    code, _, err = _run(capsys, "corrupt", "--dataset", "digits", "--out", str(out), "--corruptions",
                        "gaussian_noise,frost", "--device", "cpu", "--batch-size", "250", "--no-progress", "-q")
    assert code == 0, err
    noise, labels = np.load(out / "gaussian_noise.npy"), np.load(out / "labels.npy")
    assert noise.dtype == np.uint8 and noise.shape[1:] == (16, 16, 3) and noise.shape[0] == labels.shape[0]
    n = noise.shape[0] // 5
    from ctta.streams.corruptions import corrupt
    from ctta.streams.digits import load_digits

    clean = load_digits(train=False)
    assert n == len(clean)
    x8 = clean.images.permute(0, 2, 3, 1).numpy().astype(int)
    change = [np.abs(noise[s * n:(s + 1) * n].astype(int) - x8).mean() for s in range(5)]
    assert change == sorted(change) and change[4] > 2 * change[0]  # severities 1..5 stacked in order
    # the files hold what the engine generates for the same seed (and so what a generated stream sees)
    again = corrupt(clean.images[:7].float() / 255, "gaussian_noise", 3, seed=0)
    assert np.array_equal((again * 255).round().byte().permute(0, 2, 3, 1).numpy(), noise[2 * n:2 * n + 7])
    mtime = (out / "frost.npy").stat().st_mtime_ns
    assert _run(capsys, "corrupt", "--dataset", "digits", "--out", str(out), "--corruptions", "frost",
                "--device", "cpu", "--no-progress", "-q")[0] == 0
    assert (out / "frost.npy").stat().st_mtime_ns == mtime  # complete files are kept (resume)


def test_cli_corrupt_bad_input_is_one_line(tmp_path, capsys):
    code, _, err = _run(capsys, "corrupt", "--dataset", "imagenet21k", "--out", str(tmp_path), "-q")
    assert code == 2 and "unknown dataset 'imagenet21k'" in err and len(err.strip().splitlines()) == 1
    code, _, err = _run(capsys, "corrupt", "--dataset", "digits", "--out", str(tmp_path), "--corruptions",
                        "fogg", "-q")
    assert code == 2 and "unknown corruption 'fogg'" in err


def test_unknown_names_are_listed_under_a_proper_plural(tmp_path, npz_dataset, capsys):
    from ctta.registry import plural

    assert [plural(k) for k in ("strategy", "stream", "backbone", "corruption")] == \
        ["strategies", "streams", "backbones", "corruptions"]
    code, _, err = _run(capsys, "--stream", "cifar10c", "--strategy", "tnet", "--data-root", str(npz_dataset),
                        "--corruptions", "gaussian_noise", "--backbone", "tiny_cnn", "--no-progress", "-q",
                        "--out", str(tmp_path / "r"))
    assert code == 2 and "Valid strategies: " in err and "strategys" not in err


def test_cli_list_shows_whole_descriptions_wrapped_and_the_stream_choices(capsys):
    from ctta import strategies
    from ctta.streams.label_shift import KINDS
    from ctta.streams.orders import ORDERS

    code, out, _ = _run(capsys, "list")
    assert code == 0 and max(len(line) for line in out.splitlines()) <= 120
    flat = " ".join(out.split())
    # joint's first docstring paragraph spans three lines; all of it is shown, up to its full stop
    assert strategies.STRATEGIES.describe("joint").endswith("(``mode: streaming``).")
    assert strategies.STRATEGIES.describe("joint") in flat
    block = " ".join(out.split("  cifar10c ")[1].split("  cifar10c_di")[0].split())
    assert f"Orders: {', '.join(ORDERS)}." in block and f"Label shift: {', '.join(KINDS)}." in block
    assert "Orders:" not in " ".join(out.split("  cifar10_ci ")[1].split("  cifar10_gilcd")[0].split())


def test_result_table_and_report_show_rounded_percent_files_keep_precision(tmp_path):
    import torch

    import ctta
    from ctta.evaluation import metrics_table

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(30, 3, 16, 16, generator=g), torch.arange(30) % 10
    stream = ctta.streams.from_tensors([x, x.flip(-1)], [y, y], domains=["plain", "flipped"], kind="adapt")
    model = ctta.backbones.create("tiny_cnn", num_classes=10)
    result = ctta.run(stream, ctta.strategies.create("bn", model), device="cpu", out=tmp_path / "r", progress=False)
    table = result.table()
    s = result.summary
    assert table.loc["bn", "mean"] == round(100 * s["mean_error"], 1)
    num = table.select_dtypes("number")
    assert ((num * 10).round() == num * 10).all().all(), "every displayed value has at most one decimal"
    saved = pd.read_csv(tmp_path / "r" / "domains.csv", index_col=0)
    assert saved.loc["bn", "plain"] == pytest.approx(100 * s["domain_error"]["plain"], abs=1e-9)  # full precision
    m = metrics_table(s)
    assert m.loc["mean_error", "unit"] == "%" and m.loc["mean_error", "value"] == f"{100 * s['mean_error']:.1f}"
    assert m.loc["adapt_images_per_s", "unit"] == "img/s"
    page = (tmp_path / "r" / "report.html").read_text()
    assert "accuracy and error in %" in page and f"{s['mean_error']:.4g}" not in page


def test_final_lines_name_files_that_exist_and_a_time_estimate_is_logged(tmp_path, npz_dataset, capsys, caplog):
    import logging
    import re
    from pathlib import Path

    out = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="ctta")
    code, stdout, err = _run(capsys, "--stream", "cifar10c", "--strategy", "source,bn", "--backbone", "tiny_cnn",
                             "--data-root", str(npz_dataset), "--corruptions", "gaussian_noise,contrast",
                             "--num-samples", "20", "--batch-size", "10", "--device", "cpu", "--out", str(out),
                             "--no-progress", "-q")
    assert code == 0, err
    tail = stdout.split("Run folders")[1]
    named = [Path(p) for p in re.findall(r"(\S+\.html)", tail.split("Reports (open in a browser):")[1])]
    assert set(named) == {out / "source" / "report.html", out / "bn" / "report.html", out / "comparison.html"}
    assert all(p.is_file() for p in named)
    listed = re.search(r"\(([^)]*)\)", tail).group(1).split(", ")
    assert "report.html" in listed and all((out / "bn" / f).is_file() for f in listed)
    # the run's duration, estimated once from a measured batch: 2 domains x 20 images of adapt steps
    estimates = [r.getMessage() for r in caplog.records if "img/s (measured on batch" in r.getMessage()]
    assert len(estimates) == 2 and estimates[0].startswith("source on cifar10c: about ")
    assert "for 40 images at" in estimates[0] and "measured on batch 2 of gaussian_noise-5" in estimates[0]
