"""tools/benchmark_suites.py's step suite: the systems it times are the ones it names."""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import benchmark_suites  # noqa: E402

from tljax.models import layers  # noqa: E402


def test_step_suite_times_the_n_d_dense_step_and_counts_the_forward_flops():
    """`tljax_nd_dense` compiles Flax's N-D Dense dots (more layout transposes on CPU than the
    default 2-D matmuls), the switch is restored afterwards, and MFU's model FLOPs are 3 x the
    forward's as counted from the lowered module: close to the analytic matmul count."""
    args = argparse.Namespace(model="Ti/16", res=32, batch=2, classes=10, reps=1,
                              dtype="float32", attention="xla", remat=None,
                              systems="tljax,tljax_nd_dense", torch_compile=False,
                              peak_tflops=1.0)
    results = benchmark_suites.step_suite(args)
    ours, nd = (results["systems"][k]["hlo_ops"] for k in ("tljax", "tljax_nd_dense"))
    assert nd["transpose"] + nd["copy"] > ours["transpose"] + ours["copy"]
    assert layers.DENSE_AS_2D_MATMUL
    # ViT-Ti/16 at 32 px: 5 tokens, 12 blocks of width 192 (QKV + out: 4 D^2, MLP: 8 D^2
    # multiply-adds per token), the patch embedding (4 patches) and a 10-class head.
    width, tokens = 192, 5
    matmuls = 2 * args.batch * (12 * tokens * 12 * width**2 + 4 * 16 * 16 * 3 * width
                                + width * 10)
    forward = results["model_flops_per_step"] / 3
    assert matmuls < forward < 1.2 * matmuls
