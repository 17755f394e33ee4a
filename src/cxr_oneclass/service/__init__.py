"""The triage service: results database (`store`), micro-batched scoring (`batcher`), the ingest pipeline both
front doors share (`triage`), the HTTP API and worklist page (`app`) and the DICOM receiver (`dicom_scp`). It uses
jobs/ and the library; nothing below it imports it."""
