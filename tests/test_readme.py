"""The README's examples run as written (on the emulator here; the GPU lines where one is
present)."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(section):
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    end = text.index("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end], flags=re.S)


def test_example_section_runs():
    blocks = python_blocks("Example")
    assert len(blocks) >= 3
    namespace = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # What the examples claim: the layer's gradients exist; the W4A16 GEMM equals the GEMM
    # with the dequantized weight.
    assert namespace["hidden"].grad is not None and namespace["layer"].w13.grad is not None
    with namespace["moe_kernels"].use_backend("simt"):
        want = namespace["moe_kernels"].grouped_gemm(
            namespace["x"], namespace["quant"].dequantize(namespace["qw13"]), namespace["plan"].offsets,
            gather=namespace["plan"].gather, activation="silu_and_mul")
    assert torch.equal(namespace["h4"], want)
