"""The docs' examples run, and what the pages say of them and of the benchmarks holds.

- Every ```python block of every ``docs/*.md`` page runs: one test per page, its blocks in
  order in one namespace, in a fresh working directory (files an example writes go there).
- An example that would take long runs shortened: ``SHORTEN`` lists a page's textual
  substitutions, each of which must match the page's code exactly once.
- A block right after a MyST comment line ``% skip-test: <reason>`` does not run; the reason
  must be given. Nothing else skips a block.
- ``STATED``: what a page says its example prints or reaches (masks, shapes, an accuracy) is
  checked against the run; the stated values are read from the page, so they cannot drift.
- ``QUOTED`` and ``VERBAL``: every benchmark figure a page's prose quotes from
  ``benchmarks/results/<name>.json`` equals the file's value at the quoted rounding.
"""

import ast
import functools
import json
import pathlib
import re

import jax
import numpy as np
import pytest

from benchmarks.harness import ci_keys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RESULTS = ROOT / "benchmarks" / "results"

BLOCK = re.compile(
    r"^(?:% skip-test:(?P<reason>[^\n]*)\n)?```python\n(?P<code>.*?)^```$", re.M | re.S
)
PAGES = sorted(p.name for p in DOCS.glob("*.md") if BLOCK.search(p.read_text()))

# page -> (text in the page's code, what the test runs instead), to keep the test short
SHORTEN = {
    "growing.md": [
        ('load_dataset("mnist_subset")', 'load_dataset("digits")'),
        ("schedule = GrowthSchedule((16, 32, 64), total_epochs=16, m0=0.25, p_c=0.5, t0=1)",
         "schedule = GrowthSchedule((8, 16), total_epochs=2, m0=0.5, p_c=1.0, t0=1)"),
    ],
    "lerac.md": [  # the depth labels read shapes only; an eager ResNet init takes seconds
        ("variables = model.init(jax.random.key(0), x, train=False)",
         "variables = jax.eval_shape(lambda k, x: model.init(k, x, train=False), "
         "jax.random.key(0), x)"),
    ],
    "multirate.md": [("epochs=12,", "epochs=3,")],
    "scaling.md": [("epochs=5,", "epochs=1,")],
    "train.md": [("epochs=10,", "epochs=1,"), ("epochs=15,", "epochs=1,")],
    "wus.md": [("epochs=15,", "epochs=1,")],
}


def _blocks(page: str) -> list[str]:
    """The page's runnable blocks, shortened by ``SHORTEN``."""
    text = (DOCS / page).read_text()
    found = list(BLOCK.finditer(text))
    markers = len(re.findall(r"^% skip-test:", text, re.M))
    assert markers == sum(m["reason"] is not None for m in found), (
        "a '% skip-test:' line must come right before a python block")
    for m in found:
        assert m["reason"] is None or m["reason"].strip(), "'% skip-test:' needs a reason"
    blocks = [m["code"] for m in found if m["reason"] is None]
    for old, new in SHORTEN.get(page, []):
        assert sum(b.count(old) for b in blocks) == 1, f"{old!r} must match exactly once"
        blocks = [b.replace(old, new) for b in blocks]
    return blocks


def _comments(page: str, line: str) -> list[str]:
    """What the comment after each occurrence of a code line states, in page order:
    ``s.widths  # ((4, 8), ...)`` gives ``((4, 8), ...)``; words after a ``": "`` are left
    out."""
    found = re.findall(rf"^{re.escape(line)}\s*# (.*?)(?::\s.*)?$", (DOCS / page).read_text(),
                       re.M)  # fmt: skip
    assert found, f"{page} has no line {line!r} with a comment"
    return found


def _comment(page: str, line: str) -> str:
    """:func:`_comments` of the first occurrence."""
    return _comments(page, line)[0]


def _prose(page: str, pattern: str) -> list[float]:
    """The numbers ``{n}`` of the one place ``pattern`` matches the page's prose."""
    text = " ".join((DOCS / page).read_text().split())
    hits = re.findall(pattern.replace("{n}", r"([-+]?\d+(?:\.\d+)?)"), text)
    assert len(hits) == 1, f"{pattern!r} matches {page} {len(hits)} times, not once"
    return [float(v) for v in (hits[0] if isinstance(hits[0], tuple) else [hits[0]])]


