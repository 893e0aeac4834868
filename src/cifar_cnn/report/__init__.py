"""Plots and a self-contained HTML report of a run directory.

`build_report(run_dir)` reads what the run logged (config.yaml, metrics.csv, run.json), evaluates best.pt (last.pt
when there is none, e.g. an interrupted run) on the test split, unless training just did, and writes into
RUN_DIR/report/:

    curves.png         loss, accuracy and learning rate per epoch (train and validation)
    confusion.png      the test confusion matrix as an annotated heat map
    per_class.png      test accuracy per class
    predictions.png    32 test images (a fixed sample): predicted label, confidence, true label (mistakes in red)
    confident_wrong.png  the mistakes the model was surest of, each beside its Grad-CAM map
    reliability.png    accuracy against confidence (15 bins), with and without the checkpoint's temperature
    report.json        what was evaluated and the metrics (the schema of `evaluate --json` under test_metrics), the
                       heat maps' method, layer and seconds (`explanations`), page size and timings
    index.html         all of it in one file, images embedded, readable offline, with the mistake browser: click a
                       cell of the confusion matrix to see its images by loss, with their heat maps

    figures.py  the plots (matplotlib object API; each returns the numbers it drew)
    browser.py  the mistake browser: which images each cell shows, their encoding, the page's small script
    html.py     the page
    build.py    the whole report from a run directory
"""

from ..rundir import read_metrics
from .build import build_report, draw_figures
from .figures import (
    confusion_figure,
    curves_figure,
    most_confident_mistakes,
    plot_class_samples,
    plot_confusion,
    plot_curves,
    plot_image_grid,
    plot_per_class,
    prediction_captions,
)
from .html import render_html

__all__ = [
    "build_report",
    "confusion_figure",
    "curves_figure",
    "draw_figures",
    "most_confident_mistakes",
    "plot_class_samples",
    "plot_confusion",
    "plot_curves",
    "plot_image_grid",
    "plot_per_class",
    "prediction_captions",
    "read_metrics",
    "render_html",
]
