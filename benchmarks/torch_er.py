"""A plain hand-written PyTorch loop of online ER: the baseline ocljax is measured against.

Written the way a researcher would write it: one optimizer step per incoming batch of 10 on
the batch plus 10 rows replayed from a reservoir buffer (sampled before the batch is written),
evaluation on the per-task test sets at every task end.
"""

from __future__ import annotations

import time

import numpy as np


def run(train_x, train_y, test_x, test_y, order, task_ends, *, buffer_size=1000, batch=10,
        replay=10, lr=0.1, hidden=(256, 256), seed=0) -> dict:
    """Train one seed through ``order`` (pool indices, [n_batches, batch]); returns timings and
    the final average accuracy."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dim = int(np.prod(train_x.shape[1:]))
    layers, width = [], dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    model = nn.Sequential(*layers, nn.Linear(width, int(train_y.max()) + 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    xs = torch.from_numpy(train_x.reshape(len(train_x), dim))
    ys = torch.from_numpy(train_y.astype(np.int64))
    tx = torch.from_numpy(test_x.reshape(len(test_x), dim)).float() / 255.0
    ty = torch.from_numpy(test_y.astype(np.int64))
    buf_x = torch.zeros(buffer_size, dim)
    buf_y = torch.zeros(buffer_size, dtype=torch.long)
    seen = 0
    accs = []
    t0 = time.perf_counter()
    for step, idx in enumerate(order):
        idx = torch.from_numpy(idx)
        x, y = xs[idx].float() / 255.0, ys[idx]
        if seen > 0:
            r = torch.from_numpy(rng.choice(min(seen, buffer_size), min(replay, seen),
                                            replace=False))
            x_all, y_all = torch.cat([x, buf_x[r]]), torch.cat([y, buf_y[r]])
        else:
            x_all, y_all = x, y
        opt.zero_grad()
        loss_fn(model(x_all), y_all).backward()
        opt.step()
        for i in range(len(y)):  # reservoir sampling (Vitter's Algorithm R)
            if seen < buffer_size:
                buf_x[seen], buf_y[seen] = x[i], y[i]
            else:
                j = rng.integers(0, seen + 1)
                if j < buffer_size:
                    buf_x[j], buf_y[j] = x[i], y[i]
            seen += 1
        if step + 1 in task_ends:
            with torch.no_grad():
                accs.append((model(tx).argmax(1) == ty).float().mean().item())
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "samples": int(order.size), "final_test_accuracy": accs[-1]}
