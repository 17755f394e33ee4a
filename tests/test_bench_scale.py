"""`benchmarks/scale.py --quick` (run by `make bench ARGS=--quick`, the `bench_quick` fixture of test_bench.py) writes
a sane JSON (a smoke test: the figures are not checked against the issue's bars; the full benchmark is run and
recorded, not timed here); its image cache and synthetic manifest."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scale_quick_writes_sane_json(bench_quick):
    images = bench_quick / "scale-images"
    data = json.loads((bench_quick / "scale.json").read_text())

    assert data["quick"] is True and data["targets"] == {}  # a smoke test checks no thresholds
    env = data["env"]
    assert env["cpus"] >= 1 and len(env["load_before"]) == 3 and env["torch"] and env["onnxruntime"]
    assert data["model"]["kind"] == "run" and data["model"]["image_size"] == 32 and data["trained"]["seconds"] > 0

    sizes = data["sizes"]
    assert [r["n"] for r in sizes] == [200, 1000]
    assert data["images"]["count"] >= 1000 and data["images"]["px"] == 128
    assert len(list((images / "all").rglob("*.png"))) == data["images"]["count"]
    for r in sizes:
        s, m = r["score"], r["model_only"]
        assert s["csv"]["ok"] and s["csv"]["rows"] == s["csv"]["unique_files"] == r["n"]
        assert sum(s["csv"]["flags"].values()) == r["n"] and set(s["csv"]["flags"]) <= {"normal", "abnormal"}
        assert s["images_per_s"] > 0 and s["peak_rss_mb"] > 0 and s["cpu_s"] > 0 and s["rss_samples"]
        assert 0 < s["ready_s"] < s["wall_s"]
        assert m["n"] == r["n"] and m["images_per_s"] > 0 and m["images_per_cpu_s"] > 0 and m["peak_rss_mb"] > 0
        assert m["decode"]["cpu_ms_per_image"] > 0 and m["records_images_per_s"] > 0 and m["torch_threads"] == 1
        assert r["ratio"] > 0 and 0 < r["ratio_bound"] <= 1
    assert Path(sizes[0]["folder"]).name == "n200"  # the smaller size scores a subset of the generated images
    summary = data["summary"]
    assert summary["rss_growth_from_to"] == [200, 1000] and isinstance(summary["rss_growth_mb"], float)
    assert len(summary["marginal"]) == 1

    mf = data["manifest"]
    assert mf["rows"] == mf["usable"] == mf["synthetic"]["rows"] == 5000
    assert mf["seconds"] > 0 and mf["peak_rss_mb"] > 0 and set(mf["stages_s"]) >= {"index_files", "read_label_file", "split_by_patient"}
    assert mf["chosen"] == sum(mf["splits"].values()) > 0 and mf["splits"].get("train_normal", 0) > 0
    assert set(mf["splits"]) <= {"train_normal", "val_normal", "val_abnormal", "test_normal", "test_abnormal"}


def _scale_module():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = mod  # its process pool pickles functions by module name
    spec.loader.exec_module(mod)
    return mod


def test_images_are_generated_once_and_subsets_link_them(tmp_path):
    scale = _scale_module()
    first = scale.ensure_images(tmp_path, 600, 64)
    assert first["count"] == 600 and first["generated"] == 600 and first["px"] == 64
    again = scale.ensure_images(tmp_path, 550, 64)
    assert again["generated"] == 0 and again["count"] == 600  # reused, not rendered again
    folder = scale.subset(tmp_path, 250, again["count"])
    files = sorted(folder.rglob("*.png"))
    assert len(files) == 250 and files[-1].name == "img_000249.png"
    assert files[0].stat().st_ino == scale.image_path(tmp_path / "all", 0).stat().st_ino  # a hard link, no copy
    assert scale.subset(tmp_path, 600, 600) == tmp_path / "all"


def test_synthetic_manifest_is_shaped_like_the_release(tmp_path):
    from cxr_oneclass.data import nih

    scale = _scale_module()
    made = scale.write_manifest(tmp_path, 3000)
    assert made["rows"] == 3000 and made["patients"] == round(3000 * 30805 / 112120)
    rows, counts, names = nih.read_label_file(tmp_path / "Data_Entry_2017.csv", set(nih.FINDINGS), None)
    assert counts["rows"] == len(rows) == len(names) == 3000
    assert len(list(tmp_path.glob("images_0*/images/*.png"))) == 3000
    normal = sum(r["label"] == "0" for r in rows) / len(rows)
    assert 0.45 < normal < 0.62  # 'No Finding' is 54% of the release
    assert {r["view"] for r in rows} == {"PA", "AP"} and {r["sex"] for r in rows} == {"M", "F"}