# ------------------------------------------------------------------ stated results of examples


def _getting_started(after, out):
    page, result = "getting_started.md", after[-1]["result"]
    head_only, final = _prose(page, r"about {n} in the first epoch; .* ends at about {n} after")
    assert _comment(page, "print(result.final_accuracy)") == f"about {final}"
    assert result.history[0]["test_accuracy"] == pytest.approx(head_only, abs=0.01)
    assert result.final_accuracy == pytest.approx(final, abs=0.01)
    assert out.splitlines()[0] == _comment(page, "print(sorted(result.masks))")


def _growing(after, out):
    page, (first, rounded, _, fitted, grown) = "growing.md", after[:5]
    for expr in ("s.widths", "s.epochs"):  # the plain schedule, then the one with multiple_of
        stated = [ast.literal_eval(c) for c in _comments(page, expr)]
        assert [eval(expr, ns) for ns in (first, rounded)] == stated
    ratio = float(_comment(page, "s.predicted_cost_ratio()"))
    assert round(first["s"].predicted_cost_ratio(), 2) == ratio
    # one compile per stage: five for the page's schedule (that of `s`), two for the shortened
    stated = _comment(
        page, 'res.final_accuracy, res.growths[0]["max_logit_change"], res.num_compiles'
    )
    assert ast.literal_eval(stated) == [1] * first["s"].num_stages
    assert fitted["res"].num_compiles == [1] * fitted["schedule"].num_stages
    assert fitted["res"].growths[0]["max_logit_change"] < 1e-4  # growth keeps the function
    shapes = jax.tree.map(np.shape, grown["shapes"]["params"])
    assert jax.tree.map(np.shape, grown["params"]) == shapes


def _lerac(after, out):
    page = "lerac.md"
    n = _prose(page, r"# stem\+bn, 6 blocks, head: n = {n}")[0]
    assert max(jax.tree.leaves(after[0]["depth"])) + 1 == n
    stated = _comment(page, 'print(-updates["layers"]["Dense_0"]["bias"][:, 0])')
    printed = out.splitlines()[-1]
    numbers = [[float(v) for v in s.strip("[]").split()] for s in (printed, stated)]
    np.testing.assert_allclose(*numbers)


def _multirate(after, out):
    stated = _comment("multirate.md", "print(result.step_times_ms.keys())")
    names = sorted(after[-1]["result"].step_times_ms)
    assert names == sorted(re.findall(r"'([^']+)'", stated))


def _nnx(after, out):
    import optax_multirate as om

    page = "nnx.md"
    assert sorted(after[1]["methods"]) == sorted(om.TRANSFORMATIONS)  # "each method"
    assert after[-1]["more"].history[-1]["epoch"] == 3  # "continue the run to epoch 3"
    assert out.splitlines() == [
        _comment(page, "print([om.train.mask_name(m) for m in step.phased.masks])"),
        _comment(page, 'print(result.history[-1]["step"], sorted(result.masks))'),
    ]


