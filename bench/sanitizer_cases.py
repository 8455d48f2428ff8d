"""Small cases of every CUDA kernel, run under compute-sanitizer by device_check.sh.

Exits non-zero if any result is wrong; the sanitizer reports memory errors, races and reads of
uninitialized memory on its own.
"""
import torch

from cnnfast import ops
from cnnfast.testing import assert_close_to_reference
from tests.test_global_avg_pool import LAYOUTS, make_input, reference_global_avg_pool


def main():
    torch.manual_seed(0)
    cases = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for layout in LAYOUTS:
            for shape in [(2, 24, 3, 5), (1, 3, 2, 2), (3, 130, 4, 1)]:
                x = make_input(shape, dtype, "cuda", layout)
                out = ops.global_avg_pool(x, backend="cuda")
                torch.cuda.synchronize()
                assert_close_to_reference(out, reference_global_avg_pool(x), "elementwise")
                cases += 1
    print(f"sanitizer cases: {cases} global_avg_pool runs checked")


if __name__ == "__main__":
    main()
