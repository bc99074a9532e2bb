"""The report opens in a real browser: headless Chromium (Debian's ``chromium``) renders
reports/index.html; the method table is there and every image decodes (no broken images)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dcm import config, paths
from dcm.pipeline.stages import report
from helpers import write_method

CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
         "--allow-file-access-from-files", "--virtual-time-budget=10000"]

# Runs at the page's load event: records how many images there are and which did not decode.
PROBE = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src'));
  const out = document.createElement('pre');
  out.id = 'dcm-image-check';
  out.textContent = JSON.stringify({images: images.length, broken: broken,
                                    widths: images.map(i => i.naturalWidth)});
  document.body.appendChild(out);
});
</script>"""


def render(html_file: Path, profile: Path) -> str:
    """The DOM after load, as Chromium serialises it with --dump-dom."""
    result = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom",
                             html_file.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed "
                                              "(apt-get install -y chromium; .ci/run installs it)")
def test_report_renders_in_headless_chromium_with_table_and_no_broken_image(project, tmp_path_factory):
    params = config.load("params.yaml", preset="smoke")
    for k, m in enumerate(params.default_methods):
        write_method(project, m, total=0.8 - 0.01 * k, latency=2.0 if m == "teacher" else 0.2,
                     steps=params.methods[m].sample_steps)
    paths.ANALYSIS.mkdir()
    import matplotlib.pyplot as plt

    plt.imsave(paths.ANALYSIS / "dynamics.png", np.random.default_rng(0).random((20, 30, 3)))
    report.run(params)

    page = (paths.REPORTS / "index.html").read_text()
    sources = re.findall(r"<img[^>]*\ssrc=['\"]([^'\"]+)['\"]", page)
    assert {"scores.png", "dimensions.png", "losses.png", "analysis_dynamics.png", "side_by_side.gif"} \
        <= set(sources)
    for src in sources:  # relative, inside the report folder: the folder can be moved or served as is
        assert not src.startswith(("/", "file:", "http")) and (paths.REPORTS / src).is_file(), src

    # the probe goes into a copy beside the report, so the page under test is otherwise unchanged
    probe_page = paths.REPORTS / "index.browser-check.html"
    probe_page.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = render(probe_page.resolve(), tmp_path_factory.mktemp("chromium-profile"))

    assert "<table>" in dom and dom.count("<tr>") >= len(params.default_methods) + 1
    for m in params.default_methods:
        assert f"<td>{m}</td>" in dom
    check = re.search(r'<pre id="dcm-image-check">(.*?)</pre>', dom, re.S)
    assert check, "the load-event probe did not run: " + dom[-500:]
    result = json.loads(check.group(1).replace("&quot;", '"'))
    assert result["images"] == len(sources)
    assert result["broken"] == [], f"images that did not load: {result['broken']}"
    assert all(w > 0 for w in result["widths"])
