"""Writes a run folder as the run goes: per-step, per-segment and per-group CSVs and per-segment details appended
at each segment's end, so an interrupted run keeps everything it finished."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import pandas as pd

from .health import COLLAPSE_THRESHOLD, is_collapsed
from .online import SegmentRecord

STEP_COLUMNS = ["segment_index", "segment", "kind", "role", "step", "step_in_segment", "n", "correct",
                "accuracy", "error", "cumulative_accuracy", "rolling_accuracy"]
SEGMENT_COLUMNS = ["segment_index", "segment", "kind", "role", "n", "accuracy", "error", "seconds",
                   "images_per_s", "mean_confidence", "ece", "after", "groups", "meta", "nonfinite", "collapse_ratio",
                   "collapsed"]
GROUP_COLUMNS = ["segment_index", "segment", "kind", "role", "after", "group", "n", "correct", "accuracy", "error",
                 "mean_confidence"]
DETAILS = "segment_details.jsonl"


def _jsonable(value: Any) -> Any:
    """Segment metadata as JSON: anything json cannot encode becomes its string."""
    return json.loads(json.dumps(value, default=str))


class Recorder:
    """Keeps the rows in memory and, when given a folder, appends them to ``steps.csv`` / ``segments.csv`` /
    ``groups.csv`` / ``segment_details.jsonl`` (confusion matrix, per-class accuracy, ECE of each segment).

    ``window``: steps in the rolling mean of ``steps.csv`` (restarts at each segment); ``collapse_threshold``:
    a segment is marked ``collapsed`` when its ``collapse_ratio`` is below it (see ``evaluation/health.py``).
    """

    def __init__(self, out: Optional[Path] = None, window: int = 10, num_classes: Optional[int] = None,
                 collapse_threshold: float = COLLAPSE_THRESHOLD) -> None:
        self.out = Path(out) if out is not None else None
        self.window = window
        self.num_classes = num_classes
        self.collapse_threshold = collapse_threshold
        self.step_rows: List[Dict[str, Any]] = []
        self.last: Optional[tuple] = None  # (steps, row) of the segment added last
        self.segment_rows: List[Dict[str, Any]] = []
        self.group_rows: List[Dict[str, Any]] = []
        self.details: List[Dict[str, Any]] = []
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)

    @property
    def next_step(self) -> int:
        return len(self.step_rows)

    def restore(self, keep_segments: int) -> None:
        """On resume: reload the files and drop rows of segments at or after ``keep_segments`` (not checkpointed)."""
        assert self.out is not None
        for name, rows, cols in (("steps.csv", self.step_rows, STEP_COLUMNS),
                                 ("segments.csv", self.segment_rows, SEGMENT_COLUMNS),
                                 ("groups.csv", self.group_rows, GROUP_COLUMNS)):
            path = self.out / name
            rows.clear()
            if path.is_file() and path.stat().st_size:
                df = read_table(path)
                df = df[df["segment_index"] < keep_segments]
                rows.extend(df.to_dict("records"))
            self._rewrite(path, rows, cols)
        path = self.out / DETAILS
        self.details.clear()
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip():
                    d = json.loads(line)
                    if d["segment_index"] < keep_segments:
                        self.details.append(d)
        path.write_text("".join(json.dumps(d) + "\n" for d in self.details))

    def _step_rows(self, index: int, name: str, kind: str, role: str, rec: SegmentRecord) -> List[Dict[str, Any]]:
        start = self.next_step
        # cumulative online accuracy over the steps of this kind so far (eval: within the segment)
        prev = [r for r in self.step_rows if r["kind"] == kind] if kind != "eval" else []
        cum_n = sum(int(r["n"]) for r in prev)
        cum_c = sum(int(r["correct"]) for r in prev)
        sizes, correct = rec.step_sizes.tolist(), rec.step_correct.tolist()
        steps = []
        for i, (n, c) in enumerate(zip(sizes, correct)):
            acc = c / n if n else float("nan")
            cum_n, cum_c = cum_n + n, cum_c + c
            lo = max(0, i - self.window + 1)
            wn, wc = sum(sizes[lo:i + 1]), sum(correct[lo:i + 1])
            steps.append({"segment_index": index, "segment": name, "kind": kind, "role": role, "step": start + i,
                          "step_in_segment": i, "n": n, "correct": c, "accuracy": acc, "error": 1 - acc,
                          "cumulative_accuracy": cum_c / cum_n if cum_n else float("nan"),
                          "rolling_accuracy": wc / wn if wn else float("nan")})
        return steps

    def add_segment(self, index: int, name: str, kind: str, role: str, rec: SegmentRecord, seconds: float,
                    meta: Optional[Mapping[str, Any]] = None, groups: Optional[Sequence[str]] = None) -> None:
        """Append one finished segment: its steps, its row, its groups' rows and its details."""
        meta = _jsonable(dict(meta or {}))
        after = meta.get("after")
        after = None if after is None else str(after)
        steps = self._step_rows(index, name, kind, role, rec)
        ece = rec.ece()
        ratio = rec.collapse_ratio()
        seg = {"segment_index": index, "segment": name, "kind": kind, "role": role, "n": rec.n,
               "accuracy": rec.accuracy, "error": 1 - rec.accuracy, "seconds": seconds,
               "images_per_s": rec.n / seconds if seconds > 0 else float("nan"),
               "mean_confidence": float(rec.confidence.mean()) if rec.confidence.size else float("nan"),
               "ece": ece, "after": after, "groups": json.dumps(list(groups)) if groups else None,
               "meta": json.dumps(meta) if meta else None, "nonfinite": rec.nonfinite, "collapse_ratio": ratio,
               "collapsed": is_collapsed(ratio, self.collapse_threshold)}
        grows = [{"segment_index": index, "segment": name, "kind": kind, "role": role, "after": after, **g,
                  "error": 1 - g["accuracy"]} for g in rec.group_rows(groups or [])]
        classes = self.num_classes or 0
        confusion = rec.confusion(classes) if rec.n else None
        detail = {"segment_index": index, "segment": name, "ece": ece,
                  "per_class_accuracy": rec.per_class_accuracy(classes) if rec.n else [],
                  "confusion": confusion.tolist() if confusion is not None else []}
        self.step_rows.extend(steps)
        self.segment_rows.append(seg)
        self.last = (steps, seg)
        self.group_rows.extend(grows)
        self.details.append(detail)
        if self.out is not None:
            self._append(self.out / "steps.csv", steps, STEP_COLUMNS)
            self._append(self.out / "segments.csv", [seg], SEGMENT_COLUMNS)
            if grows or (self.out / "groups.csv").is_file():
                self._append(self.out / "groups.csv", grows, GROUP_COLUMNS)
            with (self.out / DETAILS).open("a") as f:
                f.write(json.dumps(detail) + "\n")

    def steps(self) -> pd.DataFrame:
        return pd.DataFrame(self.step_rows, columns=STEP_COLUMNS)

    def last_segment(self) -> tuple:
        """The steps (a DataFrame) and the row of the segment added last: what trackers mirror, without rebuilding
        the whole tables after every segment."""
        steps, seg = self.last
        return pd.DataFrame(steps, columns=STEP_COLUMNS), dict(seg)

    def segments(self) -> pd.DataFrame:
        return pd.DataFrame(self.segment_rows, columns=SEGMENT_COLUMNS)

    def groups(self) -> pd.DataFrame:
        return pd.DataFrame(self.group_rows, columns=GROUP_COLUMNS)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        if self.out is not None:
            (self.out / "summary.json").write_text(json.dumps(_clean(summary), indent=2, default=float))

    @staticmethod
    def _append(path: Path, rows: List[Dict[str, Any]], cols: List[str]) -> None:
        new = not path.is_file() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerows(rows)
            f.flush()

    @staticmethod
    def _rewrite(path: Path, rows: List[Dict[str, Any]], cols: List[str]) -> None:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


def read_table(path: Path) -> pd.DataFrame:
    """Read a run-folder CSV back: names stay strings, empty text cells become None."""
    df = pd.read_csv(path, dtype={c: str for c in ("segment", "group", "after", "groups", "meta")})
    for c in ("after", "groups", "meta"):
        if c in df:
            df[c] = df[c].astype(object).where(df[c].notna(), None)
    return df


def _clean(value: Any) -> Any:
    """NaN -> null so that summary.json is strict JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value
