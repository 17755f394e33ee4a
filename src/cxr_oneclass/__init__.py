"""cxr-oneclass: a generative adversarial one-class classifier for abnormal chest X-rays (Tang et al., ISBI 2019)."""

__version__ = "0.1.0"
