"""Parameter sharding from logical-axis rules, and sharded training == 1-device training.

The multi-device part runs tests/_sharding_worker.py in a subprocess with 8 fake CPU devices
(XLA_FLAGS must be set before JAX is imported; this pytest process keeps its single device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import pathlib

import jax
import numpy as np
import pytest

from bioscan_jax import sharding as mesh_lib

TESTS = pathlib.Path(__file__).resolve().parent
ROOT = TESTS.parent

# What DEFAULT_SHARDING_RULES say for the tiny test model: embed→fsdp, mlp→tensor, vocab→tensor.
TINY_SPECS = {
    "['embed']['embedding']": ("tensor", "fsdp"),  # (vocab, embed)
    "['fc1']['kernel']": ("fsdp", "tensor"),  # (embed, mlp)
    "['fc1']['bias']": ("tensor",),  # (mlp,)
    "['fc2']['kernel']": ("tensor", "fsdp"),  # (mlp, embed)
    "['fc2']['bias']": ("fsdp",),  # (embed,)
    "['head']['kernel']": ("fsdp", "tensor"),  # (embed, vocab)
    "['norm']['scale']": (),  # unannotated → replicated
    "['norm']['bias']": (),
}
MESHES = {
    "data8": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp8": {"data": 1, "fsdp": 8, "tensor": 1},
    "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2},
}


def _spec_str(spec: tuple) -> str:
    return str(tuple(spec))


def _shard_shape(shape, spec, sizes):
    out = list(shape)
    for i, axes in enumerate(spec):
        for a in (axes,) if isinstance(axes, str) else (axes or ()):
            out[i] //= sizes[a]
    return out


@pytest.fixture(scope="module")
def worker():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    proc = subprocess.run([sys.executable, str(TESTS / "_sharding_worker.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_tiny_params_sharded_as_rules_say(worker, mesh_name):
    assert worker["devices"] == 8
    info = worker["tiny"][mesh_name]
    sizes = MESHES[mesh_name]
    for key, spec in TINY_SPECS.items():
        got = info["params"][key]
        assert got["spec"] == _spec_str(spec), (mesh_name, key, got)
        assert got["shard"] == _shard_shape(got["shape"], spec, sizes), (mesh_name, key, got)
        # Adam's moments live with their parameter.
        assert info["mu"][key]["spec"] == got["spec"], (mesh_name, key)
        assert info["mu"][key]["shard"] == got["shard"], (mesh_name, key)
    assert info["batch_spec"] == _spec_str((("data", "fsdp"),))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_steps_match_single_device(worker, mesh_name):
    info = worker["tiny"][mesh_name]
    assert len(info["losses"]) == 3
    np.testing.assert_allclose(info["losses"], info["ref_losses"], rtol=1e-5)
    assert info["max_rel_param_diff"] < 1e-5


def test_kmer_bert_sharding(worker):
    kb = worker["kmer_bert"]
    if "skipped" in kb:
        pytest.skip(kb["skipped"])
    info = kb["d2f2t2"]
    params = info["params"]
    expected = {
        "word": ("tensor", "fsdp"),  # (vocab 258, embed)
        "position": (None, "fsdp"),
        "qkv']['kernel": ("fsdp", None, "tensor"),  # (embed, 3, heads, kv)
        "out']['kernel": ("tensor", None, "fsdp"),  # (heads, kv, embed)
        "fc1']['kernel": ("fsdp", "tensor"),  # (embed, mlp)
        "fc2']['kernel": ("tensor", "fsdp"),  # (mlp, embed)
        "classifier']['kernel": ("fsdp", "tensor"),  # (embed, vocab 256)
    }
    for frag, spec in expected.items():
        hits = [k for k in params if frag in k]
        assert hits, frag
        for k in hits:
            assert params[k]["spec"] == _spec_str(spec), (k, params[k])
            assert params[k]["shard"] == _shard_shape(params[k]["shape"], spec, MESHES["d2f2t2"]), k
    np.testing.assert_allclose(info["losses"], info["ref_losses"], rtol=1e-5)
    assert info["max_abs_param_diff_over_scale"] < 1e-5


# -- the rules mapper itself (abstract meshes: no devices needed) -------------------------------


def _abstract(data, fsdp, tensor):
    return jax.sharding.AbstractMesh((data, fsdp, tensor), mesh_lib.MESH_AXES)


def test_rules_map_logical_names():
    m = _abstract(2, 2, 2)
    rules = mesh_lib.DEFAULT_SHARDING_RULES
    P = jax.sharding.PartitionSpec
    assert mesh_lib.logical_to_spec(("embed", "mlp"), (8, 8), m, rules) == P("fsdp", "tensor")
    assert mesh_lib.logical_to_spec(("heads", "kv", "embed"), (4, 8, 8), m, rules) == P("tensor", None, "fsdp")
    assert mesh_lib.logical_to_spec(("batch", "length"), (8, 5), m, rules) == P(("data", "fsdp"))
    assert mesh_lib.logical_to_spec(None, (3,), m, rules) == P()


def test_indivisible_dimension_falls_back_to_replication(caplog):
    m = _abstract(1, 4, 4)
    rules = mesh_lib.DEFAULT_SHARDING_RULES
    fallbacks = []
    # vocab 4**4 + 2 = 258 does not divide tensor=4: replicated, reported.
    spec = mesh_lib.logical_to_spec(("vocab", "embed"), (258, 128), m, rules, name="word", fallbacks=fallbacks)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert len(fallbacks) == 1 and "word" in fallbacks[0] and "258" in fallbacks[0]


def test_mesh_axis_used_once_per_array_and_candidates_in_order():
    m = _abstract(2, 4, 1)
    P = jax.sharding.PartitionSpec
    rules = mesh_lib.DEFAULT_SHARDING_RULES
    assert mesh_lib.logical_to_spec(("embed", "embed"), (8, 8), m, rules, fallbacks=[]) == P("fsdp")
    # Several rules for one name: the first that fits wins.
    rules2 = (("batch", ("data", "fsdp")), ("batch", "data"))
    assert mesh_lib.logical_to_spec(("batch",), (6,), m, rules2, fallbacks=[]) == P("data")
    assert mesh_lib.logical_to_spec(("batch",), (16,), m, rules2, fallbacks=[]) == P(("data", "fsdp"))


def test_unknown_logical_name_is_a_config_error():
    with pytest.raises(ValueError, match="no sharding rule.*config.sharding_rules"):
        mesh_lib.logical_to_spec(("embed", "experts"), (8, 8), _abstract(1, 1, 1), mesh_lib.DEFAULT_SHARDING_RULES,
                                 name="moe.kernel")
    with pytest.raises(ValueError, match="unknown mesh axes"):
        mesh_lib.logical_to_spec(("embed",), (8,), _abstract(1, 1, 1), (("embed", "model"),))
