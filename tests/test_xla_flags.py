"""tljax.xla_flags: default XLA flags that never override the user's own."""

import jax
import jax.numpy as jnp
import pytest

from tljax import xla_flags

FLAG = "xla_cpu_experimental_ynn_fusion_type"


def test_defaults_are_added_to_the_users_flags():
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    added = xla_flags.apply(env, jaxlib_version="0.10.2")
    assert added == [f"--{FLAG}=-reduce"]
    assert env["XLA_FLAGS"] == f"--xla_dump_to=/tmp/x --{FLAG}=-reduce"
    assert xla_flags.apply(env, jaxlib_version="0.10.2") == []  # idempotent
    empty: dict[str, str] = {}
    xla_flags.apply(empty, jaxlib_version="0.10.2")
    assert empty == {"XLA_FLAGS": f"--{FLAG}=-reduce"}


@pytest.mark.parametrize("env", [
    {"XLA_FLAGS": f"--{FLAG}=individual_dot"},  # the user's value wins
    {"XLA_FLAGS": f"{FLAG}=individual_dot"},
    {"TLJAX_XLA_DEFAULTS": "0"},  # opted out
])
def test_the_user_decides(env):
    before = dict(env)
    assert xla_flags.apply(env, jaxlib_version="0.10.2") == []
    assert env == before


def test_unmeasured_jaxlib_gets_no_flags():
    # XLA aborts on an unknown flag: nothing is added where the flags were not measured.
    env: dict[str, str] = {}
    assert xla_flags.apply(env, jaxlib_version="0.11.0") == []
    assert xla_flags.apply(env, jaxlib_version="") == []
    assert env == {}


def test_reductions_leave_ynnpack_in_this_process():
    """Importing tljax set the flag: a reduction compiles to XLA's own loops."""
    import os

    if f"--{FLAG}=-reduce" not in os.environ.get("XLA_FLAGS", ""):
        pytest.skip("the default is not in force here (user flags, opt-out or other jaxlib)")
    x = jnp.ones((64, 10, 144))
    text = jax.jit(lambda x: jnp.sum(x[:, 1:9] * x[:, :8], axis=(0, 1))).lower(x).compile()
    assert "ynn_fusion" not in text.as_text()
