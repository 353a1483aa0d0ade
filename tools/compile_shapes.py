"""torch.compile with a partial last batch: the default (dynamic) compile against the engine's static one.

    python tools/compile_shapes.py dynamic|static

Trains LeNet w=2 on 1000 of the embedded digits in batches of 128 (7 full, one of 104) for 4 epochs, compiled
as ``torch.compile(model)`` with every batch (``dynamic``) or as the engine compiles (``dynamic=False``, the
partial batch dropped: ``static``), and prints one JSON line: graphs compiled and each epoch's seconds. Run the
two alternately with fresh caches (``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)``) to compare; docs/performance.md
holds the numbers.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from robprune.engine import data as D
from robprune.engine.models import build_model


def main(mode: str) -> dict:
    if mode not in ("dynamic", "static"):
        raise SystemExit("usage: python tools/compile_shapes.py dynamic|static")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = D.load_dataset("mnist-5k", "data", False, torch.device("cpu"))
    x, y = ds.train_x[:1000], ds.train_y[:1000]
    model = build_model("lenet", 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    static = mode == "static"
    fn = torch.compile(model, dynamic=False) if static else torch.compile(model)
    loader = D.BatchLoader(x, y, 128, shuffle=True, seed=0, drop_last=static)
    times = []
    for epoch in range(4):
        t0 = time.perf_counter()
        for xb, yb in loader.batches(epoch):
            opt.zero_grad()
            F.cross_entropy(fn(xb), yb).backward()
            opt.step()
        times.append(round(time.perf_counter() - t0, 3))
    return {"mode": mode, "graphs": counters["stats"]["unique_graphs"], "batches": len(loader), "epoch_s": times}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1] if len(sys.argv) > 1 else "")))
