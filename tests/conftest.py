"""Tests run single-threaded: the models are small, and on a 2-core machine shared with other
work OpenMP threads that spin-wait for each other slow small ops down by orders of magnitude."""

import torch

torch.set_num_threads(1)
