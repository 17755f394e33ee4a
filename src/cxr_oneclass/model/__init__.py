"""The networks of Tang et al. (U, D, E) and the loss of eqs. 1-5: plain torch, no I/O, nothing fitted after training."""
