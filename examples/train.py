"""The worker script that torchrun runs in the etcd-v3 demo and end-to-end tests.

Each worker joins the gloo process group torchrun describes through its environment
(``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``, ...), trains a one-layer model for a few steps on
random CPU data (each step all-reduces and averages the gradients, as
``DistributedDataParallel`` would), all-reduces its rank and checks the sum, and prints one
line::

    RESULT rank=R world=W local=L group=G restart=N sum=S expected=E in_sync=1 ...

It also prints ``STARTED ...`` once the process group is up, so that a test or demo knows the
workers of a round are running (for instance, before it kills a node). Every line is written
with a single ``os.write`` so that lines of the workers sharing torchrun's stdout never
interleave. A wrong sum, or replicas that drifted apart, exit with code 3.

Usage: ``torchrun ... examples/train.py [--steps N] [--sleep SECONDS] [--min-world W]``.
With ``--min-world W``, workers of a world smaller than ``W`` wait after ``--steps`` (printing
``WAITING ...`` once) until torchrun restarts them because a node joined, or until
``--min-world-timeout`` passes: an elastic job that shrank waits for capacity to come back.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import warnings
from collections.abc import Sequence

__all__ = ["main"]


def emit(text: str) -> None:
    """Write ``text`` and a newline to stdout in one system call."""
    os.write(sys.stdout.fileno(), (text + "\n").encode())


def _env_int(name: str, default: int = -1) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.lstrip("-").isdigit() else default


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps (default 5)")
    parser.add_argument("--sleep", type=float, default=0.0,
                        help="seconds to sleep after each step, to keep the job running")
    parser.add_argument("--min-world", type=int, default=0,
                        help="in a smaller world, wait after --steps until torchrun restarts "
                             "the workers (a node joined) or --min-world-timeout passes")
    parser.add_argument("--min-world-timeout", type=float, default=60.0,
                        help="seconds to wait in a world below --min-world (default 60)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="gloo collective timeout in seconds (default 60)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # torch's CPU wheel warns on import when numpy is missing; the workers do not need it.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    import torch
    import torch.distributed as dist

    restart = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
    local = _env_int("LOCAL_RANK")
    group = _env_int("GROUP_RANK")
    started = time.monotonic()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        tag = f"rank={rank} world={world} local={local} group={group} restart={restart}"
        emit(f"STARTED {tag} pid={os.getpid()} time={time.time():.3f}")

        # Same initial weights everywhere (as DDP's first broadcast), different data per rank.
        torch.manual_seed(1234)
        model = torch.nn.Linear(8, 1)
        torch.manual_seed(1234 + rank)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        target_weights = torch.arange(8, dtype=torch.float32)
        loss = 0.0
        step = 0
        waited_since: float | None = None
        while True:
            if step >= args.steps:
                if world >= args.min_world:
                    break
                # A shrunken job waits for capacity: torchrun restarts these workers in a
                # bigger world when a node joins; without one it finishes after the timeout.
                # The ranks agree (MIN of a flag) on when to stop, to stay in step.
                if waited_since is None:
                    waited_since = time.monotonic()
                    emit(f"WAITING {tag} min_world={args.min_world}")
                go_on = torch.tensor(
                    [int(time.monotonic() - waited_since < args.min_world_timeout)])
                dist.all_reduce(go_on, op=dist.ReduceOp.MIN)
                if not int(go_on.item()):
                    break
                time.sleep(max(args.sleep, 0.2))
                continue
            step += 1
            inputs = torch.randn(16, 8)
            targets = inputs @ target_weights
            optimizer.zero_grad()
            output = torch.nn.functional.mse_loss(model(inputs).squeeze(1), targets)
            torch.autograd.backward(output)
            for parameter in model.parameters():
                assert parameter.grad is not None
                dist.all_reduce(parameter.grad, op=dist.ReduceOp.SUM)
                parameter.grad /= world
            optimizer.step()
            loss = float(output.detach())
            if args.sleep > 0:
                time.sleep(args.sleep)

        # Averaged gradients keep the replicas identical: check it, then sum the ranks.
        weights = model.weight.detach().clone()
        reference = weights.clone()
        dist.broadcast(reference, src=0)
        in_sync = bool(torch.equal(weights, reference))
        ranks = torch.tensor([float(rank)])
        dist.all_reduce(ranks, op=dist.ReduceOp.SUM)
        total, expected = int(ranks.item()), world * (world - 1) // 2
        emit(f"RESULT {tag} sum={total} expected={expected} in_sync={int(in_sync)} "
             f"steps={step} loss={loss:.4f} seconds={time.monotonic() - started:.2f}")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0 if total == expected and in_sync else 3

if __name__ == "__main__":
    exit_code = main()
    # Leave without the interpreter's finalization. A gloo worker thread may still be
    # releasing a finished collective (its tensors hold Python objects) while Python shuts
    # down; its GIL acquire then ends the thread inside a noexcept destructor and the process
    # aborts ("terminate called without an active exception", SIGABRT), which torchrun
    # counts as a failed worker. It happens now and then on a busy machine (seen in a core
    # dump: ProcessGroupGloo::runLoop -> ~AsyncWork -> decref_pyobject -> take_gil). The
    # work is done and every line was written with os.write, so nothing is lost.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
