"""``import optax_multirate`` stays light: no data, plotting, checkpoint or logging backends."""

import subprocess
import sys

HEAVY = ("tensorflow_datasets", "matplotlib", "orbax", "tqdm", "tensorboardX")


def test_import_loads_no_heavy_module():
    code = (
        "import sys, optax_multirate, optax_multirate.data, optax_multirate.train\n"
        "from optax_multirate.data import Split, batches, num_batches, validation_split\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"imported at package import: {out.stdout.strip()}"


def test_data_set_loading_imports_tfds_on_first_use():
    code = (
        "import sys, optax_multirate.data as d\n"
        "before = 'tensorflow_datasets' in sys.modules\n"
        "d.load_dataset\n"
        "print(before, 'tensorflow_datasets' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
