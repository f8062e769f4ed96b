"""Distil a small language-model head whose vocabulary is split over ranks.

    torchrun --nproc-per-node 2 examples/vocab_parallel_kd.py          # gloo on CPU, nccl on GPUs

Each rank holds a contiguous slice of the vocabulary's rows of the student's and the teacher's
lm_head (Megatron's ColumnParallelLinear; uneven slices are fine), and the same hidden states
(a replicated trunk). ``vocab_parallel_kd_loss`` gives every rank the loss of the whole
vocabulary and the gradient of its own logits; no rank ever builds the [tokens, vocabulary]
logits. The trunk's input gradient is the sum of every slice's part, so it is all-reduced in
the backward, as Megatron's ColumnParallelLinear does (``_CopyToSlices``). ``--check`` gathers
the logits on every rank once at the end, for this demonstration only, and compares the last
loss with ``fused_kd_loss`` on them.
"""
import argparse
import os

import torch
import torch.distributed as dist

from lepton_fast import fused_kd_loss
from lepton_fast.distributed import vocab_parallel_kd_loss


class _CopyToSlices(torch.autograd.Function):
    """Identity forward; the backward sums the input gradient over the ranks, whose heads
    each see the hidden states through their own slice of the vocabulary."""

    @staticmethod
    def forward(ctx, hidden):
        return hidden

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad


def my_slice(vocab: int, rank: int, world: int) -> slice:
    """This rank's rows of the vocabulary: the first ranks one more when it does not divide."""
    base, extra = divmod(vocab, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def gather_classes(logits: torch.Tensor, vocab: int, world: int) -> torch.Tensor:
    """The [tokens, vocab] logits from every rank's slice (padded to the widest for all_gather)."""
    widths = [my_slice(vocab, r, world).stop - my_slice(vocab, r, world).start for r in range(world)]
    padded = torch.zeros(logits.shape[0], max(widths), device=logits.device)
    padded[:, : logits.shape[1]] = logits
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:, :w] for p, w in zip(parts, widths)], -1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=5003, help="classes (odd on purpose: uneven slices)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--check", action="store_true", help="compare the last loss with the single-device op")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)

    # The same seed everywhere: the replicated trunk and data are equal on every rank, and each
    # rank takes its rows of heads drawn whole (a real model would initialise its slice alone).
    torch.manual_seed(0)
    rows = my_slice(args.vocab, rank, world)
    trunk = torch.nn.Sequential(torch.nn.Linear(args.hidden, args.hidden), torch.nn.Tanh()).to(device)
    student_head = torch.nn.Parameter(torch.randn(args.vocab, args.hidden)[rows].to(device) * 0.1)
    teacher_head = (torch.randn(args.vocab, args.hidden)[rows] * 0.3).to(device)
    optimizer = torch.optim.Adam([*trunk.parameters(), student_head], lr=1e-2)

    for step in range(args.steps):
        x = torch.randn(args.tokens, args.hidden, device=device)
        labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
        labels[::7] = -100  # padding tokens
        hidden = _CopyToSlices.apply(trunk(x))
        student_logits = hidden @ student_head.T  # [tokens, this rank's slice]
        teacher_logits = x @ teacher_head.T
        loss = vocab_parallel_kd_loss(student_logits, teacher_logits, args.temperature, labels=labels, alpha=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.5f}  (rank 0 holds {rows.stop - rows.start} of "
                  f"{args.vocab} classes)", flush=True)

    if args.check:
        whole = fused_kd_loss(gather_classes(student_logits.detach(), args.vocab, world),
                              gather_classes(teacher_logits, args.vocab, world), args.temperature, labels=labels,
                              alpha=0.1)
        torch.testing.assert_close(loss.detach(), whole, rtol=1e-5, atol=1e-6)
        if rank == 0:
            print(f"check: the single-device fused_kd_loss on the gathered logits gives {whole.item():.5f}: equal")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
