"""Reports of runs and experiments: what is read (`source`), the sections (`sections`), the document and its
rendering (`document`). The `report` verb is `jobs/report.py`."""
