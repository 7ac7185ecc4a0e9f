"""kdray.evaluation.report: the heatmap matrix and confusion normalisation on hand-made tables; the page of a
tiny swept run renders in headless Chromium with every figure loaded; `kdray report` picks up the
clustering figure and specialists table when a run has them."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from test_sweep import swept_run  # noqa: F401  (the shared tiny run with a sweep)

from kdray.cli import main
from kdray.evaluation.report import FIGURES, PAGE, REPORT_DIR, heatmap_matrix, row_normalised
from kdray.runtime.stage import MANIFEST, REPORT_FIGURES, REPORT_TABLES
from kdray.runtime.storage import Storage

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHECK_IMAGES = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = `images=${images.length} broken=${JSON.stringify(broken)}`;
  document.body.appendChild(out);
});
</script>"""

TRIALS = [  # (T, width, hard weight) -> validation error, test error
    {"trial": "a", "temperature": 1.0, "width": 30, "hard_weight": 0.0, "val_error": 0.30, "test_error": 0.11,
     "status": "finished"},
    {"trial": "b", "temperature": 1.0, "width": 30, "hard_weight": 0.5, "val_error": 0.20, "test_error": 0.22,
     "status": "finished"},
    {"trial": "c", "temperature": 4.0, "width": 30, "hard_weight": 0.0, "val_error": 0.10, "test_error": 0.12,
     "status": "stopped"},
    {"trial": "d", "temperature": 1.0, "width": 300, "hard_weight": 0.0, "val_error": 0.25, "test_error": 0.27,
     "status": "finished"},
    {"trial": "e", "temperature": 4.0, "width": 300, "hard_weight": 0.5, "val_error": None, "status": "error"},
    {"trial": "f", "temperature": 4.0, "width": 300, "hard_weight": 0.0, "val_error": 0.01, "test_error": 0.01,
     "status": "error"},
]


def test_heatmap_matrix_takes_the_best_over_the_other_parameters():
    rows, columns, matrix = heatmap_matrix(TRIALS, "width", "temperature")
    assert rows == [30, 300] and columns == [1.0, 4.0]
    # (30, 1): min(0.30, 0.20); (30, 4): 0.10; (300, 1): 0.25; (300, 4): only errored trials -> NaN
    np.testing.assert_allclose(matrix, [[0.20, 0.10], [0.25, np.nan]])
    rows, columns, matrix = heatmap_matrix(TRIALS, "hard_weight", "temperature")
    assert rows == [0.0, 0.5]
    np.testing.assert_allclose(matrix, [[0.25, 0.10], [0.20, np.nan]])


def test_heatmap_matrix_shows_test_error_of_the_trial_chosen_on_validation():
    # (30, T=1): trial b has the lower validation error (0.20 < 0.30), so its test error 0.22
    # shows, not trial a's lower 0.11: the test set chooses nothing.
    rows, columns, matrix = heatmap_matrix(TRIALS, "width", "temperature", "test_error", select_by="val_error")
    assert rows == [30, 300] and columns == [1.0, 4.0]
    np.testing.assert_allclose(matrix, [[0.22, 0.12], [0.27, np.nan]])
    assert heatmap_matrix([{**t, "width": None} for t in TRIALS], "width", "temperature")[2].shape == (0, 0)


def test_row_normalised_confusion():
    normalised = row_normalised(np.array([[3, 1], [0, 0]]))
    np.testing.assert_allclose(normalised, [[0.75, 0.25], [0.0, 0.0]])


def _image_check(page: Storage, tmp_path) -> tuple[int, list[str]]:
    """Load a copy of the page (same directory, so the figures resolve) in headless Chromium and
    read back how many <img> there are and which did not load."""
    html = page.read_text(PAGE).replace("</body>", CHECK_IMAGES + "</body>")
    page.write_text(html, "check.html")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=10000", "--dump-dom",
               f"file://{page.path('check.html')}"]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    found = re.search(r'id="image-check">images=(\d+) broken=(\[.*?\])<', dom)
    assert found, f"the check script did not run; chromium printed: {dom[-2000:]}"
    return int(found.group(1)), json.loads(found.group(2))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_report_page_renders_with_every_figure(swept_run, tmp_path):  # noqa: F811
    run = swept_run["run"]
    report = run.child(REPORT_DIR)
    html = report.read_text(PAGE)
    for expected in ("student-swept", "Learning curves", "Confusion matrices", "Sweep", "stopped"):
        assert expected in html
    figures = sorted(report.list(FIGURES))
    assert figures == ["confusion.png", "learning-curves.png", "sweep-temperature-hard_weight-epoch1.png",
                       "sweep-temperature-hard_weight.png", "sweep-temperature-width-epoch1.png",
                       "sweep-temperature-width.png"]  # at ASHA's rung (epoch 1, every trial) and at the last
    images, broken = _image_check(report, tmp_path)
    assert images == len(figures) and broken == []


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_kdray_report_includes_clustering_figure_and_specialists_table(swept_run, tmp_path, capsys):  # noqa: F811
    from matplotlib.figure import Figure

    copy = tmp_path / "run"
    shutil.copytree(swept_run["run"].location, copy)
    run = Storage(str(copy))
    (copy / "clustering").mkdir()
    figure = Figure(figsize=(2, 2))
    figure.subplots().imshow(np.eye(4))
    figure.savefig(copy / "clustering" / "covariance.png")
    run.write_text("specialist,classes,test error %\n0,c0 c1,12.5\n1,c2 c3,7.5\n", "specialists", "specialists.csv")
    # The stages offer them in their manifests (run-relative); the report knows no stage's files.
    offered = {"clustering": {REPORT_FIGURES: {"Covariance": "./clustering/covariance.png"}},
               "specialists": {REPORT_TABLES: {"Specialists": "./specialists/specialists.csv"},
                               REPORT_FIGURES: {"Elsewhere": str(tmp_path / "outside.png")}}}
    figure.savefig(tmp_path / "outside.png")  # outside the run: not copied into its report
    for stage, outputs in offered.items():
        run.write_json({"fingerprint": stage, "inputs": {}, "finished_at": "9", "outputs": outputs}, stage, MANIFEST)
    shutil.rmtree(copy / REPORT_DIR)
    assert main(["report", str(copy)]) == 0
    assert f"[kdray] wrote {run.path(REPORT_DIR, PAGE)}" in capsys.readouterr().out
    html = run.read_text(REPORT_DIR, PAGE)
    assert "<td>c2 c3</td>" in html and "clustering-covariance.png" in html and "Elsewhere" not in html
    figures = run.child(REPORT_DIR).list(FIGURES)
    assert "clustering-covariance.png" in figures and len(figures) == 7  # the swept run's 6, and this one
    images, broken = _image_check(run.child(REPORT_DIR), tmp_path)
    assert images == len(figures) and broken == []


def test_kdray_report_on_a_directory_without_a_run_fails_cleanly(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no finished stage" in capsys.readouterr().err
