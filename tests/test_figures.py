"""pkm_ref.figures: every saved figure records the run that made it."""

import os
import subprocess
import sys

import torch
from matplotlib.figure import Figure
from PIL import Image

from pkm_ref import figures


def test_a_figure_records_the_device_that_measured_it(tmp_path, monkeypatch):
    """The PNG of a GPU run names the GPU, not the CPU of the process that drew it."""
    monkeypatch.setenv("PKM_REF_FIGURES", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Example GPU")
    fig = Figure()
    fig.add_subplot().plot([0, 1], [0, 1])
    path = figures.save_figure(fig, "example", "gpu", torch.device("cuda"))
    text = Image.open(path).text
    assert text["device"] == "Example GPU" and text["profile"] == "gpu"


def test_the_machine_record_names_the_vector_instructions_torch_used():
    """Two runs on one CPU model differ in rounding and speed when one of them ran lower vector
    instructions (ATEN_CPU_CAPABILITY): the record tells them apart."""
    script = "from pkm_ref import figures; print(figures.machine_name())"
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    lowered = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, check=True).stdout.strip()  # fmt: skip
    assert lowered.endswith(", DEFAULT") and lowered != figures.machine_name()
