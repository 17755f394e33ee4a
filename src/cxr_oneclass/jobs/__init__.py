"""One module per CLI verb: train, evaluate, rescore, score, export, demo, experiment, report.

Each is a library function the CLI calls and prints about; none prints or exits.
"""
