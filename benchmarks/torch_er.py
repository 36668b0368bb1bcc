"""A plain hand-written PyTorch loop of online ER: the baseline ocljax is measured against.

Written the way a researcher would write it: one optimizer step per incoming batch of 10 on
the batch plus 10 rows replayed from a reservoir buffer (sampled before the batch is written),
evaluation on the whole test set at every task end. ``torch_model`` builds the PyTorch twin of
each ocljax model (same layers, same parameter count), so the loop can train any of them, on
the CPU or a CUDA GPU.
"""

from __future__ import annotations

import time

import numpy as np

EVAL_BATCH = 1000  # test images per forward pass at evaluation (keeps a ResNet within memory)


def _mlp(dim: int, hidden, num_classes: int):
    from torch import nn

    layers, width = [nn.Flatten()], dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def _small_cnn(in_shape, num_classes: int, width: int, channels: int = 32):
    """Twin of ``ocljax.models.cnn.SmallCNNModule`` (without BatchNorm)."""
    import torch
    from torch import nn

    height, wide, c_in = in_shape
    layers = []
    for mult in (1, 2):
        layers += [nn.Conv2d(c_in, channels * mult, 3, padding=1), nn.ReLU()]  # "SAME", stride 1
        c_in = channels * mult
        if height >= 4:  # the same rule as ocljax: tiny inputs (8x8 digits) keep their size
            layers.append(nn.MaxPool2d(2))
            height, wide = height // 2, wide // 2

    class ToNHWCFlat(nn.Module):  # flatten in ocljax's [H, W, C] order, so weights map 1:1
        def forward(self, x):
            return torch.flatten(x.permute(0, 2, 3, 1), 1)

    return nn.Sequential(*layers, ToNHWCFlat(), nn.Linear(height * wide * c_in, width),
                         nn.ReLU(), nn.Linear(width, num_classes))


