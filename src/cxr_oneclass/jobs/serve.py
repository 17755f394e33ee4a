"""`cxr-oneclass serve RUN`: the triage service: HTTP API, worklist page, results database (service/)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..data.studies import DEFAULT_VIEWS
from ..errors import CxrError
from ..service.dicom_scp import is_loopback

log = logging.getLogger(__name__)

TOKEN_ENV = "CXR_ONECLASS_TOKEN"


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, db: str | Path | None = None, token: str | None = None,
          views: frozenset[str] | set[str] = DEFAULT_VIEWS, salt: str | None = None, max_batch: int = 32, max_wait_ms: float = 10.0,
          log_level: str = "warning", int8: bool = False) -> None:
    """Serve until interrupted. Bound to anything but loopback, a bearer token is required (given, or in
    CXR_ONECLASS_TOKEN). The database defaults to RUN/triage.sqlite."""
    import uvicorn

    from ..service.app import create_app
    from ..service.triage import Triage

    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(host) and not token:
        raise CxrError(f"serving on {host} (not this machine only) needs a bearer token: --token or {TOKEN_ENV}")
    db_path = Path(db) if db else Path(run_dir) / "triage.sqlite"
    triage = Triage(run_dir, db_path, views=views, salt=salt, max_batch=max_batch, max_wait_s=max_wait_ms / 1000, int8=int8)
    try:
        log.info("serving %s on http://%s:%d (database %s)", run_dir, host, port, db_path)
        uvicorn.run(create_app(triage, token), host=host, port=port, log_level=log_level, access_log=False)
    finally:
        triage.close()
