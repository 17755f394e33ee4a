"""Shared fixtures: tiny generated image sets, so tests run in seconds on 2 CPU cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def blob_images(n: int, size: int, seed: int, abnormal: bool = False) -> np.ndarray:
    """uint8 (n, size, size): a smooth two-lobed 'chest' with jitter; abnormal ones carry a bright square."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        cx = 0.5 + rng.normal(0, 0.02)
        left = np.exp(-(((xx - cx + 0.2) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
        right = np.exp(-(((xx - cx - 0.2) / 0.12) ** 2 + ((yy - 0.5) / 0.25) ** 2))
        img = 0.8 - 0.5 * (left + right) + rng.normal(0, 0.02, (size, size))
        if abnormal:
            r0, c0 = rng.integers(size // 4, size // 2, 2)
            img[r0 : r0 + size // 5, c0 : c0 + size // 5] = 1.0
        out[i] = np.clip(img * 255, 0, 255).astype(np.uint8)
    return out


def write_folder_dataset(root: Path, size: int = 32, n_train: int = 24, n_eval: int = 6) -> Path:
    """`root/{train,val,test}/{normal,abnormal}/*.png` of blob images."""
    seed = 0
    for split, n_norm, n_abn in (("train", n_train, 0), ("val", n_eval, n_eval), ("test", n_eval, n_eval)):
        for cls, n, abnormal in (("normal", n_norm, False), ("abnormal", n_abn, True)):
            if n == 0:
                continue
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            seed += 1
            for i, img in enumerate(blob_images(n, size, seed, abnormal)):
                Image.fromarray(img).save(d / f"{cls}_{i:03d}.png")
    return root


def write_dx(path: Path, study_uid: str, view: str = "PA", patient: str = "PAT-1", accession: str | None = None,
             pixels: np.ndarray | None = None, seed: int = 0):
    """A DX image as a modality or a PACS export has it (no file extension needed): MONOCHROME2, 16 bits allocated
    (12 stored); `pixels` uint8 (scaled to 12 bits) or uint16 as is, else a blob image of `seed`."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    if pixels is None:
        pixels = blob_images(1, 64, seed=seed)[0]
    if pixels.dtype == np.uint8:
        pixels = pixels.astype(np.uint16) * 16
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"Test^{patient}", patient, "19700101", "O"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study_uid, "20261130", "101500", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = accession or f"ACC-{patient}", ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 1 if view == "PA" else 2, 1
    ds.Modality, ds.ViewPosition, ds.BodyPartExamined = "DX", view, "CHEST"
    ds.PresentationIntentType, ds.PatientOrientation, ds.ImageType = "FOR PRESENTATION", ["P", "F"], ["ORIGINAL", "PRIMARY"]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return ds


# A tiny trained run (best preset, 32 px, width 8, one epoch) for the tests of what uses a run: the service, the
# DICOM receiver, the PACS workflow. Trained once per test session; tests must not write into it.
# The default preset trains the lesion detector too: a tiny one here (its own tests use more steps).
TINY = ["--image-size", "32", "--width", "8", "--batch-size", "8", "--threads", "1", "--epochs", "1",
        "--detector-width", "4", "--detector-steps", "8"]
PHANTOM = "phantom:n_train=48,n_val_normal=16,n_val_abnormal=16,n_test_normal=4,n_test_abnormal=4,size=32"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    from cxr_oneclass.cli import main

    out = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["-q", "train", "--data", PHANTOM, "--out", str(out), *TINY]) == 0
    return out


def free_port() -> int:
    """A free TCP port on localhost, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    """A private decode cache for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("CXR_ONECLASS_CACHE", str(d))
    return d


@pytest.fixture
def counted(monkeypatch) -> list[str]:
    """Names of the files actually decoded (data.decode.load_image wrapped)."""
    calls: list[str] = []
    from cxr_oneclass.data import decode as sources

    real = sources.load_image

    def spy(path, size):
        calls.append(Path(path).name)
        return real(path, size)

    monkeypatch.setattr(sources, "load_image", spy)
    return calls


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    return write_folder_dataset(tmp_path / "data")


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "nih-pneumonia-128" / "manifest.csv").is_file():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep the decode cache of every test out of the user's ~/.cache."""
    monkeypatch.setenv("CXR_ONECLASS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _cpu_unless_marked_cuda(request, monkeypatch):
    """Tests run as on a CPU machine (the CI's) even where a GPU is present: device 'auto' resolves to the CPU,
    so seeded runs are bit-repeatable and CPU references compare exactly. Tests marked `cuda` see the GPU."""
    if request.node.get_closest_marker("cuda") is None:
        import torch

        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="session")
def bench_quick(tmp_path_factory) -> Path:
    """`make bench ARGS=--quick` (every benchmark as a smoke test, about a minute) into a temp folder, once per
    session; with this interpreter (PY=) and no set-up step (STAMP=), so it runs wherever the tests do."""
    import shutil
    import subprocess
    import sys

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    out = tmp_path_factory.mktemp("bench")
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run(["make", "-s", "bench", "ARGS=--quick", f"BENCH_OUT={out}", f"PY={sys.executable}", "STAMP="],
                         cwd=root, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    return out
