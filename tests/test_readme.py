"""The README's example runs as written and prints what its text says; its figures match the
results files they come from."""

import contextlib
import io
import json
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _summary(name: str) -> dict:
    return json.loads((ROOT / f"benchmarks/results/{name}.json").read_text())["summary"]


def test_readme_example_runs_and_prints_what_the_text_says():
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    stated = re.search(r"It prints `([^`]*)`", README).group(1)
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    assert out.getvalue().strip() == stated
    step = namespace["step"]
    assert sum(step.masks[1]) == 2  # head kernel and bias only


def test_readme_baseline_figures_match_the_results_file():
    summary = _summary("baseline")
    acc, std, diverged = re.search(r"\| (0\.\d{4}) ± (0\.\d{4}) \| (\d+) \|", README).groups()
    assert float(acc) == round(summary["final_accuracy"], 4)
    assert float(std) == round(summary["final_accuracy_std"], 4)
    assert int(diverged) == summary["diverged_runs"]


def _ci(s: dict, key: str) -> str:
    lo, hi = s[key[:-3] + "_ci_low_pt"], s[key[:-3] + "_ci_high_pt"]
    return f"{s[key]:+.2f} pt [{lo:+.2f}, {hi:+.2f}]"


@pytest.mark.parametrize(
    "expected",
    [
        lambda: f"head-only step costs {_summary('step_cost')['head_only_time_ratio']:.3f}",
        lambda: f"bias-only step {_summary('step_cost')['bias_only_time_ratio']:.3f}",
        lambda: f"trains in {_summary('multirate_transfer')['k2_time_ratio']:.2f} of",
        lambda: "at "
        + _ci(_summary("multirate_transfer"), "k2_accuracy_delta_pt").replace("pt", "pt accuracy"),
        lambda: "multirate minus it: "
        + _ci(_summary("multirate_transfer"), "k2_equal_time_accuracy_delta_pt"),
    ],
    ids=["head_only", "bias_only", "k2_time", "k2_accuracy", "k2_equal_time"],
)
def test_readme_measured_figures_match_the_results_files(expected):
    text = " ".join(README.split())  # line breaks as spaces
    assert expected() in text
