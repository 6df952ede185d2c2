"""Triton kernels of cdds-fast (installed as ``cdds_fast.kernels``).

Each op has one file with private ``_<op>_fwd_kernel`` / ``_<op>_bwd_kernel`` Triton kernels, a
launcher that checks its inputs and picks block sizes (``launch.py``), and an
``torch.autograd.Function``. Import the op modules lazily: importing this package must not
require a GPU.
"""
