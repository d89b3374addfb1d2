"""GE2E speaker encoder (Wan et al. 2018, "Generalized End-to-End Loss for Speaker
Verification"), the LSTM d-vector network of resemblyzer / Real-Time-Voice-Cloning.

    mel frames (B, T, n_mels) -> LSTM x num_layers -> h_T of the last layer (B, H)
        -> linear (H -> E) -> ReLU -> x / ||x||_2 = embedding (B, E)

Each LSTM layer follows PyTorch's `nn.LSTM` (gate order i, f, g, o; two biases; zero
initial state):

    z_t = x_t W_ih + b_ih + h_{t-1} W_hh + b_hh = [i | f | g | o]      (4H)
    c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g),    h_t = sigmoid(o) * tanh(c_t)

The input projections x_t W_ih of all steps are one matmul; only h_{t-1} W_hh runs in the
`lax.scan` over time. Every frame counts: the embedding of a clip padded with silence is that
of the padded clip (resemblyzer pads its last partial window the same way).

Parameter tree ('/'-joined; torch name of `VoiceEncoder` in brackets, kernels transposed):

    lstm_{l}/ih/kernel  (D_l, 4H)   [lstm.weight_ih_l{l}]   D_0 = n_mels, D_l = H for l > 0
    lstm_{l}/ih/bias    (4H,)       [lstm.bias_ih_l{l}]
    lstm_{l}/hh/kernel  (H, 4H)     [lstm.weight_hh_l{l}]
    lstm_{l}/hh/bias    (4H,)       [lstm.bias_hh_l{l}]
    linear/kernel       (H, E)      [linear.weight]
    linear/bias         (E,)        [linear.bias]

`tljax.pretrained.ge2e` converts resemblyzer's pretrained weights (40 mels, H = E = 256,
3 layers) and implements its mel front end (16 kHz, 25 ms Hann window, 10 ms hop, 40 Slaney
mel bands, power spectrogram without log).

Backbone contract: `__call__(inputs, train=False) -> (embedding, out)`; `inputs` is the batch
dict (its 'mel') or the (B, T, n_mels) array itself; `out` holds 'frames' (B, T, H), the last
layer's hidden states, 'hidden' (B, H), its final state, and 'pre_norm' (B, E), the ReLU
output before normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp


def _uniform(scale: float) -> nn.initializers.Initializer:
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


class Recurrence(nn.Module):
    """h_{t-1} W_hh + b_hh added to precomputed input gates, scanned over time (see module
    docstring); returns all hidden states (B, T, H) and the final (h, c)."""

    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, gates_x: jnp.ndarray) -> tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
        h_size = self.hidden_size
        init = _uniform(1 / math.sqrt(h_size))  # PyTorch's LSTM initialisation
        kernel = self.param("kernel", init, (h_size, 4 * h_size)).astype(self.dtype)
        bias = self.param("bias", init, (4 * h_size,)).astype(self.dtype)

        def step(carry, gx):
            h, c = carry
            z = gx + h @ kernel + bias
            i, f, g, o = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
            return (h, c), h

        batch = gates_x.shape[0]
        zeros = jnp.zeros((batch, h_size), self.dtype)
        (h, c), hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(gates_x, 0, 1))
        return jnp.swapaxes(hs, 0, 1), (h, c)


class LSTMLayer(nn.Module):
    """One PyTorch-style LSTM layer: `ih` (input projection) and `hh` (recurrence)."""

    hidden_size: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, tuple[jnp.ndarray, ...]]:
        init = _uniform(1 / math.sqrt(self.hidden_size))
        gates_x = nn.Dense(4 * self.hidden_size, dtype=self.dtype, kernel_init=init,
                           bias_init=init, name="ih")(x)
        return Recurrence(self.hidden_size, self.dtype, name="hh")(gates_x)


class GE2E(nn.Module):
    """GE2E speaker encoder; see the module docstring. `dtype` is the compute dtype (params
    stay float32, outputs are float32)."""

    inputs: ClassVar[tuple[str, ...]] = ("mel",)

    n_mels: int = 40
    hidden_size: int = 256
    embedding_size: int = 256
    num_layers: int = 3
    dtype: Any = jnp.float32

    def blocks(self) -> list[str]:
        """Regexes of parameter paths from the input to the output, one per block group."""
        return [f"^lstm_{i}/" for i in range(self.num_layers)] + ["^linear/"]

    @nn.compact
    def __call__(self, inputs: Mapping[str, jnp.ndarray] | jnp.ndarray,
                 train: bool = False) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        del train  # No dropout or batch statistics.
        if isinstance(inputs, Mapping):
            if "mel" not in inputs:
                raise KeyError(f"GE2E inputs need 'mel' (got keys {sorted(inputs)}).")
            inputs = inputs["mel"]
        x = jnp.asarray(inputs, self.dtype)
        if x.ndim != 3 or x.shape[-1] != self.n_mels:
            raise ValueError(f"GE2E expects mel frames (batch, frames, {self.n_mels}), got "
                             f"{x.shape}.")
        for i in range(self.num_layers):
            x, (h, _) = LSTMLayer(self.hidden_size, self.dtype, name=f"lstm_{i}")(x)
        init = _uniform(1 / math.sqrt(self.hidden_size))  # PyTorch's Linear initialisation
        raw = nn.relu(nn.Dense(self.embedding_size, dtype=self.dtype, kernel_init=init,
                               bias_init=init, name="linear")(h)).astype(jnp.float32)
        # resemblyzer divides by the norm alone; the floor only guards an all-zero ReLU output.
        embedding = raw / jnp.maximum(jnp.linalg.norm(raw, axis=-1, keepdims=True), 1e-12)
        out = {"frames": x.astype(jnp.float32), "hidden": h.astype(jnp.float32),
               "pre_norm": raw}
        return embedding, out


def make(**kwargs: Any) -> GE2E:
    """A GE2E encoder; defaults are resemblyzer's (40 mels, 3 x 256 LSTM, 256-d embedding)."""
    return GE2E(**kwargs)