def _reduced_resnet18(in_channels: int, num_classes: int, nf: int):
    """Twin of ``ocljax.models.resnet.ReducedResNet18Module`` (Lopez-Paz & Ranzato 2017)."""
    from torch import nn
    from torch.nn.functional import relu

    def conv3x3(c_in, c_out, stride=1):
        return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)

    class BasicBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1, self.bn1 = conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out)
            self.conv2, self.bn2 = conv3x3(c_out, c_out), nn.BatchNorm2d(c_out)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

        def forward(self, x):
            out = relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return relu(out + self.shortcut(x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = conv3x3(in_channels, nf), nn.BatchNorm2d(nf)
            blocks, c_in = [], nf
            for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
                blocks += [BasicBlock(c_in, nf * mult, stride), BasicBlock(nf * mult, nf * mult, 1)]
                c_in = nf * mult
            self.blocks = nn.Sequential(*blocks)
            self.linear = nn.Linear(8 * nf, num_classes)

        def forward(self, x):
            out = self.blocks(relu(self.bn1(self.conv1(x))))
            return self.linear(out.mean(dim=(2, 3)))  # = avg_pool2d(out, 4) for 32x32 inputs

    return ResNet()


def torch_model(name: str, in_shape, num_classes: int, width: int | None = None):
    """The PyTorch twin of ``ocljax.models.make_model(name, num_classes, width)``.

    ``in_shape`` is one sample's [H, W, C] shape as ocljax stores it; the twins take float NCHW
    input (``mlp`` flattens whatever it gets). ``width``: the hidden width of ``mlp`` (two layers)
    and the dense width of ``cnn`` (256 by default, as ``make_model``), the base channel count
    ``nf`` of ``resnet18`` (20). PyTorch keeps its own initialisation; the layers and parameter
    counts are the same.
    """
    in_shape = tuple(int(d) for d in in_shape)
    if name == "mlp":
        return _mlp(int(np.prod(in_shape)), (width or 256,) * 2, num_classes)
    if name == "cnn":
        return _small_cnn(in_shape, num_classes, width or 256)
    if name == "resnet18":
        return _reduced_resnet18(in_shape[-1], num_classes, width or 20)
    raise ValueError(f"no PyTorch twin of model {name!r}; choose mlp, cnn or resnet18")


def images(x):
    """A batch of images as the loop feeds them: torch uint8 [N, H, W, C] -> float
    [N, C, H, W] in [0, 1]."""
    return x.permute(0, 3, 1, 2).float() / 255.0


def accuracy(net, tx, ty) -> float:
    """``net``'s accuracy on the whole test set (torch uint8 images ``tx``, labels ``ty``),
    ``EVAL_BATCH`` images at a time, in eval mode; leaves ``net`` in training mode."""
    import torch

    net.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(tx), EVAL_BATCH):
            pred = net(images(tx[i:i + EVAL_BATCH])).argmax(1)
            correct += (pred == ty[i:i + EVAL_BATCH]).sum().item()
    net.train()
    return correct / len(tx)


def run(train_x, train_y, test_x, test_y, order, task_ends, *, buffer_size=1000, batch=10,
        replay=10, lr=0.1, hidden=(256, 256), seed=0, model="mlp", width=None, device="cpu",
        max_steps=None, eval_every=0, eval_idx=None) -> dict:
    """Train one seed through ``order`` (pool indices, [n_batches, batch]) with online ER;
    returns timings and the final average accuracy.

    ``model``: ``mlp`` (``hidden`` layers, or two of ``width`` when given), ``cnn`` or
    ``resnet18`` (see ``torch_model``). ``device``: ``"cpu"`` or ``"cuda"``; on a GPU the data
    and the buffer live there. ``max_steps``: train on the first ``max_steps`` batches of
    ``order`` only (to time a big model on a prefix); if that prefix reaches no task end, the
    accuracy is measured once after the clock stops. ``eval_every`` > 0 adds ocljax's
    continual evaluation: every ``eval_every`` steps since the task's start, except at the
    task's end (which evaluates on the whole test set), the accuracy on the test rows
    ``eval_idx`` (default: all), so that the loop can do the work an ocljax run with
    continual evaluation does.
    """
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev = torch.device(device)
    num_classes = int(train_y.max()) + 1
    if model == "mlp":
        net = _mlp(int(np.prod(train_x.shape[1:])), hidden if width is None else (width,) * 2,
                   num_classes)
    else:
        net = torch_model(model, train_x.shape[1:], num_classes, width)
    net = net.to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()

    # Images stay uint8 [N, H, W, C] on the device and are converted batch by batch.
    xs = torch.from_numpy(np.ascontiguousarray(train_x)).to(dev)
    ys = torch.from_numpy(train_y.astype(np.int64)).to(dev)
    tx = torch.from_numpy(np.ascontiguousarray(test_x)).to(dev)
    ty = torch.from_numpy(test_y.astype(np.int64)).to(dev)
    height, wide, channels = train_x.shape[1:]
    buf_x = torch.zeros(buffer_size, channels, height, wide, device=dev)
    buf_y = torch.zeros(buffer_size, dtype=torch.long, device=dev)

    steps = order if max_steps is None else order[:max_steps]
    if eval_idx is None:
        cx, cy = tx, ty
    else:
        rows = torch.from_numpy(np.asarray(eval_idx)).to(dev)
        cx, cy = tx[rows], ty[rows]
    seen = task_start = 0
    accs, continual = [], []
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for step, idx in enumerate(steps):
        idx = torch.from_numpy(idx).to(dev)
        x, y = images(xs[idx]), ys[idx]
        if seen > 0:
            r = torch.from_numpy(rng.choice(min(seen, buffer_size), min(replay, seen),
                                            replace=False)).to(dev)
            x_all, y_all = torch.cat([x, buf_x[r]]), torch.cat([y, buf_y[r]])
        else:
            x_all, y_all = x, y
        opt.zero_grad()
        loss_fn(net(x_all), y_all).backward()
        opt.step()
        slots = {}  # reservoir sampling (Vitter's Algorithm R): buffer slot -> batch row
        for i in range(len(idx)):
            if seen < buffer_size:
                slots[seen] = i
            else:
                j = int(rng.integers(0, seen + 1))
                if j < buffer_size:
                    slots[j] = i  # a later row of the batch overwrites an earlier one
            seen += 1
        if slots:
            dst = torch.tensor(list(slots), device=dev)
            src = torch.tensor(list(slots.values()), device=dev)
            buf_x[dst], buf_y[dst] = x[src], y[src]
        if step + 1 in task_ends:
            accs.append(accuracy(net, tx, ty))
            task_start = step + 1
        elif eval_every and (step + 1 - task_start) % eval_every == 0:
            continual.append(accuracy(net, cx, cy))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if not accs:
        accs.append(accuracy(net, tx, ty))
    return {"seconds": seconds, "samples": int(steps.size), "steps": len(steps),
            "device": str(dev), "final_test_accuracy": accs[-1],
            "continual_evaluations": len(continual)}
