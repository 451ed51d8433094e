"""StepMemoryMeter against hand-computed sizes (docs/DESIGN.md §4)."""
import torch
from torch.utils.checkpoint import checkpoint

from memtl.memory import StepMemoryMeter

MIB = 2**20


def two_layer(lin, x):
    return torch.relu(lin(torch.relu(lin(x))))


def test_saved_bytes_are_the_activations_not_the_parameters():
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 512)
    x = torch.randn(256, 512)  # 0.5 MiB per activation
    meter = StepMemoryMeter("cpu", lin.parameters())
    with meter:
        y = two_layer(lin, x)
        meter.mark_backward()
        y.sum().backward()
    # saved: x (input of lin), relu out (input of lin 2, same storage for relu's own save), final relu out
    assert meter.saved_tensor_bytes == 3 * 256 * 512 * 4
    # the step's peak holds at least those activations plus the weight/bias grads
    assert meter.peak_step_bytes >= meter.saved_tensor_bytes + lin.weight.numel() * 4 - 256 * 512 * 4
    assert meter.peak_step_bytes < 16 * MIB


def test_recomputation_inside_backward_is_not_counted_as_saved():
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 512)
    x = torch.randn(256, 512, requires_grad=True)
    plain, ckpt = StepMemoryMeter("cpu", lin.parameters()), StepMemoryMeter("cpu", lin.parameters())
    with plain:
        y = two_layer(lin, x)
        plain.mark_backward()
        y.sum().backward()
    with ckpt:  # reentrant checkpointing: forward under no_grad, recompute with grad in backward
        y = checkpoint(two_layer, lin, x, use_reentrant=True)
        ckpt.mark_backward()
        y.sum().backward()
    assert ckpt.saved_tensor_bytes == 256 * 512 * 4  # only the checkpoint's input
    assert ckpt.saved_tensor_bytes < plain.saved_tensor_bytes
