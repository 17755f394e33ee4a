"""The results database: SQLite in WAL mode, one row per received image, studies aggregated on query.

An image is stored (and committed) before the service says it was accepted, so a crash loses nothing it
acknowledged; the same image twice (same SOPInstanceUID, or same bytes) is stored once. WAL lets the worklist be
read while uploads are written.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL,
    sop_uid TEXT NOT NULL DEFAULT '',
    study_key TEXT NOT NULL,
    file_name TEXT NOT NULL DEFAULT '',
    patient_id TEXT NOT NULL DEFAULT '',
    accession TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    series_uid TEXT NOT NULL DEFAULT '',
    view TEXT NOT NULL DEFAULT '',
    study_date TEXT NOT NULL DEFAULT '',
    score REAL,
    normal_percentile REAL,
    flag TEXT NOT NULL,
    raw_score REAL,
    terms TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    outside_population INTEGER,
    population_distance REAL,
    source TEXT NOT NULL DEFAULT '',
    received_at TEXT NOT NULL,
    heatmap BLOB,
    thumbnail BLOB
);
CREATE UNIQUE INDEX IF NOT EXISTS images_sha256 ON images (sha256);
CREATE UNIQUE INDEX IF NOT EXISTS images_sop ON images (sop_uid) WHERE sop_uid != '';
CREATE INDEX IF NOT EXISTS images_study ON images (study_key);
"""
IMAGE_FIELDS = ("id", "sha256", "sop_uid", "study_key", "file_name", "patient_id", "accession", "study_uid", "series_uid",
                "view", "study_date", "score", "normal_percentile", "flag", "raw_score", "terms", "error",
                "outside_population", "population_distance", "source", "received_at")
# A study's flag, as `jobs.score.study_flag`: abnormal if any image is; error (needs review) if an image that should
# have been scored failed; normal only when every image to score was cleared; skipped when none was to be scored.
STUDY_FLAG_SQL = """CASE WHEN SUM(flag = 'abnormal') > 0 THEN 'abnormal' WHEN SUM(flag = 'error') > 0 THEN 'error'
                    WHEN SUM(flag = 'normal') > 0 THEN 'normal' ELSE 'skipped' END"""
FLAG_ORDER = {"error": 0, "abnormal": 1, "normal": 2, "skipped": 3}