def _scaling(after, out):
    from jax.sharding import PartitionSpec

    batch, sharded = after[0]["batch"], after[2]  # "64 / n examples on each device"
    assert {s.data.shape[0] for s in batch["x"].addressable_shards} == {64 // jax.device_count()}
    kernel = sharded["params"]["Conv_1"]["kernel"]  # "output channels split over devices"
    assert kernel.sharding.spec == PartitionSpec(None, None, None, "data")
    momenta = [v for v in jax.tree.leaves(sharded["opt_state"]) if v.shape == kernel.shape]
    assert momenta and all(v.sharding == kernel.sharding for v in momenta)  # "split like it"


def _train(after, out):
    from optax_multirate.data import num_batches

    ns = after[-1]
    res = ns["res"]  # stopped at step 20, then resumed to the end of epoch 2
    assert res.history[-1]["epoch"] == 2 and res.steps == 2 * num_batches(ns["train"], 128)
    saved = {"params": res.params, "opt_state": res.opt_state}
    jax.tree.map(np.testing.assert_array_equal, ns["state"], saved)


def _two_regimes(after, out):
    expr = "int(phase_of(state)), int(state.switched_at)"
    assert eval(expr, after[-1]) == ast.literal_eval(_comment("two_regimes.md", expr))


STATED = {
    "getting_started.md": _getting_started,
    "growing.md": _growing,
    "lerac.md": _lerac,
    "multirate.md": _multirate,
    "nnx.md": _nnx,
    "scaling.md": _scaling,
    "train.md": _train,
    "two_regimes.md": _two_regimes,
}


@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    after = []  # the namespace after each block
    for i, code in enumerate(_blocks(page)):
        exec(compile(code, f"docs/{page}, block {i + 1}", "exec"), ns)
        after.append(dict(ns))
    if page in STATED:
        STATED[page](after, capsys.readouterr().out)


# ------------------------------------------------------------------- quoted benchmark figures

# One row per sentence that quotes figures: (page, results file name, a pattern matching the
# sentence exactly once, with {n} at each quoted number, the summary key of each number in
# order, the decimals quoted). A key "-k" is minus the value ("4.97 points below"); a callable
# gets the whole summary. Patterns see the prose with whitespace collapsed to single spaces.
SETS = ("mnist1d", "mnist", "digits")


def _with_ci(*keys: str) -> list[str]:
    """Each delta key ``x_pt`` followed by its interval keys ``x_ci_low_pt``, ``x_ci_high_pt``."""
    return [k for key in keys for k in (key, *ci_keys(key))]


QUOTED = [
    ("multirate.md", "multirate_transfer", r"backbone that reaches {n} on its source",
     ["pretrained_accuracy"], 3),
    ("multirate.md", "multirate_transfer", r"on validation \({n} configurations each\)",
     ["configs_per_arm"], 0),
    ("multirate.md", "multirate_transfer", r"the best arm by the stated rule is \$k = {n}\$",
     ["best_arm_k"], 0),
    ("multirate.md", "multirate_transfer", r"\$k = 10\$: {n} of train all's time \(predicted {n}\)",
     ["k10_time_ratio", "k10_predicted_time_ratio"], 3),
    ("multirate.md", "multirate_transfer",
     r"but {n} points below train all \[{n}, {n}\] and {n} points below a train-all run given "
     r"the same time and its own selected step size \[{n}, {n}\]",
     ["-k10_accuracy_delta_pt", "k10_accuracy_delta_ci_low_pt", "k10_accuracy_delta_ci_high_pt",
      "-k10_equal_time_accuracy_delta_pt", "k10_equal_time_accuracy_delta_ci_low_pt",
      "k10_equal_time_accuracy_delta_ci_high_pt"], 2),
    ("multirate.md", "multirate_transfer", r"\$k = 5\$: {n} of the time", ["k5_time_ratio"], 3),
    ("multirate.md", "multirate_transfer", r"of the time, {n} points, {n} at equal time",
     ["k5_accuracy_delta_pt", "k5_equal_time_accuracy_delta_pt"], 2),
    ("multirate.md", "multirate_transfer", r"\$k = 2\$: {n},", ["k2_time_ratio"], 3),
    ("multirate.md", "multirate_transfer",
     r"\$k = 2\$: [\d.]+, {n} \[{n}, {n}\], and {n} at equal time \[{n}, {n}\]",
     ["k2_accuracy_delta_pt", "k2_accuracy_delta_ci_low_pt", "k2_accuracy_delta_ci_high_pt",
      "k2_equal_time_accuracy_delta_pt", "k2_equal_time_accuracy_delta_ci_low_pt",
      "k2_equal_time_accuracy_delta_ci_high_pt"], 2),
    ("multirate.md", "multirate_transfer",
     r"half its budget loses {n} points\) and the backbone must move \(head only loses {n}\)",
     ["-baseline_half_budget_delta_pt", "-head_only_accuracy_delta_pt"], 2),
    ("multirate.md", "multirate_transfer",
     r"every multirate arm is slower than train all \({n}-{n}x\)",
     [lambda s: min(s[f"k{k}_time_ratio_with_compile"] for k in (2, 5, 10)),
      lambda s: max(s[f"k{k}_time_ratio_with_compile"] for k in (2, 5, 10))], 1),
    ("multirate.md", "multirate_scratch", r"SGD overfits \({n} points between",
     ["overfit_gap_pt"], 1),
    ("multirate.md", "multirate_scratch",
     r"random subgroups end \*\*{n} points below SGD\*\* \(95% interval {n} to {n},",
     ["-subgroups_accuracy_delta_pt", "subgroups_accuracy_delta_ci_low_pt",
      "subgroups_accuracy_delta_ci_high_pt"], 2),
    ("multirate.md", "multirate_scratch", r"a \*higher\* test loss \({n}\)",
     ["subgroups_test_loss_delta"], 3),
    ("multirate.md", "multirate_scratch",
     r"SGD with dropout ends {n} points below SGD \({n} to {n}\)",
     ["-dropout_accuracy_delta_pt", "dropout_accuracy_delta_ci_low_pt",
      "dropout_accuracy_delta_ci_high_pt"], 2),
    ("multirate.md", "multirate_scratch",
     r"\*\*{n} points better on clean images\*\* \({n} to {n}\) but \*\*{n} points worse on "
     r"patch-only images\*\* \({n} to {n}\) and {n} points worse on patched ones",
     ["timescales_clean_accuracy_delta_pt", "timescales_clean_accuracy_delta_ci_low_pt",
      "timescales_clean_accuracy_delta_ci_high_pt", "-timescales_patch_accuracy_delta_pt",
      "timescales_patch_accuracy_delta_ci_low_pt", "timescales_patch_accuracy_delta_ci_high_pt",
      "-timescales_both_accuracy_delta_pt"], 2),
    ("lerac.md", "lerac", r"\(`sets_above_0` = {n} of 3", ["sets_above_0"], 0),
    ("lerac.md", "lerac",
     r"mnist1d {n} points \[{n}, {n}\], MNIST subset {n} \[{n}, {n}\], digits {n} \[{n}, {n}\]\.",
     _with_ci(*(f"{s}_accuracy_delta_pt" for s in SETS)), 2),
    ("lerac.md", "lerac",
     r"mnist1d {n} \[{n}, {n}\] \(it selected the authors' setting\), MNIST subset {n} "
     r"\[{n}, {n}\], digits {n} \[{n}, {n}\]",
     _with_ci(*(f"{s}_selected_accuracy_delta_pt" for s in SETS)), 2),
    ("lerac.md", "lerac", r"\(`step_time_ratio` {n} \[{n}, {n}\]",
     ["step_time_ratio", "step_time_ratio_ci_low", "step_time_ratio_ci_high"], 3),
    ("nnx.md", "step_cost", r"same API\): Linen {n} \[{n}, {n}\], NNX {n} \[{n}, {n}\] of a plain",
     [f"{api}_multirate_step_time_ratio{k}" for api in ("linen", "nnx")
      for k in ("", "_ci_low", "_ci_high")], 3),
    ("two_regimes.md", "two_regimes",
     r"ends {n} points below two regimes \[{n}, {n}\]; on the MNIST subset {n} below "
     r"\[{n}, {n}\]; on digits {n} below \[{n}, {n}\]",
     [f"{p}{s}_small_only_accuracy_delta{k}" for s in ("mnist1d", "mnist", "digits")
      for p, k in (("-", "_pt"), ("", "_ci_low_pt"), ("", "_ci_high_pt"))], 2),
    ("two_regimes.md", "two_regimes",
     r"level with two regimes on mnist1d \({n}\) and the MNIST subset \({n}\), and unstable on "
     r"digits \({n}, interval {n} to {n}\)",
     ["mnist1d_large_only_accuracy_delta_pt", "mnist_large_only_accuracy_delta_pt",
      "digits_large_only_accuracy_delta_pt", "digits_large_only_accuracy_delta_ci_low_pt",
      "digits_large_only_accuracy_delta_ci_high_pt"], 2),
    ("two_regimes.md", "two_regimes", r"\(goal: >= -0\.3 points on 2 of 3 sets, {n} configurations",
     ["configs_per_arm"], 0),
    ("two_regimes.md", "two_regimes",
     r"best tuned schedule {n} \[{n}, {n}\] on mnist1d, {n} \[{n}, {n}\] on the MNIST subset, "
     r"{n} \[{n}, {n}\] on digits",
     _with_ci(*(f"{s}_accuracy_delta_vs_best_schedule_pt" for s in SETS)), 2),
    ("two_regimes.md", "two_regimes",
     r"Against schedule-free SGD: {n} \[{n}, {n}\] on mnist1d, {n} \[{n}, {n}\] and {n} "
     r"\[{n}, {n}\] on the other two",
     _with_ci(*(f"{s}_accuracy_delta_vs_schedule_free_pt" for s in SETS)), 2),
    ("wus.md", "wus",
     r"WUS kept the accuracy \({n} points \[{n}, {n}\]; WUS\+LR {n} \[{n}, {n}\]\)",
     _with_ci("accuracy_delta_pt", "wuslr_accuracy_delta_pt"), 2),
    ("wus.md", "wus", r"its train time was \*\*{n}\*\* of the baseline's, where the cost model "
     r"predicted {n}\.", ["time_ratio", "predicted_time_ratio"], 2),
    ("wus.md", "wus", r"skipped {n} of the steps", ["skipped_step_fraction"], 3),
    ("wus.md", "wus", r"costs {n} of a full one here \(its FLOPs {n}:",
     ["bias_only_step_time_ratio", "bias_only_flop_ratio"], 3),
    ("wus.md", "wus", r"costs more than the plain one\*\*: {n} of the baseline's step",
     ["wrapper_overhead_ratio"], 2),
    ("wus.md", "wus", r"at random costs {n} points \[{n}, {n}\]",
     ["random_windows_accuracy_delta_pt", "random_windows_accuracy_delta_ci_low_pt",
      "random_windows_accuracy_delta_ci_high_pt"], 2),
    ("wus.md", "wus", r"halving the baseline's budget costs {n} \[{n}, {n}\]",
     ["baseline_half_budget_delta_pt", "baseline_half_budget_delta_ci_low_pt",
      "baseline_half_budget_delta_ci_high_pt"], 2),
    ("wus.md", "wus", r"The equal-time comparison \({n} \[{n}, {n}\]\)",
     ["equal_time_accuracy_delta_pt", "equal_time_accuracy_delta_ci_low_pt",
      "equal_time_accuracy_delta_ci_high_pt"], 2),
    ("growing.md", "growing", r"The grown MLP trained in \*\*{n}\*\* of the fixed network's",
     ["time_ratio"], 3),
    ("growing.md", "growing", r"against {n} predicted from the step-time table and {n} predicted",
     ["predicted_time_ratio", "stage_step_time_ratio"], 3),
    ("growing.md", "growing", r"compilation counted, the ratio is \*\*{n}\*\*",
     ["time_ratio_with_compile"], 3),
    ("growing.md", "growing",
     r"`grown` ends \*\*{n} points\*\* above `fixed` \(\[{n}, {n}\]\) and reached",
     ["accuracy_delta_pt", "accuracy_delta_ci_low_pt", "accuracy_delta_ci_high_pt"], 2),
    ("growing.md", "growing",
     r"time-to-accuracy ratio is \*\*{n}\*\* compile excluded and \*\*{n}\*\* with compile",
     ["time_to_accuracy_ratio", "time_to_accuracy_ratio_with_compile"], 3),
    ("growing.md", "growing",
     r"reached the target \(fixed's mean less 0\.5 pt\) on all {n} seeds",
     ["time_to_accuracy_seeds_reached"], 0),
    ("growing.md", "growing",
     r"\(`refresh=\"growth\"`\): {n} of the fixed step at full width, against {n} with them",
     ["lra_growth_step_time_ratio", "lra_stage_step_time_ratio"], 3),
    ("growing.md", "growing", r"\(`refresh=\"stage\"`\) and {n} at every step",
     ["lra_step_refresh_step_time_ratio"], 2),
    ("growing.md", "growing",
     r"`grown`, 5 seeds\): without variance transfer {n} \[{n}, {n}\]; without rate adaptation "
     r"{n} "
     r"\[{n}, {n}\]; "
     r"pairing only {n} \[{n}, {n}\]; momentum carried {n} \[{n}, {n}\]",
     _with_ci(*(f"{a}_accuracy_delta_pt" for a in ("no_vt", "no_lra", "plain", "carry"))), 2),
    ("growing.md", "growing", r"The grown CNN trained in \*\*{n}\*\* of the fixed network's "
     r"train time, as the\s+step-time table predicted \({n}\)",
     ["cnn_time_ratio", "cnn_predicted_time_ratio"], 3),
    ("growing.md", "growing", r"saving follows the FLOPs more closely \(ratio {n}\)",
     ["cnn_flop_ratio"], 3),
    ("growing.md", "growing", r"Compilation\s+counted, the ratio is \*\*{n}\*\*",
     ["cnn_time_ratio_with_compile"], 3),
    ("growing.md", "growing",
     r"`grown` ends \*\*{n} points\*\* below `fixed` \(\[{n}, {n}\]\), within",
     ["-cnn_accuracy_delta_pt", "cnn_accuracy_delta_ci_low_pt", "cnn_accuracy_delta_ci_high_pt"],
     2),
    ("growing.md", "growing", r"it reached the target on {n} of 10 seeds",
     ["cnn_time_to_accuracy_seeds_reached"], 0),
    ("growing.md", "growing", r"The ratio is {n} \({n} with compile\): the fixed network",
     ["cnn_time_to_accuracy_ratio", "cnn_time_to_accuracy_ratio_with_compile"], 3),
    ("growing.md", "growing",
     r"\(5 seeds\): without variance transfer {n} \[{n}, {n}\]; without rate\s+adaptation {n} "
     r"\[{n}, {n}\]; pairing only {n} \[{n}, {n}\]; momentum carried {n}\s+\[{n}, {n}\]",
     _with_ci(*(f"cnn_{a}_accuracy_delta_pt" for a in ("no_vt", "no_lra", "plain", "carry"))), 2),
    ("phases.md", "step_cost",
     r"\| head-only: time ratio / FLOP ratio \| {n} / {n} = \*\*[\d.]+\*\* \| {n} / {n} =",
     ["head_only_time_ratio", "head_only_flop_ratio", "resnet_head_only_time_ratio",
      "resnet_head_only_flop_ratio"], 3),
    ("phases.md", "step_cost",
     r"\| bias-only: time ratio / FLOP ratio \| {n} / {n} = \*\*[\d.]+\*\* \| {n} / {n} =",
     ["bias_only_time_ratio", "bias_only_flop_ratio", "resnet_bias_only_time_ratio",
      "resnet_bias_only_flop_ratio"], 3),
]

# (page, words of its prose, results file, summary key, the value the words mean)
VERBAL = [
    ("multirate.md", "neither regulariser closes its overfitting gap. No run diverged.",
     "multirate_scratch", "diverged_runs", 0),
    ("lerac.md", "the curriculum is slightly worse. No run diverged.", "lerac", "diverged_runs", 0),
    ("two_regimes.md", "on the other two. No run diverged", "two_regimes", "diverged_runs", 0),
    ("two_regimes.md", "simplifies schedules | **Not met**", "two_regimes", "goal_met", False),
]


@functools.cache
def _summary(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())["summary"]


def _value(summary: dict, key) -> float:
    if callable(key):
        return key(summary)
    return -summary[key[1:]] if key.startswith("-") else summary[key]


@pytest.mark.parametrize(
    "page, name, pattern, keys, decimals", QUOTED, ids=[f"{q[0]}:{q[2][:40]}" for q in QUOTED]
)
def test_quoted_figures_match_the_results(page, name, pattern, keys, decimals):
    quoted = _prose(page, pattern)
    assert len(quoted) == len(keys)
    summary = _summary(name)
    for key, figure in zip(keys, quoted):
        want = round(_value(summary, key), decimals)
        assert figure == want, f"{page} quotes {figure} for {key}, {name}.json says {want}"


@pytest.mark.parametrize("page, words, name, key, value", VERBAL, ids=[v[0] for v in VERBAL])
def test_stated_outcomes_match_the_results(page, words, name, key, value):
    text = " ".join((DOCS / page).read_text().split())
    assert text.count(words) == 1, f"{words!r} is not once in {page}"
    assert _summary(name)[key] == value
