"""Training: the G-step / D-step loop (`loop`) and data-parallel training under torchrun (`distributed`)."""
