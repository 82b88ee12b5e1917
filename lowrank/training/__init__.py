"""Toy tasks, the training loop, data-parallel training over MPI, and memory accounting."""
