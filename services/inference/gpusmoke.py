"""GPU smoke check for a real host, before trusting it with the platform.

    python -m services.inference.gpusmoke --profile gpu-ep [--skip-serve]

In compose: `docker compose run --rm inference python3 -m services.inference.gpusmoke --profile
gpu-ep` (the vLLM image has torch and NCCL; run it in the finetune image for bitsandbytes).
Checks, each PASS / FAIL / SKIP with what it saw:
1. the driver and the GPUs (nvidia-smi; torch sees the same count and memory);
2. peer-to-peer access between the profile's GPUs, and whether the profile disables it for NCCL
   where it is absent (PCIe cards without P2P hang or crawl otherwise);
3. an NCCL all-reduce across the profile's GPUs (result checked, bus bandwidth reported);
4. bitsandbytes 4-bit quantization on CUDA (QLoRA's kernel);
5. the profile starts (the launcher waits for real readiness) and a short benchmark runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.inference import profiles

Result = tuple[str, str]  # (PASS | FAIL | SKIP, detail)


def driver() -> Result:
    if shutil.which("nvidia-smi") is None:
        return "FAIL", "nvidia-smi not found: no NVIDIA driver"
    out = subprocess.run(
        [
            "nvidia-smi",
            "--query-gpu=index,name,memory.total,driver_version",
            "--format=csv,noheader",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if out.returncode != 0:
        return "FAIL", out.stderr.strip()
    import torch

    seen = torch.cuda.device_count()
    lines = out.stdout.strip().splitlines()
    if seen != len(lines):
        return "FAIL", f"nvidia-smi lists {len(lines)} GPUs, torch sees {seen}"
    return "PASS", "; ".join(lines)


def peer_to_peer(profile: profiles.Profile) -> Result:
    import torch

    n = torch.cuda.device_count()
    if n < 2:
        return "SKIP", "fewer than two GPUs visible"
    pairs = {
        f"{i}->{j}": torch.cuda.can_device_access_peer(i, j)
        for i in range(n)
        for j in range(n)
        if i != j
    }
    disabled = profile.env.get("NCCL_P2P_DISABLE") == "1"
    if all(pairs.values()):
        return "PASS", f"P2P available {pairs}"
    if disabled:
        return "PASS", f"no P2P {pairs}; the profile sets NCCL_P2P_DISABLE=1 (through host memory)"
    return "FAIL", f"no P2P {pairs}: set NCCL_P2P_DISABLE=1 in the profile's env"


def _all_reduce_worker(rank: int, world: int, port: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    x = torch.full((64 << 20,), float(rank + 1), device="cuda")  # 256 MB of float32
    dist.all_reduce(x)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 5
    expected = sum(range(1, world + 1)) * world**5
    if rank == 0:
        busbw = 2 * (world - 1) / world * x.numel() * 4 / seconds / 1e9
        out.put((bool(torch.allclose(x[:16], torch.full_like(x[:16], expected))), busbw))
    dist.destroy_process_group()


def nccl(profile: profiles.Profile) -> Result:
    import torch
    import torch.multiprocessing as mp

    world = torch.cuda.device_count()
    if world < 2:
        return "SKIP", "fewer than two GPUs visible"
    from services.stackconfig import _free_port

    os.environ.update(profile.env)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(
        _all_reduce_worker, args=(world, _free_port(), queue), nprocs=world, start_method="spawn"
    )
    ok, busbw = queue.get(timeout=120)
    return (
        "PASS" if ok else "FAIL"
    ), f"all-reduce of 256 MB over {world} GPUs, {busbw:.1f} GB/s bus"


def bitsandbytes_cuda() -> Result:
    try:
        import bitsandbytes.functional as bnbf
        import torch
    except ImportError:
        return "SKIP", "bitsandbytes not installed here (run in the finetune image)"
    w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    q, state = bnbf.quantize_4bit(w, quant_type="nf4")
    back = bnbf.dequantize_4bit(q, state)
    err = float((back - w).abs().mean() / w.abs().mean())
    return ("PASS" if err < 0.15 else "FAIL"), f"NF4 round trip, mean relative error {err:.3f}"


def serve(profile: profiles.Profile, models_dir: Path) -> Result:
    from services.stackconfig import ROOT, _free_port

    port = _free_port()
    env = {
        **os.environ,
        "CRUCIBLE_INFERENCE_PROFILE": profile.name,
        "CRUCIBLE_INFERENCE_PORT": str(port),
        "CRUCIBLE_INFERENCE_MODELS_DIR": str(models_dir),
    }
    launcher = subprocess.Popen([sys.executable, "-m", "services.inference.launch"], env=env)
    try:
        from services.inference import readiness

        deadline = time.monotonic() + 1800
        url = f"http://127.0.0.1:{port}"
        while not readiness.is_ready(url, profile.served_model_name):
            if launcher.poll() is not None or time.monotonic() > deadline:
                return "FAIL", "the profile did not become ready (see the launcher's output)"
            time.sleep(5)
        bench = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench/inference.py"),
                "--url",
                url,
                "--model",
                profile.served_model_name,
                "--concurrency",
                "1",
                "8",
                "--repeats",
                "1",
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        tail = bench.stdout.strip().splitlines()[-6:]
        return ("PASS" if bench.returncode == 0 else "FAIL"), " | ".join(tail)
    finally:
        launcher.terminate()
        launcher.wait(120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", required=True)
    p.add_argument(
        "--models-dir", default=os.environ.get("CRUCIBLE_INFERENCE_MODELS_DIR", "/models")
    )
    p.add_argument("--skip-serve", action="store_true")
    args = p.parse_args(argv)
    profile = profiles.load(args.profile)
    checks: list[tuple[str, Callable[[], Result]]] = [
        ("driver and GPUs", driver),
        ("peer-to-peer", lambda: peer_to_peer(profile)),
        ("NCCL all-reduce", lambda: nccl(profile)),
        ("bitsandbytes CUDA", bitsandbytes_cuda),
    ]
    if not args.skip_serve:
        checks.append(
            (f"profile {profile.name} serves", lambda: serve(profile, Path(args.models_dir)))
        )
    failed = False
    for name, check in checks:
        try:
            state, detail = check()
        except Exception as exc:  # a broken host is a result here, not a crash
            state, detail = "FAIL", f"{type(exc).__name__}: {exc}"
        failed |= state == "FAIL"
        print(f"{state:<5} {name}: {detail}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
