"""Train a small CNN on scikit-learn's handwritten digits with pyconvmpi layers.

The 1,797 real 8x8 images of ``sklearn.datasets.load_digits`` are split 80/20 into training
and test sets. The same network is trained twice from the same initial weights, once with
``pyconvmpi.torch.Conv2d`` layers and once with ``torch.nn.Conv2d``, and each epoch prints
the training loss, test accuracy and time of both.

Run it in one process or on several MPI ranks:

    python examples/train_digits.py
    OMP_NUM_THREADS=1 mpiexec -n 2 python -m mpi4py examples/train_digits.py

Each global batch is split between the ranks (data parallelism with
``pyconvmpi.parallel.DataParallel``), so with the same ``--seed`` and ``--batch-size`` the
loss curve on any number of ranks matches the one-process curve up to float32 rounding.
``--placement batch`` also makes every convolution a collective library call over the
ranks; the default ``local`` keeps the convolutions on each rank.
"""

import argparse
import copy
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=12, help="training epochs (default 12)")
    parser.add_argument("--quick", action="store_true",
                        help="short run for CI: 2 epochs unless --epochs is given")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="global batch size, summed over all ranks (default 32)")
    parser.add_argument("--lr", type=float, default=0.05,
                        help="SGD learning rate (default 0.05, momentum 0.9)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data split, initial weights and shuffling (default 0)")
    parser.add_argument("--placement", choices=("local", "batch"), default="local",
                        help="pyconvmpi layers compute on each rank alone (local) or as one "
                             "collective call with the batch split over ranks (batch)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="precision of the weights and data (default float32)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the reference run with torch.nn.Conv2d")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads per rank; default OMP_NUM_THREADS, else the cores of "
                             "the node divided by the ranks on it")
    parser.add_argument("--json", metavar="PATH",
                        help="write the per-epoch results to PATH as JSON (rank 0)")
    args = parser.parse_args(argv)
    if args.quick and "--epochs" not in (argv if argv is not None else sys.argv[1:]):
        args.epochs = 2
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be positive")
    return args


