"""Pairwise composition: every pair runs in one chain (quick benchmark), phases combined."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_multirate as om
from benchmarks import combos


def test_combos_quick_runs_every_pair(tmp_path):
    summary = combos.main(["--quick", "--out-dir", str(tmp_path)])
    data = json.loads((tmp_path / "combos.quick.json").read_text())
    assert data["quick"] is True and data["command"].startswith("python -m benchmarks.combos")
    assert not (tmp_path / "combos.json").exists()  # quick never writes the full results
    assert data["summary"] == summary
    failed = [f"{r['arm']}: {r['error']}" for r in data["runs"] if r["failed"]]
    assert summary["pairs_failed"] == 0 and summary["runs_failed"] == 0, failed
    assert summary["pairs_run"] == len(combos.PAIRS)
    # the divergence rule: every run flagged, counted over all arms and per arm
    assert all(isinstance(r["diverged"], bool) for r in data["runs"])
    assert summary["diverged_runs"] == sum(r["diverged"] for r in data["runs"])
    assert summary["diverged_runs"] == sum(summary[f"{combos._key(a)}_diverged_runs"]
                                           for a in ("sgd", *combos.PAIRS))  # fmt: skip
    for arm in ("sgd", *combos.PAIRS):
        k = combos._key(arm)
        for figure in ("accuracy", "time_ratio", "accuracy_delta_pt", "train_time_s"):
            assert isinstance(summary[f"{k}_{figure}"], float), (k, figure)
    runs = {r["arm"]: r for r in data["runs"]}
    # multirate's fast-only steps survive the chain with LeRaC: a partial-gradient program ran
    assert any(m != "full" for m in runs["multirate+lerac"]["masks"])
    assert runs["multirate+lerac"]["partial_steps"] > 0
    assert runs["growing+lerac"]["growths"] == 1
    assert "switched_at" in runs["two_regimes+lerac"] and "wus_windows" in runs["wus+lerac"]


def _params() -> dict:
    return {
        "Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)},
        "Conv_1": {"kernel": jnp.ones((3, 3, 2, 2)), "bias": jnp.ones(2)},
        "head": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
    }


def test_chain_combines_phases_and_scales_by_depth():
    """wus + LeRaC in one chain: WUS's bias-only window phase is the chain's mask, and the
    update equals WUS's update scaled by LeRaC's per-depth multiplier (a hand reference)."""
    p = _params()
    plan = combos._Plan(steps_per_epoch=1, epochs=4, lerac_k_epochs=2)
    wus_alone = om.wus(optax.sgd(0.1), om.wus_labels, threshold=0.0, warmup=0, force_windows=(1,))
    pair = optax.chain(
        om.wus(optax.sgd(0.1), om.wus_labels, threshold=0.0, warmup=0, force_windows=(1,)),
        plan.lerac(),
    )
    s_alone, s_pair = wus_alone.init(p), pair.init(p)
    g = jax.tree.map(jnp.ones_like, p)
    depth = {"Conv_0": 0, "Conv_1": 1, "head": 2}
    for t in range(3):
        mask_alone = om.needed_mask(s_alone, p)
        assert om.needed_mask(s_pair, p) == mask_alone  # LeRaC adds no phase of its own
        u_alone, s_alone = wus_alone.update(g, s_alone, p, value=0.5)
        u_pair, s_pair = pair.update(g, s_pair, p, value=0.5)
        # paper mode, k = 2 ticks: m_j(t) = r_j ** (1 - min(t, 2) / 2)
        m = [r ** (1 - min(t, 2) / 2) for r in combos.LERAC_SCALES]
        for layer, j in depth.items():
            for leaf in ("kernel", "bias"):
                np.testing.assert_allclose(
                    u_pair[layer][leaf], m[j] * u_alone[layer][leaf], rtol=1e-6
                )
    assert not all(mask_alone)  # the last step ran in a window: biases only


def test_depths_follow_the_widths_of_a_grown_model():
    small = combos._depths(_params())
    wide = combos._depths(
        jax.tree.map(lambda x: jnp.ones((*x.shape[:-1], 2 * x.shape[-1])), _params())
    )
    assert small == wide
    assert small["Conv_0"]["kernel"] == 0 and small["Conv_1"]["bias"] == 1
    assert small["head"]["kernel"] == 2
