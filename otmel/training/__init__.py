"""Training in one process and across Ray Train workers: the optimiser and epoch schedule, the
training step, global negatives across workers, training curves. Imports model, data and io."""
