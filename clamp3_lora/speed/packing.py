"""Where the real tokens of a padded batch are: computed on the CPU by the collate function (in the
DataLoader workers), so that the fast paths need no host sync to find them on the GPU."""
import torch
import torch.nn.functional as F


def packing(mask):
    """(index, cu) of the real tokens of a [B, L] mask (nonzero = real token): index [T] int64, the
    flat positions row * L + column in row-major order; cu [B + 1] int32, the cumulative token
    counts. On a CPU mask this needs no device sync; fast.Tokens.of takes the result as `packed`."""
    real = mask != 0
    index = real.reshape(-1).nonzero().squeeze(1)
    cu = F.pad(real.sum(1).cumsum(0), (1, 0)).to(torch.int32)
    return index, cu
