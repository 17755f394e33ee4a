"""What else the machine was doing during a benchmark (shared by the benchmarks)."""

from __future__ import annotations

import os
import subprocess


def busy_processes() -> list[str]:
    """The busiest other processes (what else was running), from ps."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [r.strip()[:140] for r in out.splitlines()[1:] if r.strip() and not r.strip().startswith(str(os.getpid()) + " ")]
    return [r for r in rows if float(r.split()[1]) >= 5.0][:6]
