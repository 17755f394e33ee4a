"""The anomaly score: the table of terms (`terms`), their fitted statistics (`stats`), scoring a batch
(`inference`), choosing terms on validation (`selection`), the operating threshold (`calibration`) and the ONNX
graph (`onnx`).

Import the submodules themselves: this package file imports nothing, so `config` can read the term table without
an import cycle.
"""
