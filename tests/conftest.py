"""Test-session setup shared by every test folder."""

import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter. The flag must be set before
# any module decorates a kernel, i.e. before the first test module imports loraplex.kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
