"""The retrieval service: embeddings, files and vector stores on Milvus."""

import os

# Milvus Lite (in-process) and torch each keep an OpenMP thread pool; the spinning idle threads
# of one starve the other on a small machine (measured: a query embedding took 6 ms alone and
# 54 ms beside Milvus searches). Idle threads sleep instead. Set before either library loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
