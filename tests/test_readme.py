"""The README's example runs as written."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    step = namespace["step"]
    assert len(step.masks) == 2  # full on cycle starts, head-only in between
    assert sum(step.masks[1]) == 2  # head kernel and bias only


def test_readme_baseline_figures_match_the_results_file():
    import json

    text = (ROOT / "README.md").read_text()
    summary = json.loads((ROOT / "benchmarks/results/baseline.json").read_text())["summary"]
    acc, std, diverged = re.search(r"\| (0\.\d{4}) ± (0\.\d{4}) \| (\d+) \|", text).groups()
    assert float(acc) == round(summary["final_accuracy"], 4)
    assert float(std) == round(summary["final_accuracy_std"], 4)
    assert int(diverged) == summary["diverged_runs"]
