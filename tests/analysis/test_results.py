"""Result objects in a notebook: per-layer columns, a DataFrame, a figure, an HTML summary."""

from __future__ import annotations

import pytest

from depthlab.analysis import variance_profile
from depthlab.analysis.jacobians import JacobianResult
from tests.analysis.conftest import build


@pytest.fixture(scope="module")
def profile():
    import torch

    torch.manual_seed(0)
    return variance_profile(build("llama"), torch.randint(0, 64, (2, 12)))


def test_per_layer_columns_are_the_one_value_per_block_fields(profile):
    columns = profile.per_layer()
    assert {"out_var", "attn_var", "ffn_norm", "relative_update"} <= set(columns)
    assert all(len(v) == len(profile.out_var) for v in columns.values())
    assert "embed_var" not in columns and profile.scalars()["tokens"] == profile.tokens


def test_to_pandas_plot_and_html(profile):
    pd = pytest.importorskip("pandas")
    frame = profile.to_pandas()
    assert isinstance(frame, pd.DataFrame) and frame.index.name == "layer"
    assert frame["out_var"].tolist() == pytest.approx(profile.out_var)
    assert frame.attrs["final_norm_var"] == pytest.approx(profile.final_norm_var)
    fig = profile.plot(["out_var", "ffn_var"])
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert titles == ["out_var", "ffn_var"]
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == list(range(len(profile.out_var)))
    assert list(line.get_ydata()) == pytest.approx(profile.out_var)
    html = profile._repr_html_()
    assert html.startswith("<div><b>VarianceProfile</b>") and html.count("<tr>") == len(profile.out_var) + 1
    with pytest.raises(Exception, match="no per-layer numbers"):
        profile.plot(["nope"])


def test_per_block_records_become_columns():
    records = [{"layer": i, "frobenius": float(i), "spectral": 2.0 * i} for i in range(3)]
    result = JacobianResult(**{**{f: None for f in JacobianResult.__dataclass_fields__}, "layers": records})
    assert result.per_layer() == {"frobenius": [0.0, 1.0, 2.0], "spectral": [0.0, 2.0, 4.0]}
