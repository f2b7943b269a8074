"""Suite-wide settings: one intra-op thread per test process.

`make test` runs two pytest workers on a two-core machine; with torch's
default thread count each worker would oversubscribe the cores and small
tensor operations slow down by an order of magnitude.
"""

import torch

torch.set_num_threads(1)
