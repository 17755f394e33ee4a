"""`cxr-oneclass listen RUN`: a DICOM receiver (C-ECHO, C-STORE) that scores the images a modality or PACS sends
into the results database `serve` shows (service/dicom_scp.py), optionally sending each study's SR back."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from pathlib import Path

from ..data.studies import DEFAULT_VIEWS
from ..service.dicom_scp import DEFAULT_AE_TITLE, DEFAULT_PORT, Receiver, check_exposure

log = logging.getLogger(__name__)

DB_FILE = "triage.sqlite"  # the database `serve` uses by default too: one worklist for both front doors


def listen(run_dir: str | Path, ae_title: str = DEFAULT_AE_TITLE, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
           db: str | Path | None = None, allowed_aes: Iterable[str] | None = None, sr_destination: tuple[str, int, str] | None = None,
           views: AbstractSet[str] = DEFAULT_VIEWS, salt: str | None = None,
           ready: Callable[[Receiver], None] | None = None, int8: bool = False) -> None:
    """Receive and score until interrupted (KeyboardInterrupt; the CLI turns SIGTERM into one) or until the receiver
    is stopped (`ready` gets it: `receiver.stop()` from another thread ends the call). Then stops cleanly: open
    associations finish, due SRs are sent, the database is closed. The database defaults to RUN/triage.sqlite.
    Anything but loopback needs `allowed_aes` (ConfigError otherwise, before the model is loaded)."""
    from ..service.triage import Triage

    allowed = None if allowed_aes is None else set(allowed_aes)
    check_exposure(host, allowed)
    db_path = Path(db) if db else Path(run_dir) / DB_FILE
    triage = Triage(run_dir, db_path, views=views, salt=salt, int8=int8)
    try:
        receiver = Receiver(triage, ae_title=ae_title, host=host, port=port, allowed_aes=allowed, sr_destination=sr_destination)
        receiver.start()
        try:
            log.info("results of %s go to %s", run_dir, db_path)
            if ready is not None:
                ready(receiver)
            # A timed wait: the main thread must wake up for Ctrl-C and SIGTERM on every platform.
            while not receiver.wait(0.5):
                pass
        except KeyboardInterrupt:
            log.info("interrupted: stopping the receiver")
        finally:
            receiver.stop()
    finally:
        triage.close()
