"""engine.attention_train: the training-step view, checked against figures worked out by hand."""

import pandas as pd
import pytest

from engine.attention_train import ModelShape, model_sweep_fields, training_view


def _table() -> pd.DataFrame:
    base = dict(dtype="bf16", head_dim=128, causal=True, mask="none", seqlen=8192, status="ok")
    rows = [
        {**base, "batch": 2, "heads": 16, "kv_heads": 16, "backend": "sdpa", "ms": 4.0, "peak_extra_mib": 400.0},
        {**base, "batch": 2, "heads": 16, "kv_heads": 16, "backend": "fa4", "ms": 3.0, "peak_extra_mib": 380.0},
        {**base, "batch": 2, "heads": 16, "kv_heads": 16, "backend": "sdpa-math", "ms": 9.0, "peak_extra_mib": 9e3,
         "status": "error"},  # not timed: left out
        {**base, "batch": 1, "heads": 16, "kv_heads": 16, "backend": "sdpa", "ms": 99.0, "peak_extra_mib": 1.0,
         "seqlen": 4096},  # another seqlen: left out
        {**base, "batch": 2, "heads": 16, "kv_heads": 16, "backend": "fa4", "ms": 1.0, "peak_extra_mib": 1.0,
         "mask": "window-1k"},  # a masked row: left out
    ]
    return pd.DataFrame(rows)


def test_view_scales_by_batch_times_heads_and_compares_with_sdpa_default():
    model = ModelShape(batch=1, seqlen=8192, heads=64, kv_heads=8, head_dim=128, layers=10)
    view = training_view(_table(), model).set_index("backend")
    # B*H = 64 against the rows' 32: x2 per layer, x10 layers.
    assert view.loc["fa4", "ms_per_layer"] == 6.0 and view.loc["fa4", "ms_per_step"] == 60.0
    assert view.loc["sdpa", "ms_per_step"] == 80.0 and view.loc["fa4", "peak_mib_per_layer"] == 760.0
    assert view.loc["fa4", "speedup_vs_default"] == pytest.approx(4 / 3)
    assert view.loc["fa4", "memory_vs_default"] == pytest.approx(380 / 400)
    assert view["best"].to_dict() == {"fa4": True, "sdpa": False}
    assert view.loc["fa4", "source"] == "x2 from B=2, H=16"


def test_view_at_the_measured_shape_says_so_and_is_empty_without_a_matching_row():
    view = training_view(_table(), ModelShape(batch=2, seqlen=8192, heads=16, kv_heads=4, head_dim=128, layers=1))
    assert list(view["source"]) == ["measured at this B and H"] * 2 and list(view["ms_per_step"]) == [3.0, 4.0]
    assert training_view(_table(), ModelShape(seqlen=2048)).empty


@pytest.mark.parametrize("field, value, match", [
    ("kv_heads", 5, r"KV heads must divide Heads \(32\), got 5"),
    ("kv_heads", 64, "KV heads must be >= 1 and <= 32"),
    ("head_dim", 512, "Head dim must be >= 8 and <= 256"),
    ("layers", 0, "Layers must be >= 1"),
])
def test_bad_model_shapes_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        training_view(_table(), ModelShape(**{field: value}))


def test_model_sweep_fields_time_exactly_the_models_shape():
    f = model_sweep_fields(ModelShape(batch=3, seqlen=4096, heads=32, kv_heads=8, head_dim=128, layers=2))
    assert f["tokens"] // f["seqlens"][0] == 3 and f["hidden"] // f["head_dims"][0] == 32 and f["gqa"] == (4,)
    assert f["mode"] == "fwd+bwd"
