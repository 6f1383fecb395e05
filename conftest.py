"""pytest setup shared by every test file: one intra-op thread per process, and no GPU.

The models under test are tiny, so threads buy little, and results that tests compare bit for bit
must come from one thread setting. One thread also keeps the suite's time steady on a busy machine:
with two OpenMP threads on two cores and another process running, the threads' spin-waits made a
Phase I run 100x slower (2.5 s -> 280 s) here.

The suite is the CPU's: on a GPU machine the scripts would pick CUDA ("auto"), switch the two-process
tests to NCCL and bf16, and fail where there is one GPU for two ranks. CUDA_VISIBLE_DEVICES="" hides the
GPUs from this process and from every subprocess it starts (torchrun); the GPU's own checks are
gpu_check.py's."""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch is imported

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the subprocesses the tests start (torchrun)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may download

import torch  # noqa: E402

torch.set_num_threads(1)
