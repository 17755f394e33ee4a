"""The DICOM receiver (`listen`) against a real DICOM client, dcmtk's echoscu and storescu: images sent are scored
into the results database by study, once; laterals are skipped, bad images stored as errors; calling AE titles off
the allow-list are rejected; each scored study's SR is sent back to a storage SCP; 100 studies in one association."""

from __future__ import annotations

import logging
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ComprehensiveSRStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, StoragePresentationContexts, evt

from conftest import write_dx
from cxr_oneclass.errors import CxrError
from cxr_oneclass.jobs.listen import listen
from cxr_oneclass.service.dicom_scp import STATUS_CANNOT_PROCESS, Receiver
from cxr_oneclass.service.triage import Triage

log = logging.getLogger(__name__)

SCU = "TESTSCU"
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None or shutil.which("echoscu") is None,
                                 reason="dcmtk (echoscu, storescu) is not installed")


def storescu(port: int, *files: Path | str, aet: str = SCU, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    cmd = ["storescu", "-aet", aet, "-aec", "CXR1C", *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def run(tiny_run) -> Path:
    return tiny_run


@pytest.fixture
def triage(run, tmp_path):
    t = Triage(run, tmp_path / "triage.sqlite")
    yield t
    t.close()


@pytest.fixture
def receiver(triage, tmp_path):
    # port 0: the system picks a free one, no race with other processes; received files spool in tmp_path
    r = Receiver(triage, port=0, tmp_dir=tmp_path / "spool")
    r.start()
    yield r
    r.stop()


@pytest.fixture
def sr_sink():
    """A second storage SCP, where SRs are sent back: (its port, the datasets it received)."""
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    ae = AE(ae_title="SRSINK")
    ae.supported_contexts = StoragePresentationContexts
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    yield int(server.server_address[1]), received
    ae.shutdown()


def wait_for(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


@needs_dcmtk
def test_echo_succeeds(receiver):
    res = subprocess.run(["echoscu", "-aet", SCU, "-aec", "CXR1C", "127.0.0.1", str(receiver.port)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr


@needs_dcmtk
def test_stored_images_are_scored_listed_by_study_and_never_twice(receiver, triage, tmp_path):
    studies = {generate_uid(): [], generate_uid(): []}
    for k, (uid, files) in enumerate(studies.items()):
        for i in range(2):  # two PA images a study (say, a repeat)
            path = tmp_path / "in" / f"s{k}_{i}.dcm"
            write_dx(path, uid, seed=10 * k + i, patient=f"PAT-{k}")
            files.append(path)
    files = [p for fs in studies.values() for p in fs]
    res = storescu(receiver.port, *files)
    assert res.returncode == 0, res.stderr

    store = triage.store
    assert store.count_images() == 4
    items = store.worklist(limit=100)["items"]
    assert {it["study_uid"] for it in items} == set(studies)
    assert all(it["n_images"] == 2 and it["n_scored"] == 2 and it["flag"] in ("normal", "abnormal") for it in items)
    for uid in studies:
        study = store.study(uid)
        assert study is not None and all(im["score"] is not None and im["source"] == f"dicom:{SCU}" for im in study["images"])
        assert {im["file_name"] for im in study["images"]} == {f"{pydicom.dcmread(p).SOPInstanceUID}.dcm" for p in studies[uid]}

    res = storescu(receiver.port, *files)  # the same images again: acknowledged, not stored twice
    assert res.returncode == 0, res.stderr
    assert store.count_images() == 4 and store.worklist(limit=100)["total"] == 2
    assert receiver.received == 8 and receiver.failed == 0
    assert not list(receiver.tmp_dir.iterdir())  # every received file deleted once stored


@needs_dcmtk
def test_lateral_is_stored_as_skipped(receiver, triage, tmp_path):
    ds = write_dx(tmp_path / "lat.dcm", generate_uid(), view="LL")
    res = storescu(receiver.port, tmp_path / "lat.dcm")
    assert res.returncode == 0, res.stderr
    rec = triage.store.find(sop_uid=str(ds.SOPInstanceUID))
    assert rec is not None and rec["flag"] == "skipped" and rec["view"] == "LATERAL" and rec["score"] is None
    assert triage.store.study(str(ds.StudyInstanceUID))["flag"] == "skipped"


@needs_dcmtk
def test_bad_image_is_acknowledged_and_stored_as_error(receiver, triage, tmp_path):
    """A receipt is not a verdict: an image that cannot be decoded is stored as an error (needs review), and the
    sender is told it was received, so that it does not retry forever."""
    ds = write_dx(tmp_path / "bad.dcm", generate_uid())
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 4]  # a quarter of the pixels the header promises
    ds.save_as(tmp_path / "bad.dcm", enforce_file_format=True)
    res = storescu(receiver.port, tmp_path / "bad.dcm")
    assert res.returncode == 0, res.stderr
    rec = triage.store.find(sop_uid=str(ds.SOPInstanceUID))
    assert rec is not None and rec["flag"] == "error" and rec["error"]


@needs_dcmtk
def test_implicit_vr_and_compressed_transfer_syntaxes_are_scored(receiver, triage, tmp_path):
    implicit = write_dx(tmp_path / "implicit.dcm", generate_uid(), seed=5)
    rle = write_dx(tmp_path / "rle.dcm", generate_uid(), seed=6)
    rle.compress(RLELossless)  # pydicom's own encoder and decoder: always there
    rle.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert storescu(receiver.port, tmp_path / "implicit.dcm", extra=("-xi",)).returncode == 0  # implicit VR only
    assert storescu(receiver.port, tmp_path / "rle.dcm", extra=("-xr",)).returncode == 0  # RLE, as the file is
    for ds in (implicit, rle):
        rec = triage.store.find(sop_uid=str(ds.SOPInstanceUID))
        assert rec is not None and rec["flag"] in ("normal", "abnormal"), rec


@needs_dcmtk
def test_calling_ae_not_allowed_is_rejected_and_nothing_stored(triage, tmp_path):
    write_dx(tmp_path / "pa.dcm", generate_uid())
    r = Receiver(triage, port=0, allowed_aes={SCU, "PACS1"})
    r.start()
    try:
        res = storescu(r.port, tmp_path / "pa.dcm", aet="INTRUDER")
        assert res.returncode != 0
        assert "Calling AE Title Not Recognized" in res.stderr
        assert triage.store.count_images() == 0
        res = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", "CXR1C", "127.0.0.1", str(r.port)], capture_output=True, timeout=30)
        assert res.returncode != 0
        res = storescu(r.port, tmp_path / "pa.dcm", aet=SCU)  # one on the list is let in
        assert res.returncode == 0, res.stderr
        assert triage.store.count_images() == 1
    finally:
        r.stop()


@needs_dcmtk
def test_sr_of_each_scored_study_is_sent_back(triage, sr_sink, tmp_path):
    port, received = sr_sink
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    pa = write_dx(tmp_path / "in" / "a_pa.dcm", a, seed=1)
    write_dx(tmp_path / "in" / "a_lat.dcm", a, view="LL", seed=2)
    pb = write_dx(tmp_path / "in" / "b_pa.dcm", b, seed=3, patient="PAT-2")
    write_dx(tmp_path / "in" / "c_lat.dcm", c, view="LL", seed=4, patient="PAT-3")  # nothing to score: no SR
    r = Receiver(triage, port=0, sr_destination=("127.0.0.1", port, "SRSINK"))
    r.start()
    try:
        res = storescu(r.port, *sorted((tmp_path / "in").iterdir()))
        assert res.returncode == 0, res.stderr
        assert wait_for(lambda: len(received) >= 2)
        time.sleep(0.5)
        assert len(received) == 2, "one SR per scored study, once its association has ended"
        by_study = {str(sr.StudyInstanceUID): sr for sr in received}
        assert set(by_study) == {a, b}
        for uid, src in ((a, pa), (b, pb)):
            sr = by_study[uid]
            assert sr.SOPClassUID == ComprehensiveSRStorage and sr.Modality == "SR"
            assert sr.PatientID == src.PatientID and sr.AccessionNumber == src.AccessionNumber
            refs = [ref.ReferencedSOPInstanceUID for ev in sr.CurrentRequestedProcedureEvidenceSequence
                    for series in ev.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
            assert refs == [src.SOPInstanceUID]  # the lateral is no result: not listed
        assert r.srs_sent == 2 and r.srs_failed == 0

        # Our SR routed back to us (a PACS forwarding the whole study) is stored as skipped and asks for no new SR.
        back = tmp_path / "back.dcm"
        by_study[a].save_as(back, enforce_file_format=True)
        res = storescu(r.port, back)
        assert res.returncode == 0, res.stderr
        assert triage.store.find(sop_uid=str(by_study[a].SOPInstanceUID))["flag"] == "skipped"
        time.sleep(0.5)
        assert len(received) == 2
    finally:
        r.stop()


@needs_dcmtk
def test_sr_destination_down_is_logged_and_receiving_goes_on(triage, tmp_path, caplog):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    r = Receiver(triage, port=0, sr_destination=("127.0.0.1", closed, "NOBODY"))
    r.start()
    try:
        for k in range(2):
            write_dx(tmp_path / f"pa{k}.dcm", generate_uid(), seed=k)
            assert storescu(r.port, tmp_path / f"pa{k}.dcm").returncode == 0
            assert wait_for(lambda k=k: r.srs_failed == k + 1)
        assert triage.store.count_images() == 2 and r.srs_sent == 0
    finally:
        r.stop()
    assert any("SR not sent" in rec.getMessage() for rec in caplog.records)


@needs_dcmtk
def test_hundred_studies_in_one_association(receiver, triage, tmp_path):
    folder = tmp_path / "hundred"
    uids = [generate_uid() for _ in range(100)]
    for k, uid in enumerate(uids):
        write_dx(folder / f"img{k:03d}.dcm", uid, seed=k, patient=f"PAT-{k:03d}")
    t0 = time.perf_counter()
    res = storescu(receiver.port, folder, extra=("+sd",))
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    log.info("100 studies (one 64x64 PA each) received and scored in %.2f s", seconds)
    wl = triage.store.worklist(limit=1000)
    assert wl["total"] == 100 and triage.store.count_images() == 100
    assert {it["study_uid"] for it in wl["items"]} == set(uids)
    assert all(it["flag"] in ("normal", "abnormal") and it["score"] is not None for it in wl["items"])


def test_store_failure_answers_a_failure_status(receiver, triage, tmp_path, monkeypatch):
    """Only an image that could not be stored gets a failure status (and the sender keeps it)."""
    ds = write_dx(tmp_path / "pa.dcm", generate_uid())

    def broken(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(triage, "ingest", broken)
    ae = AE(ae_title=SCU)
    ae.add_requested_context(DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="CXR1C")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == STATUS_CANNOT_PROCESS and "cannot store" in status.ErrorComment
    assert receiver.failed == 1 and receiver.received == 0
    assert not list(receiver.tmp_dir.iterdir())


@needs_dcmtk
def test_listen_runs_until_stopped(run, tmp_path):
    db = tmp_path / "listen.sqlite"
    started: list[Receiver] = []
    ready = threading.Event()

    def on_ready(r: Receiver) -> None:
        started.append(r)
        ready.set()

    worker = threading.Thread(target=listen, args=(run,), kwargs={"port": 0, "db": db, "ready": on_ready}, daemon=True)
    worker.start()
    assert ready.wait(60)
    receiver = started[0]
    write_dx(tmp_path / "pa.dcm", generate_uid())
    assert storescu(receiver.port, tmp_path / "pa.dcm").returncode == 0
    receiver.stop()
    worker.join(30)
    assert not worker.is_alive()
    with sqlite3.connect(db) as con:
        assert con.execute("SELECT COUNT(*) FROM images").fetchone()[0] == 1


def test_listen_refuses_a_network_address_without_allow_list(run, tmp_path):
    with pytest.raises(CxrError, match="--allow"):
        listen(run, host="0.0.0.0", port=0, db=tmp_path / "x.sqlite")
    assert not (tmp_path / "x.sqlite").exists()  # refused before anything was opened
