"""Random streams shared by training and inference: derived seeds, every generator's state in a form
checkpoints can hold, and gathering objects across processes."""
from __future__ import annotations

import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, e.g. (seed, process index, stream id): independent streams that
    do not collide the way `seed + rank` ones do across neighbouring seeds."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_streams(seed: int, rank: int, device: torch.device | str, step: int = 0) -> torch.Generator:
    """Seed torch / python / numpy (label dropout, flips) for this process and return the generator
    of the diffusion timesteps and noise (on `device`)."""
    torch.manual_seed(derive_seed(seed, rank, step, 0))
    random.seed(derive_seed(seed, rank, step, 1))
    np.random.seed(derive_seed(seed, rank, step, 2) % 2**32)
    return torch.Generator(device=device).manual_seed(derive_seed(seed, rank, step, 3))


def rng_state(noise: torch.Generator) -> dict:
    """This process's random streams, in types `torch.load(weights_only=True)` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "noise": noise.get_state(), "python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.copy()), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if noise.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(noise.device)
    return state


def set_rng_state(state: dict, noise: torch.Generator) -> None:
    """Restore what `rng_state` captured."""
    torch.set_rng_state(state["torch"])
    noise.set_state(state["noise"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy(), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and noise.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], noise.device)


def all_gather(obj):
    """[obj of process 0, obj of process 1, ...] on every process.

    Goes through bytes: torch's all_gather_object unpickles with weights_only, which (torch 2.14)
    fails on tensors inside the object; torch.save/torch.load round-trips them safely.
    """
    import io

    from accelerate.utils import gather_object

    buf = io.BytesIO()
    torch.save(obj, buf)
    return [torch.load(io.BytesIO(b), weights_only=True) for b in gather_object([buf.getvalue()])]
