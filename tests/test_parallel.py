"""Data-parallel training on 8 virtual CPU devices gives the params of one device.

The 8-device runs happen in a subprocess (``tests/_parallel_worker.py``) whose environment sets
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before jax is imported, so this test
process keeps its own devices. The worker trains a tiny CNN under every public transformation
for several steps that cross phase changes, once on one device and once on a mesh of 8 with
the batch sharded and the state replicated (one case shards a kernel where a user asks), and
reports per case the largest differences, the masks run step by step and the compiles.

The worker runs at XLA's default CPU optimization level. ``--xla_backend_optimization_level=0``
would halve its compile time, but at that level the 8-device run of a CNN whose 2x2 max-pool
is a reshape and a max (``models.max_pool_2x2``) differed from the 1-device run by 3e-3 in
the params (and 3e-4 in the batch statistics, so in the forward pass), against 1e-7 at the
default level: an XLA CPU code-generation difference, not a property of the library.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import optax_multirate as om
from optax_multirate import parallel

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_parallel_worker.py"
DEVICES = 8
TOL = 1e-5  # absolute, on params of order 1 after 8 steps (measured: below 1e-6)
PHASED = ("freeze_schedule", "multirate", "multirate_sgd", "wus", "multirate_sgd_sharded_params")


def _worker_cases() -> list[str]:
    """The worker's case names, read without running it (no 8-device flag here)."""
    spec = importlib.util.spec_from_file_location("_parallel_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.CASES)


def _child_env() -> dict[str, str]:
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith(("--xla_force_host_platform_device_count", "--xla_backend_opt"))
    ]
    flags += [f"--xla_force_host_platform_device_count={DEVICES}"]
    env = dict(os.environ, XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture(scope="module")
def report() -> dict:
    before = os.environ.get("XLA_FLAGS")
    proc = subprocess.run(
        [sys.executable, str(WORKER)],
        env=_child_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert os.environ.get("XLA_FLAGS") == before  # the parent's environment is untouched
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_worker_covers_every_public_transformation():
    cases = _worker_cases()
    missing = sorted(set(om.TRANSFORMATIONS) - set(cases))
    assert not missing, f"add a data-parallel case to tests/_parallel_worker.py for {missing}"


def test_parent_process_keeps_its_devices():
    # The 8 virtual devices live in the worker only; nothing here asked for them.
    assert "device_count=8" not in os.environ.get("XLA_FLAGS", "")
    assert jax.device_count() == len(jax.devices())


def test_runs_really_are_data_parallel(report):
    assert report["num_devices"] == DEVICES
    assert set(report["cases"]) == set(_worker_cases())
    for name, c in report["cases"].items():
        assert c["param_devices_1"] == [1], name
        assert c["param_devices_8"] == [DEVICES], name
        assert c["batch_devices_8"] == DEVICES, name
    sharded = report["cases"]["multirate_sgd_sharded_params"]
    for key in ("param_shardings_8", "opt_state_shardings_8"):  # Conv_1's kernel and its
        assert any("'data'" in s for s in sharded[key]), sharded[key]  # momentum stay split
    for name, c in report["cases"].items():
        if name != "multirate_sgd_sharded_params":
            for key in ("param_shardings_8", "opt_state_shardings_8"):  # replicated
                assert all("'data'" not in s for s in c[key]), (name, c[key])


def test_params_and_state_equal_one_device(report):
    for name, c in report["cases"].items():
        assert c["max_param_diff"] <= TOL, (name, c["max_param_diff"])
        # The optimizer state too: WUS's accumulated value= (the batch accuracy) is the
        # global-batch mean on 8 devices, the same number as on one.
        assert c["max_opt_state_diff"] <= TOL, (name, c["max_opt_state_diff"])
        assert c["max_model_state_diff"] <= TOL, (name, c["max_model_state_diff"])


def test_same_phases_step_by_step(report):
    for name, c in report["cases"].items():
        assert c["masks_8"] == c["masks_1"], name
        assert len(c["masks_1"]) >= 8, name
    for name in PHASED:  # these cross from full steps to partial ones and back
        masks = report["cases"][name]["masks_1"]
        assert len(set(masks)) == 2 and any("0" in m for m in masks), (name, masks)


def test_checkpoint_on_the_mesh_restores_bitwise_with_its_shardings(report):
    for name, c in report["cases"].items():
        if c["grows"]:  # the restore target has the stage-0 shapes
            continue
        assert c["checkpoint_8"] == {"bitwise": True, "shardings_kept": True}, name


def test_one_compile_per_mask(report):
    for name, c in report["cases"].items():
        # host dispatch compiles each distinct mask once (per grown stage), however many steps
        assert c["compiles_1"] == c["distinct_masks_1"], name
        assert c["compiles_8"] == c["distinct_masks_8"] == c["compiles_1"], name
        assert c["backend_compiles_8"] == c["compiles_8"], name  # nothing else compiled
        assert c["compiles_1"] < len(c["masks_1"]), name


def test_fit_with_a_mesh_equals_one_device(report):
    c = report["fit"]  # fit(..., step=make_train_step(..., mesh=mesh)) against one device
    assert c["max_param_diff"] <= TOL, c
    assert c["masks_8"] == c["masks_1"] and len(c["masks_1"]) == 2, c  # a WUS window ran
    assert c["compiles_8"] == c["compiles_1"] == 2, c
    assert c["param_devices_8"] == [DEVICES], c


# ------------------------------------------------------------------- helpers, in this process


def test_param_shardings_rules_and_errors():
    mesh = parallel.data_mesh()
    n = mesh.devices.size
    p = {"Dense_0": {"kernel": np.ones((3, 4 * n))}, "head": {"kernel": np.ones((4 * n, 3))}}
    s = parallel.param_shardings(p, mesh, {"^Dense_0/kernel$": PartitionSpec(None, "data")})
    assert s["Dense_0"]["kernel"].spec == PartitionSpec(None, "data")
    assert s["head"]["kernel"].spec == PartitionSpec()
    with pytest.raises(ValueError, match="nomatch"):
        parallel.param_shardings(p, mesh, {"nomatch": PartitionSpec("data")})
    with pytest.raises(ValueError, match="head/kernel"):
        parallel.param_shardings(p, mesh, {"head": PartitionSpec(None, None, "data")})
    with pytest.raises(ValueError, match="'model'"):
        parallel.param_shardings(p, mesh, {"head": PartitionSpec("model")})
    with pytest.raises(ValueError, match="rules"):
        parallel.param_shardings(p, mesh, {"head": "data"})


def test_shard_local_batch_equals_shard_batch_on_one_process():
    mesh = parallel.data_mesh()
    x = np.arange(4 * mesh.devices.size * 3, dtype=np.float32).reshape(-1, 3)
    a, b = parallel.shard_batch({"x": x}, mesh), parallel.shard_local_batch({"x": x}, mesh)
    assert a["x"].sharding == b["x"].sharding
    np.testing.assert_array_equal(a["x"], b["x"])
    with pytest.raises(ValueError, match="leading axis"):
        parallel.shard_local_batch({"x": np.float32(1.0)}, mesh)
