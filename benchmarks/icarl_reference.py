"""Agreement of our ``icarl`` strategy with Mammoth's (aimagelab/mammoth: ``models/icarl.py`` ``ICarl``,
``utils/buffer.py`` ``fill_buffer`` with herding, ``icarl_replay``): the same initial weights, incoming batches,
test images, buffer size, lr, weight penalty and seeds.

The reference is not part of this repository: give the root of a checkout with ``--reference`` and put kornia on
the path; this script contains none of its code. It imports the reference behind ``der_reference.py``'s stand-in
packages and wraps our ResNet-20 as ``lwf_ewc_reference.py`` does (``returnt='features'`` = our
``forward_features``). Per task the model gets a stand-in dataset whose ``train_loader`` holds the task's images in
our segment's order (``icarl_replay`` appends the exemplars to it, ``fill_buffer`` herds over it in batches of 32);
it is driven as its ``utils/training.py``: ``meta_begin_task``, ``net.train()``, ``meta_observe`` per batch,
``meta_end_task``, then an eval-mode pass (its nearest-mean ``forward``) over the test images of the tasks seen.

Runs per buffer size and seed:
  ours          our strategy: each incoming batch of 32 extended with its slice of the shuffled exemplars
  ref-shared    the reference trained on exactly our extended batches (recorded from ours): same computation
  ref           the reference as Mammoth runs it: the task's images and the exemplars merged and shuffled
                together (``torch.randperm``), batches of 32

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONPATH=/tmp/mm_deps python benchmarks/icarl_reference.py \\
        --reference /tmp/mammoth_ref --data-root ../shared/data/cifar10 --buffers 200,500 --seeds 0,1,2 \\
        --train-per-class 300 --test-per-class 200

Accuracies are over the classes seen so far, in %; one epoch per task, no augmentation on either side.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from argparse import Namespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from adab2n_reference import batches  # noqa: E402
from der_reference import (FakeDataset, accuracies, print_comparison, print_seed_means,  # noqa: E402
                           print_seed_table, split_cifar10)
from lwf_ewc_reference import mammoth_net, reference_classes  # noqa: E402

LR, L2, BATCH = 0.1, 1e-5, 32  # best_args.py seq-cifar10 (lr, optim_wd as opt_wd), batch_size


def run_ours(stream, model, seed, buffer_size):
    """Our ``icarl`` through the stream: eval logits per task, and the extended batches it trained on per task."""
    import ctta

    ours = ctta.strategies.create("icarl", model, seed=seed, buffer_size=buffer_size)
    trained, plain = [], ours.training_batch

    def recording(x, y):
        xb, yb = plain(x, y)
        trained[-1].append((xb.clone(), yb.clone()))
        return xb, yb

    ours.training_batch = recording
    out = []
    for seg in stream.segments:
        ours.segment_start(seg)
        bs, x, y = batches(seg)
        if seg.kind == "train":
            trained.append([])
            for xb, yb in bs:
                ours.learn(xb, yb)
        else:
            out.append((torch.cat([ours.predict(xb) for xb, _ in bs]), y))
        ours.segment_end(seg)
    return out, trained


class TaskData:
    """The task's training set as the reference reads and rewrites it (``data``, ``targets``)."""

    def __init__(self, x, y):
        self.data, self.targets = x, y

    def __len__(self):
        return len(self.data)


class Loader:
    """The task's train_loader as ``fill_buffer`` reads it: the dataset's current content in order, batches of 32."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        d = self.dataset
        for i in range(0, len(d.data), BATCH):
            x = d.data[i:i + BATCH]
            yield x, torch.as_tensor(d.targets[i:i + BATCH]).long(), x


class TaskDataset(FakeDataset):
    """der_reference's task layout, the current task's ``train_loader``, no normalisation, the buffer size."""

    train_loader = None

    def __init__(self, buffer_size):
        self.args = Namespace(buffer_size=buffer_size)

    def get_normalization_transform(self):
        return None


def run_reference(stream, model, seed, buffer_size, ref_classes, base, set_random_seed, shared_batches=None):
    """The reference's ICarl on the stream; with ``shared_batches`` (per task) it trains on those batches."""
    from models.icarl import ICarl  # noqa: E402  (the reference's)

    set_random_seed(seed)
    args = Namespace(lr=LR, optimizer="sgd", optim_wd=0.0, optim_mom=0.0, optim_nesterov=False, label_perc=1,
                     nowand=True, non_verbose=True, n_epochs=1, batch_size=BATCH, buffer_size=buffer_size,
                     minibatch_size=BATCH, opt_wd=L2, compute_theoretical_best=False,
                     use_original_icarl_transform=False, dataset="seq-cifar10")
    fake = TaskDataset(buffer_size)
    m = ICarl(mammoth_net(model, base), torch.nn.functional.cross_entropy, args, None, dataset=fake)
    m.device = torch.device("cpu")
    out, task = [], 0
    for seg in stream.segments:
        bs, x, y = batches(seg)
        if seg.kind == "train":
            fake.train_loader = Loader(TaskData(x.clone(), y.clone()))
            m.meta_begin_task(fake)
            m.net.train()
            if shared_batches is not None:
                train = shared_batches[task]
            else:
                d = fake.train_loader.dataset
                perm = torch.randperm(len(d.data))
                targets = torch.as_tensor(d.targets).long()
                train = [(d.data[perm[i:i + BATCH]], targets[perm[i:i + BATCH]]) for i in range(0, len(perm), BATCH)]
            assert not m.old_net.training if m.old_net is not None else True
            for xb, yb in train:
                m.meta_observe(xb, yb, xb)
            m.meta_end_task(fake)
            task += 1
        else:
            m.net.eval()
            with torch.no_grad():
                out.append((torch.cat([m(xb) for xb, _ in bs]), y))
            m.net.train()
    return out, m


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="root of the reference checkout")
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--buffers", default="200,500")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--runs", default="ours,ref-shared,ref")
    ap.add_argument("--train-per-class", type=int, default=300)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    classes, base, set_random_seed = reference_classes(args.reference)
    seeds = [int(s) for s in args.seeds.split(",")]
    buffers = [int(b) for b in args.buffers.split(",")]
    runs = args.runs.split(",")
    acc = {}
    for buf in buffers:
        for seed in seeds:
            stream, init = split_cifar10(args, seed)
            out, secs, trained = {}, {}, None
            for r in runs:
                t0 = time.time()
                model = copy.deepcopy(init)
                if r == "ours":
                    out[r], trained = run_ours(stream, model, seed, buf)
                else:
                    if r == "ref-shared" and trained is None:
                        raise SystemExit("ref-shared needs the ours run first")
                    out[r], _ = run_reference(stream, model, seed, buf, classes, base, set_random_seed,
                                              trained if r == "ref-shared" else None)
                secs[r] = time.time() - t0
                acc[(buf, seed, r)] = accuracies(out[r])
            print_seed_table(f"icarl, buffer {buf}, seed {seed}", acc, (buf, seed), runs, secs)
            if "ours" in out and "ref-shared" in out:
                print_comparison("ours vs ref-shared", out["ours"], out["ref-shared"], what="score")
    print_seed_means("buffer", [(b, runs) for b in buffers], seeds, acc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
