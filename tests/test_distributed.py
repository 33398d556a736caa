"""torchrun with 2 CPU processes (gloo) runs the same training (opt-in: pytest -m distributed)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from diffprune.tasks import write_demo_data


@pytest.mark.distributed
def test_torchrun_two_processes(tmp_path, tiny_model_dir):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    data = write_demo_data(tmp_path / "data")
    out = tmp_path / "out"
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "diffprune", "train", "--model", str(tiny_model_dir),
           "--task", "toy", "--train-file", str(data / "train.tsv"), "--dev-file", str(data / "dev.tsv"),
           "--text-columns", "sentence", "--output-dir", str(out), "--max-train-samples", "64",
           "--max-eval-samples", "32", "--batch-size", "8", "--max-length", "16", "--epochs", "1",
           "--l0-epochs", "1", "--structured", "--sparsity", "0.01", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    # 64 examples, 2 processes x batch 8 -> 4 optimizer steps per epoch (8 on one process)
    assert metrics["phases"]["l0"]["train"]["steps"] == 4
    assert metrics["storage"]["nnz"] == round(0.01 * metrics["storage"]["num_diff_params"])