class ResultStore:
    """Thread-safe (one connection, one lock: SQLite serialises writes anyway)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a killed process
            self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------------------------------- images

    def find(self, sha256: str | None = None, sop_uid: str | None = None) -> dict[str, Any] | None:
        """An image already stored, by content or by SOPInstanceUID."""
        with self._lock:
            row = None
            if sha256:
                row = self._db.execute(f"SELECT {', '.join(IMAGE_FIELDS)} FROM images WHERE sha256 = ?", (sha256,)).fetchone()
            if row is None and sop_uid:
                row = self._db.execute(f"SELECT {', '.join(IMAGE_FIELDS)} FROM images WHERE sop_uid = ?", (sop_uid,)).fetchone()
        return _image(row) if row else None

    def add(self, record: dict[str, Any], heatmap_png: bytes | None = None, thumbnail_png: bytes | None = None) -> tuple[int, bool]:
        """Store an image's result (committed on return); (its id, whether it is new). An image already there (same
        bytes or same SOPInstanceUID) is not stored again: its existing id comes back."""
        values = {k: record.get(k) for k in IMAGE_FIELDS if k != "id"}
        values["terms"] = json.dumps(record.get("terms") or {})
        values["received_at"] = record.get("received_at") or datetime.now(timezone.utc).isoformat(timespec="milliseconds")
        for k in ("sop_uid", "file_name", "patient_id", "accession", "study_uid", "series_uid", "view", "study_date", "error", "source"):
            values[k] = values[k] or ""
        values["heatmap"], values["thumbnail"] = heatmap_png, thumbnail_png
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._lock:
            cur = self._db.execute(f"INSERT OR IGNORE INTO images ({cols}) VALUES ({marks})", tuple(values.values()))
            if cur.rowcount == 1:
                return int(cur.lastrowid), True
            row = self._db.execute("SELECT id FROM images WHERE sha256 = ? OR (sop_uid != '' AND sop_uid = ?)",
                                   (values["sha256"], values["sop_uid"])).fetchone()
        return int(row["id"]), False

    def image(self, image_id: int) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(IMAGE_FIELDS)} FROM images WHERE id = ?", (image_id,)).fetchone()
        return _image(row) if row else None

    def picture(self, image_id: int, kind: str) -> bytes | None:
        """The stored heat-map overlay or thumbnail PNG of an image."""
        if kind not in ("heatmap", "thumbnail"):
            raise ValueError(kind)
        with self._lock:
            row = self._db.execute(f"SELECT {kind} FROM images WHERE id = ?", (image_id,)).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def count_images(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM images").fetchone()[0])

    # ------------------------------------------------------------------------------------------- studies

    def worklist(self, limit: int = 50, offset: int = 0, flag: str | None = None, date_from: str | None = None,
                 date_to: str | None = None) -> dict[str, Any]:
        """Studies, those needing review first (an image failed), then by score, highest first; paged; filtered by
        flag and by date (YYYYMMDD: the study date, or the day it was received)."""
        where, args = [], []
        if flag:
            where.append("flag = ?")
            args.append(flag)
        if date_from:
            where.append("date >= ?")
            args.append(date_from)
        if date_to:
            where.append("date <= ?")
            args.append(date_to)
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        with self._lock:
            total = self._db.execute(f"SELECT COUNT(*) FROM ({_STUDIES}) {cond}", args).fetchone()[0]
            rows = self._db.execute(
                f"SELECT * FROM ({_STUDIES}) {cond} ORDER BY flag = 'error' DESC, score IS NULL, score DESC, study_key "
                "LIMIT ? OFFSET ?", (*args, int(limit), int(offset))).fetchall()
        return {"total": int(total), "items": [dict(r) for r in rows]}

    def study(self, study_key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute(f"SELECT * FROM ({_STUDIES}) WHERE study_key = ?", (study_key,)).fetchone()
            if row is None:
                return None
            images = self._db.execute(f"SELECT {', '.join(IMAGE_FIELDS)} FROM images WHERE study_key = ? ORDER BY id",
                                      (study_key,)).fetchall()
        return {**dict(row), "images": [_image(r) for r in images]}

    def summary(self) -> dict[str, int]:
        """How many studies, and how many of them each flag holds (`normal` = auto-cleared at the operating point)."""
        with self._lock:
            rows = self._db.execute(f"SELECT flag, COUNT(*) FROM ({_STUDIES}) GROUP BY flag").fetchall()
        counts = {r[0]: int(r[1]) for r in rows}
        return {"studies": sum(counts.values()), **{k: counts.get(k, 0) for k in FLAG_ORDER}}


_STUDIES = f"""
SELECT study_key, MAX(patient_id) AS patient_id, MAX(accession) AS accession, MAX(study_uid) AS study_uid,
       MAX(study_date) AS study_date, COUNT(*) AS n_images, SUM(flag IN ('normal', 'abnormal')) AS n_scored,
       SUM(flag = 'skipped') AS n_skipped, SUM(flag = 'error') AS n_errors, MAX(score) AS score,
       {STUDY_FLAG_SQL} AS flag, MIN(received_at) AS received_at,
       COALESCE(NULLIF(MAX(study_date), ''), REPLACE(SUBSTR(MIN(received_at), 1, 10), '-', '')) AS date,
       (SELECT id FROM images AS j WHERE j.study_key = images.study_key ORDER BY j.score IS NULL, j.score DESC, j.id LIMIT 1) AS top_image,
       SUM(COALESCE(outside_population, 0)) AS outside_population
FROM images GROUP BY study_key
"""


def _image(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    out["terms"] = json.loads(out.get("terms") or "{}")
    return out
