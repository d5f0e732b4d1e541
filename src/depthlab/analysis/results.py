"""Result objects shared by every metric: dataclasses whose ``to_dict()`` is plain JSON (lists, floats, None)."""

from __future__ import annotations

import dataclasses
import html
import math
import sys

import numpy as np
import torch


def to_jsonable(value):
    """Tensors and arrays become nested lists, non-finite floats become None, dataclasses become dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().double().numpy() if value.is_floating_point()
                           else value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()] if value.ndim else to_jsonable(value.item())
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _register_png_display() -> None:
    """In an IPython shell (Jupyter), render returned matplotlib Figures as PNG; elsewhere nothing."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is not None:
        from IPython.core.pylabtools import select_figure_formats

        select_figure_formats(shell, {"png"})


def _is_scalar(value) -> bool:
    return value is None or isinstance(value, bool | int | float)


class Result:
    """Mixin for metric results: ``to_dict()`` gives the JSON form written to results.json; in a notebook,
    ``per_layer()``, ``to_pandas()``, ``plot()`` and the HTML summary Jupyter shows."""

    def to_dict(self) -> dict:
        return to_jsonable(self)

    def per_layer(self) -> dict[str, list]:
        """The per-layer columns: each field holding one number per block (the most common list length among the
        fields), plus the fields of per-block records (a list of dicts of numbers) of that length."""
        data = self.to_dict()
        lists = {k: v for k, v in data.items() if isinstance(v, list) and v and all(map(_is_scalar, v))}
        records = {k: v for k, v in data.items()
                   if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)}
        lengths = [len(v) for v in lists.values()] or [len(v) for v in records.values()]
        if not lengths:
            return {}
        n = max(set(lengths), key=lengths.count)
        columns = {k: v for k, v in lists.items() if len(v) == n}
        for rows in (v for v in records.values() if len(v) == n):
            for key in rows[0]:
                if key != "layer" and key not in columns and all(_is_scalar(r.get(key)) for r in rows):
                    columns[key] = [r.get(key) for r in rows]
        return columns

    def scalars(self) -> dict:
        """The single-number fields (token counts, thresholds, summary values)."""
        return {k: v for k, v in self.to_dict().items() if _is_scalar(v) or isinstance(v, str)}

    def to_pandas(self):
        """The per-layer columns as a DataFrame indexed by layer (the single-number fields in ``.attrs``)."""
        try:
            import pandas as pd
        except ImportError:
            from depthlab.errors import AnalysisError

            raise AnalysisError("to_pandas needs pandas: pip install 'depthlab[notebook]'") from None
        frame = pd.DataFrame(self.per_layer()).rename_axis("layer")
        frame.attrs.update(self.scalars())
        return frame

    def plot(self, columns: list[str] | None = None):
        """A matplotlib Figure with one panel per per-layer column (all numeric ones, or `columns`), value vs layer.

        The figure is not registered with pyplot, so it does not leak between cells or show twice; in IPython it is
        shown when returned (its PNG formatter is registered, as ``%matplotlib inline`` does).
        """
        from matplotlib.figure import Figure

        _register_png_display()

        data = self.per_layer()
        names = [c for c in (columns or data) if any(isinstance(v, int | float) for v in data.get(c, []))]
        if columns and len(names) != len(columns):
            from depthlab.errors import AnalysisError

            raise AnalysisError(f"no per-layer numbers in {sorted(set(columns) - set(names))}; "
                                f"available: {', '.join(data)}")
        cols = min(3, max(1, len(names)))
        rows = max(1, -(-len(names) // cols))
        fig = Figure(figsize=(3.6 * cols, 2.6 * rows), layout="constrained")
        axes = list(fig.subplots(rows, cols, squeeze=False).flat)
        for ax, name in zip(axes, names):
            ax.plot(range(len(data[name])), [math.nan if v is None else float(v) for v in data[name]], marker="o",
                    ms=3)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("layer", fontsize=8)
        for ax in axes[len(names):]:
            ax.axis("off")
        fig.suptitle(type(self).__name__, fontsize=10)
        return fig

    def _repr_html_(self) -> str:
        """What Jupyter shows: the class, the single-number fields and the per-layer table."""
        def cell(value) -> str:
            return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))

        data = self.per_layer()
        head = ", ".join(f"{html.escape(k)} = {cell(v)}" for k, v in self.scalars().items())
        rows = "".join(f"<tr><th>{i}</th>" + "".join(f"<td>{cell(data[k][i])}</td>" for k in data) + "</tr>"
                       for i in range(len(next(iter(data.values()), []))))
        table = (f"<table><thead><tr><th>layer</th>{''.join(f'<th>{html.escape(k)}</th>' for k in data)}</tr>"
                 f"</thead><tbody>{rows}</tbody></table>") if data else ""
        return f"<div><b>{type(self).__name__}</b><p>{head}</p>{table}</div>"

