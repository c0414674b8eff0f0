"""Writes a run folder as the run goes: per-step and per-segment CSVs appended at each segment's end."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd

from .online import SegmentRecord

STEP_COLUMNS = ["segment_index", "segment", "kind", "role", "step", "step_in_segment", "n", "correct",
                "accuracy", "error"]
SEGMENT_COLUMNS = ["segment_index", "segment", "kind", "role", "n", "accuracy", "error", "seconds",
                   "images_per_s", "mean_confidence"]


class Recorder:
    """Keeps the rows in memory and, when given a folder, appends them to ``steps.csv`` / ``segments.csv``."""

    def __init__(self, out: Optional[Path] = None) -> None:
        self.out = Path(out) if out is not None else None
        self.step_rows: List[Dict[str, Any]] = []
        self.segment_rows: List[Dict[str, Any]] = []
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)

    @property
    def next_step(self) -> int:
        return len(self.step_rows)

    def restore(self, keep_segments: int) -> None:
        """On resume: reload the CSVs and drop rows of segments at or after ``keep_segments`` (not checkpointed)."""
        assert self.out is not None
        for name, rows, cols in (("steps.csv", self.step_rows, STEP_COLUMNS),
                                 ("segments.csv", self.segment_rows, SEGMENT_COLUMNS)):
            path = self.out / name
            rows.clear()
            if path.is_file() and path.stat().st_size:
                df = pd.read_csv(path)
                df = df[df["segment_index"] < keep_segments]
                rows.extend(df.to_dict("records"))
            self._rewrite(path, rows, cols)

    def add_segment(self, index: int, name: str, kind: str, role: str, rec: SegmentRecord, seconds: float) -> None:
        start = self.next_step
        steps = []
        for i, (n, c) in enumerate(zip(rec.step_sizes.tolist(), rec.step_correct.tolist())):
            acc = c / n if n else float("nan")
            steps.append({"segment_index": index, "segment": name, "kind": kind, "role": role, "step": start + i,
                          "step_in_segment": i, "n": n, "correct": c, "accuracy": acc, "error": 1 - acc})
        seg = {"segment_index": index, "segment": name, "kind": kind, "role": role, "n": rec.n,
               "accuracy": rec.accuracy, "error": 1 - rec.accuracy, "seconds": seconds,
               "images_per_s": rec.n / seconds if seconds > 0 else float("nan"),
               "mean_confidence": float(rec.confidence.mean()) if rec.confidence.size else float("nan")}
        self.step_rows.extend(steps)
        self.segment_rows.append(seg)
        if self.out is not None:
            self._append(self.out / "steps.csv", steps, STEP_COLUMNS)
            self._append(self.out / "segments.csv", [seg], SEGMENT_COLUMNS)

    def steps(self) -> pd.DataFrame:
        return pd.DataFrame(self.step_rows, columns=STEP_COLUMNS)

    def segments(self) -> pd.DataFrame:
        return pd.DataFrame(self.segment_rows, columns=SEGMENT_COLUMNS)

    def write_summary(self, summary: Dict[str, Any]) -> None:
        if self.out is not None:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))

    @staticmethod
    def _append(path: Path, rows: List[Dict[str, Any]], cols: List[str]) -> None:
        new = not path.is_file() or path.stat().st_size == 0
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            if new:
                w.writeheader()
            w.writerows(rows)
            f.flush()

    @staticmethod
    def _rewrite(path: Path, rows: List[Dict[str, Any]], cols: List[str]) -> None:
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
