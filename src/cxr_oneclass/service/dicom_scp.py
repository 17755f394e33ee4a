"""The DICOM front door: a storage SCP (C-ECHO, C-STORE) that scores what a modality or PACS sends it into the
results database, and optionally sends each scored study's Structured Report back (C-STORE SCU).

- Accepted: every storage SOP class (`pynetdicom.StoragePresentationContexts`: CR, DX, Secondary Capture, ... and
  non-images too, which are stored as `skipped`) and Verification; transfer syntaxes: the uncompressed ones, plus
  each compressed one that pydicom can decode here (`ACCEPTED_TRANSFER_SYNTAXES`). Offering only what can be
  decoded makes a sender fall back to an uncompressed syntax instead of delivering images nobody can score.
- Called AE title: must be ours. Calling AE titles: any, or only those of `allowed_aes` (others are rejected at
  association). Anything but loopback needs an allow-list (`check_exposure`).
- A received dataset goes to a private temporary file (never a name taken from the dataset), through
  `Triage.ingest`, and is deleted. A bad image is a stored `error` record and a successful receipt; only failing to
  store (cannot write the file, the database fails) answers a failure status, so that the sender keeps the image.
- SR send-back (`sr_destination`): the headers of the received images (no pixel data) are kept per study; a study's
  SR is (re)built from its stored results when the association that sent it closes, or `sr_delay_s` after its last
  image if the association stays open, and sent from a background thread, never from the SCP's handlers. Only a
  scored image (not a duplicate, not a skipped one) asks for an SR: our own SR coming back is `skipped` and cannot
  start a loop.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from ..errors import ConfigError
from ..jobs.score import ABNORMAL, NORMAL, NOT_SCORED
from ..reporting.dicom_out import ImageResult, ModelInfo, StudyResult, write_study_sr
from .triage import Triage

log = logging.getLogger(__name__)

DEFAULT_AE_TITLE = "CXR1C"
DEFAULT_PORT = 11112
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (PS3.4 B.2.3): the disk is full, the sender may retry
STATUS_CANNOT_PROCESS = 0xC000  # Error: cannot understand, the Cxxx range: here, the image could not be stored
SCORED_FLAGS = (ABNORMAL, NORMAL, NOT_SCORED)  # what an SR lists; `skipped` images are not results
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
COMPRESSED = (JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless, RLELossless, JPEGBaseline8Bit,
              JPEGExtended12Bit, JPEGLSNearLossless, JPEG2000)
AE_TITLE_MAX = 16


def decodable(syntaxes: Iterable[str]) -> list[UID]:
    """The compressed transfer syntaxes among `syntaxes` that pydicom can decode with what is installed."""
    from pydicom.pixels import get_decoder

    out = []
    for ts in syntaxes:
        try:
            if get_decoder(UID(ts)).is_available:
                out.append(UID(ts))
        except (NotImplementedError, ValueError):  # no decoder for it at all
            continue
    return out


ACCEPTED_TRANSFER_SYNTAXES: list[UID] = [*UNCOMPRESSED, *decodable(COMPRESSED)]


def check_ae_title(value: str, what: str) -> str:
    """An AE title as the standard allows it (1-16 characters of the default repertoire, no backslash, not only
    spaces); leading and trailing spaces are not significant and are removed."""
    title = str(value).strip()
    if not title or len(title) > AE_TITLE_MAX or any(not (32 <= ord(c) < 127) or c == "\\" for c in title):
        raise ConfigError(f"{what} {value!r} is not a valid AE title (1-16 printable ASCII characters, no backslash)")
    return title


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address; a host name is not resolved (what it resolves to can change)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, allowed_aes: Iterable[str] | None) -> None:
    """Refuse to listen beyond this machine without a calling AE title allow-list: DICOM has no authentication, so
    anyone who can reach the port could put studies on the worklist. AE titles are no secret either: the allow-list
    is the least, a firewall in front of the port the rest."""
    if allowed_aes is None and not is_loopback(host):
        raise ConfigError(f"listening on {host} (not this machine only) lets anyone on the network send images: give the "
                          "calling AE titles allowed to send (--allow AE ...), or listen on 127.0.0.1")


def _header(ds: Dataset) -> Dataset:
    """The dataset without pixel data, overlays and padding (groups 6000 and up): what an SR needs of its source."""
    hdr = Dataset()
    for elem in ds:
        if elem.tag.group < 0x6000:
            hdr.add(elem)
    return hdr


def _file_name(sop_uid: object) -> str:
    """A display name from the SOP Instance UID, which the sender chose: only a valid UID is used."""
    uid = UID(str(sop_uid or "").strip())
    return f"{uid}.dcm" if uid.is_valid else "received.dcm"


def _failure(status: int, comment: str) -> Dataset:
    out = Dataset()
    out.Status = status
    out.ErrorComment = comment[:64]  # LO
    return out


class Receiver:
    """A storage SCP in front of a `Triage`: `start()` listens in the background, `stop()` ends it. `port` is the
    one bound (give 0 for any free one)."""

    def __init__(self, triage: Triage, ae_title: str = DEFAULT_AE_TITLE, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 allowed_aes: Iterable[str] | None = None, sr_destination: tuple[str, int, str] | None = None,
                 sr_delay_s: float = 10.0, max_studies: int = 10_000, tmp_dir: str | Path | None = None) -> None:
        self.triage = triage
        self.ae_title = check_ae_title(ae_title, "AE title")
        self.allowed_aes = None if allowed_aes is None else {check_ae_title(a, "allowed AE title") for a in allowed_aes}
        if self.allowed_aes is not None and not self.allowed_aes:
            raise ConfigError("the allow-list of calling AE titles is empty: nobody could send")
        check_exposure(host, self.allowed_aes)
        if not 0 <= int(port) <= 65535:
            raise ConfigError(f"port {port} is not a TCP port (0-65535)")
        self.host, self._port = host, int(port)
        self.sr_destination = self._check_destination(sr_destination)
        self.sr_delay_s, self.max_studies = sr_delay_s, max_studies
        self.tmp_dir = Path(tmp_dir) if tmp_dir is not None else None
        if self.tmp_dir is not None:
            try:
                self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot use {self.tmp_dir} for received files: {exc.strerror or exc}") from exc
        self.received = self.failed = self.srs_sent = self.srs_failed = 0

        self.ae = AE(ae_title=self.ae_title)
        for cx in StoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
        self.ae.add_supported_context(Verification)
        self.ae.require_called_aet = True  # a sender configured for another node is told so, not silently served
        if self.allowed_aes is not None:
            self.ae.require_calling_aet = sorted(self.allowed_aes)  # rejected at association: nothing is received
        self._server: Any = None
        self._lock = threading.Lock()  # counters, headers, pending SRs, start/stop
        self._stop_lock = threading.Lock()  # a second stop() waits for the first to finish
        self._stopped = threading.Event()

        # SR send-back state: headers per study (LRU, bounded), studies due for an SR, studies per open association.
        self._headers: OrderedDict[str, dict[str, Dataset]] = OrderedDict()
        self._pending: dict[str, float] = {}
        self._touched: dict[int, set[str]] = {}
        self._wake = threading.Condition(self._lock)
        self._closing = False
        self._sender: threading.Thread | None = None
        self._model: ModelInfo | None = None
        self._scu: AE | None = None
        if self.sr_destination is not None:
            self._model = triage.scorer.model_info()
            self._scu = AE(ae_title=self.ae_title)
            self._scu.add_requested_context(ComprehensiveSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])

    @staticmethod
    def _check_destination(dest: tuple[str, int, str] | None) -> tuple[str, int, str] | None:
        if dest is None:
            return None
        try:
            host, port, aet = dest
            port = int(port)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"SR destination {dest!r} is not (host, port, AE title)") from exc
        if not host or not 1 <= port <= 65535:
            raise ConfigError(f"SR destination {dest!r}: needs a host and a port 1-65535")
        return str(host), port, check_ae_title(aet, "SR destination AE title")

    # ------------------------------------------------------------------------------------------- server

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose, when 0 was given)."""
        return int(self._server.server_address[1]) if self._server is not None else self._port

    def start(self) -> None:
        """Listen in background threads (one per association); returns at once."""
        with self._lock:
            if self._server is not None:
                return
            self._stopped.clear()
            self._closing = False
            handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                        (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_CONN_CLOSE, self._on_close)]
            try:
                self._server = self.ae.start_server((self.host, self._port), block=False, evt_handlers=handlers)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {self.host}:{self._port} ({exc.strerror or exc}): choose another "
                                  "port or address") from exc
            if self.sr_destination is not None:
                self._sender = threading.Thread(target=self._send_loop, name="sr-sender", daemon=True)
                self._sender.start()
        log.info("DICOM receiver %s listening on %s:%d (calling AE titles: %s; transfer syntaxes: %s)", self.ae_title,
                 self.host, self.port, ", ".join(sorted(self.allowed_aes)) if self.allowed_aes else "any",
                 ", ".join(ts.name for ts in ACCEPTED_TRANSFER_SYNTAXES))

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting; let associations in progress finish (up to `grace_s`, then abort them); send the SRs due
        (up to `grace_s`). Safe to call twice, and from any thread."""
        with self._stop_lock:
            with self._lock:
                server, self._server = self._server, None
            if server is not None:
                self._shutdown(server, grace_s)
            self._stopped.set()

    def _shutdown(self, server: Any, grace_s: float) -> None:
        server.shutdown()  # no new associations; those open go on in their threads
        deadline = time.monotonic() + grace_s
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.ae.active_associations:
            log.warning("aborting %d association(s) still open after %.0f s", len(self.ae.active_associations), grace_s)
        self.ae.shutdown()
        if self._sender is not None:
            with self._wake:
                self._closing = True
                self._wake.notify_all()
            self._sender.join(timeout=grace_s)
            if self._sender.is_alive():
                log.warning("SR sender still busy after %.0f s; %d study SR(s) not sent", grace_s, len(self._pending))
        log.info("DICOM receiver stopped: %d image(s) received, %d refused, %d SR(s) sent, %d SR send(s) failed",
                 self.received, self.failed, self.srs_sent, self.srs_failed)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stopped (True) or `timeout` passes (False)."""
        return self._stopped.wait(timeout)

    # ------------------------------------------------------------------------------------------- handlers

    def _on_echo(self, event: evt.Event) -> int:
        log.debug("C-ECHO from %s", event.assoc.requestor.ae_title)
        return STATUS_SUCCESS

    def _on_rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        called = str(getattr(req.primitive, "called_ae_title", "") or "").strip()
        log.warning("association rejected: calling AE title %r from %s:%s, called AE title %r (expected %s, from %s)",
                    req.ae_title.strip(), req.address, req.port, called, self.ae_title,
                    ", ".join(sorted(self.allowed_aes)) if self.allowed_aes else "anyone")

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """Store, score, answer. Runs in the association's thread; the SR send-back is only queued here."""
        calling = event.assoc.requestor.ae_title.strip()
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as exc:  # noqa: BLE001 - whatever the sender's bytes break, the answer is a status
            log.warning("C-STORE from %s: dataset cannot be decoded (%s: %s)", calling, type(exc).__name__, exc)
            return self._refuse(STATUS_CANNOT_PROCESS, "dataset cannot be decoded")
        name = _file_name(event.request.AffectedSOPInstanceUID)
        tmp: Path | None = None
        try:
            # mkstemp: a new name of ours, readable by this user only, in the system's (or the given) temp folder.
            fd, tmp_name = tempfile.mkstemp(prefix="cxr-cstore-", suffix=".dcm", dir=self.tmp_dir)
            tmp = Path(tmp_name)
            with os.fdopen(fd, "wb") as fh:
                ds.save_as(fh, enforce_file_format=True)
            rec = self.triage.ingest(tmp, file_name=name, source=f"dicom:{calling}")
        except OSError as exc:
            log.error("C-STORE from %s of %s: cannot store it (%s)", calling, name, exc.strerror or exc)
            return self._refuse(STATUS_OUT_OF_RESOURCES, f"cannot store: {exc.strerror or type(exc).__name__}")
        except Exception as exc:  # noqa: BLE001 - not stored: the sender must know, and keep the image
            log.exception("C-STORE from %s of %s: cannot store it", calling, name)
            return self._refuse(STATUS_CANNOT_PROCESS, f"cannot store: {type(exc).__name__}")
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        with self._lock:
            self.received += 1
        log.info("C-STORE from %s: %s study %s: %s%s", calling, name, rec.get("study_key"), rec.get("flag"),
                 " (duplicate)" if rec.get("duplicate") else "")
        if self.sr_destination is not None and not rec.get("duplicate") and rec.get("flag") in SCORED_FLAGS and rec.get("study_uid"):
            self._keep(event, str(rec["study_key"]), ds)
        return STATUS_SUCCESS

    def _refuse(self, status: int, comment: str) -> Dataset:
        with self._lock:
            self.failed += 1
        return _failure(status, comment)

    def _on_close(self, event: evt.Event) -> None:
        """The association that sent a study's images has ended: its studies' SRs are due now."""
        with self._wake:
            for key in self._touched.pop(id(event.assoc), ()):
                if key in self._pending:
                    self._pending[key] = time.monotonic()
            self._wake.notify_all()

    # ------------------------------------------------------------------------------------------- SR send-back

    def _keep(self, event: evt.Event, study_key: str, ds: Dataset) -> None:
        """Keep the image's header for its study's SR and queue the SR (after the association, or sr_delay_s)."""
        try:
            hdr = _header(ds)
            sop = str(hdr.SOPInstanceUID)
        except Exception as exc:  # noqa: BLE001 - the image is stored; only its SR is lost
            log.warning("study %s: header kept for no SR (%s)", study_key, type(exc).__name__)
            return
        with self._wake:
            self._headers.setdefault(study_key, {})[sop] = hdr
            self._headers.move_to_end(study_key)
            while len(self._headers) > self.max_studies:  # bounded: a receiver runs for months
                self._headers.popitem(last=False)
            self._pending[study_key] = time.monotonic() + self.sr_delay_s
            self._touched.setdefault(id(event.assoc), set()).add(study_key)
            self._wake.notify_all()

    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while True:
                    now = time.monotonic()
                    due = [k for k, t in self._pending.items() if t <= now or self._closing]
                    if due or (self._closing and not self._pending):
                        break
                    self._wake.wait(min(self._pending.values()) - now if self._pending else None)
                for k in due:
                    del self._pending[k]
                if not due:
                    return
            for key in due:
                try:
                    self._send_study_sr(key)
                except Exception:  # noqa: BLE001 - one study's SR failing never stops the receiver
                    with self._lock:
                        self.srs_failed += 1
                    log.exception("study %s: SR not sent", key)

    def _send_study_sr(self, study_key: str) -> None:
        """Build the study's SR from its stored results and the headers kept, and C-STORE it to the destination."""
        if self._model is None or self._scu is None or self.sr_destination is None:
            return
        study = self.triage.store.study(study_key)
        with self._lock:
            headers = dict(self._headers.get(study_key, {}))
        if study is None or study["flag"] not in SCORED_FLAGS:
            return
        results = [im for im in study["images"] if im["flag"] in SCORED_FLAGS]
        images = [ImageResult(headers[im["sop_uid"]], im["score"], im["flag"], im["terms"]) for im in results if im["sop_uid"] in headers]
        if not images:
            log.warning("study %s: no image headers in memory (received before this receiver started?): no SR", study_key)
            return
        if len(images) < len(results):
            log.warning("study %s: SR lists %d of its %d results (the others were received before this receiver started)",
                        study_key, len(images), len(results))
        host, port, aet = self.sr_destination
        with tempfile.TemporaryDirectory(prefix="cxr-sr-") as tmp:
            path = write_study_sr(StudyResult(study["study_uid"], study["score"], study["flag"]), images, self._model, Path(tmp))
            assoc = self._scu.associate(host, port, ae_title=aet)
            if not assoc.is_established:
                with self._lock:
                    self.srs_failed += 1
                log.warning("study %s: SR not sent: association with %s@%s:%d %s", study_key, aet, host, port,
                            "rejected" if assoc.is_rejected else "failed")
                return
            try:
                status = assoc.send_c_store(path)
            finally:
                assoc.release()
        code = status.get("Status") if status else None
        if code is None or not (code == STATUS_SUCCESS or 0xB000 <= code <= 0xBFFF):  # Bxxx: stored, with a warning
            with self._lock:
                self.srs_failed += 1
            log.warning("study %s: SR not stored by %s@%s:%d (%s)", study_key, aet, host, port,
                        "no answer" if code is None else f"status 0x{code:04X}")
            return
        with self._lock:
            self.srs_sent += 1
        log.info("study %s: SR (%d image(s), %s) sent to %s@%s:%d", study_key, len(images), study["flag"], aet, host, port)