def configure_threads(comm, requested):
    """Choose the threads per rank and set OMP_NUM_THREADS before any OpenMP runtime starts.

    Ranks on one node share its cores: more threads than cores in total makes OpenMP
    threads spin against each other, so the default is cores / ranks on this node.
    """
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    ranks_on_node = node.Get_size()
    node.Free()
    if requested > 0:
        threads = requested
    elif os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])
    else:
        threads = max(1, len(os.sched_getaffinity(0)) // ranks_on_node)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def load_data(seed):
    """Return (x_train, y_train, x_test, y_test) as tensors, images scaled to [0, 1]."""
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype("float32")[:, None] / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    return (torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
            torch.from_numpy(x_test), torch.from_numpy(y_test).long())


def build_model(seed):
    """Return the CNN with torch.nn.Conv2d layers and weights drawn from ``seed``."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 32 x 4 x 4
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 64 x 2 x 2
        nn.Flatten(), nn.Linear(256, 10),
    )


def local_part(count, rank, size):
    """Return this rank's [start, stop) of ``count`` items; the first count % size get one more."""
    base, extra = divmod(count, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def train_epoch(dp, optimizer, x, y, order, batch_size, comm):
    """Train one epoch; return the mean loss of each global batch, over all ranks' samples.

    Each rank's loss is the sum of its samples' losses divided by the global batch size.
    The gradients summed over ranks are then those of the mean loss of the global batch,
    which is the mean of the per-rank means weighted by the local batch sizes, also when
    the split is uneven.
    """
    import torch

    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    rank, size = comm.Get_rank(), comm.Get_size()
    local_loss_sums = []
    batch_sizes = []
    dp.module.train()
    for begin in range(0, len(order), batch_size):
        batch = order[begin:begin + batch_size]
        start, stop = local_part(len(batch), rank, size)
        mine = batch[start:stop]
        optimizer.zero_grad(set_to_none=True)
        loss_sum = loss_fn(dp(x[mine]), y[mine])
        (loss_sum / len(batch)).backward()
        dp.sum_gradients()
        optimizer.step()
        local_loss_sums.append(loss_sum.item())
        batch_sizes.append(len(batch))
    # One reduction per epoch instead of one per step.
    loss_sums = np.array(local_loss_sums)
    comm.Allreduce(MPI.IN_PLACE, loss_sums, op=MPI.SUM)
    return loss_sums / np.array(batch_sizes)


def evaluate(dp, x, y, comm):
    """Return the test accuracy; every rank scores its share of the test set."""
    import torch

    start, stop = local_part(len(x), comm.Get_rank(), comm.Get_size())
    dp.module.eval()
    with torch.no_grad():
        correct = int((dp(x[start:stop]).argmax(dim=1) == y[start:stop]).sum())
    return comm.allreduce(correct, op=MPI.SUM) / len(x)


def run(args, comm):
    import torch

    import pyconvmpi.torch as pcm_torch
    from pyconvmpi.parallel import DataParallel

    dtype = getattr(torch, args.dtype)
    x_train, y_train, x_test, y_test = load_data(args.seed)
    x_train, x_test = x_train.to(dtype), x_test.to(dtype)
    reference = build_model(args.seed).to(dtype)
    layer_comm = comm if args.placement == "batch" else None
    placement = "batch" if args.placement == "batch" else "replicated"
    models = {"pyconvmpi": pcm_torch.convert(copy.deepcopy(reference), comm=layer_comm,
                                             placement=placement)}
    if not args.no_compare:
        models["torch"] = reference

    runs = {}
    for name, model in models.items():
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
        runs[name] = (DataParallel(model, comm), optimizer)

    epochs = []
    for epoch in range(1, args.epochs + 1):
        # The same permutation on every rank: each takes its part of every global batch.
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(
            args.seed * 1000 + epoch))
        batch_lengths = np.diff(np.append(np.arange(0, len(order), args.batch_size), len(order)))
        record = {"epoch": epoch}
        for name, (dp, optimizer) in runs.items():
            comm.Barrier()
            began = time.perf_counter()
            step_losses = train_epoch(dp, optimizer, x_train, y_train, order, args.batch_size,
                                      comm)
            comm.Barrier()
            seconds = time.perf_counter() - began
            accuracy = evaluate(dp, x_test, y_test, comm)
            # Epoch loss: the mean over all training samples.
            loss = float(np.dot(step_losses, batch_lengths) / len(x_train))
            record[name] = {"loss": loss, "accuracy": accuracy, "seconds": seconds,
                            "step_losses": step_losses.tolist()}
        epochs.append(record)
        if comm.Get_rank() == 0:
            print(f"epoch {epoch:3d}  " + "   ".join(
                f"{name}: loss {record[name]['loss']:.5f} test accuracy "
                f"{100 * record[name]['accuracy']:5.1f} % time {record[name]['seconds']:.3f} s"
                for name in runs), flush=True)
    return epochs


def summarise(epochs, names):
    """Return the summary lines: final accuracy and mean epoch time, and the time ratio."""
    lines = []
    mean_seconds = {}
    for name in names:
        seconds = [record[name]["seconds"] for record in epochs]
        mean_seconds[name] = sum(seconds) / len(seconds)
        lines.append(f"{name:>9}: final test accuracy {100 * epochs[-1][name]['accuracy']:.1f} %, "
                     f"mean time per epoch {mean_seconds[name]:.3f} s")
    if "torch" in mean_seconds:
        lines.append("time per epoch, pyconvmpi / torch.nn.Conv2d: "
                     f"{mean_seconds['pyconvmpi'] / mean_seconds['torch']:.2f}")
    return lines


def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    threads = configure_threads(comm, args.threads)

    import torch

    torch.set_num_threads(threads)
    if comm.Get_rank() == 0:
        print(f"digits CNN: {comm.Get_size()} rank(s) x {threads} thread(s), global batch "
              f"{args.batch_size}, {args.epochs} epochs, {args.dtype}, placement {args.placement}",
              flush=True)
    epochs = run(args, comm)
    names = [name for name in ("pyconvmpi", "torch") if name in epochs[0]]
    if comm.Get_rank() == 0:
        for line in summarise(epochs, names):
            print(line)
        if args.json:
            with open(args.json, "w") as handle:
                json.dump({"ranks": comm.Get_size(), "threads": threads,
                           "placement": args.placement, "batch_size": args.batch_size,
                           "dtype": args.dtype,
                           "seed": args.seed, "epochs": epochs}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
