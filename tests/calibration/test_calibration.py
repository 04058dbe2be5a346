"""Calibration: the statistics recover planted structure; the pipeline writes valid profiles for every method."""

from __future__ import annotations

import json

import pytest
import torch

from support import DATA
from vllm_steer.calibration.pipeline import CalibrationConfig, CalibrationError, calibrate_profile
from vllm_steer.calibration.stats import (
    ClassStats,
    diff_of_means,
    discriminative_layers,
    fit_probe,
    second_axis,
    select_b1,
)
from vllm_steer.core.profile import load_profile
from vllm_steer.data import DatasetError, load_labelled, load_prompts, split
from vllm_steer.testing.engines import record_engine_start


def _planted(d=64, n=1000, seed=0, strength=3.0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=gen)
    u = u / u.norm()
    pos = torch.randn(n, d, generator=gen) + strength * u
    neg = torch.randn(n, d, generator=gen) - strength * u
    return u, pos, neg


def _stats(acts_by_site: dict) -> ClassStats:
    stats = ClassStats()
    for site, acts in acts_by_site.items():
        stats.add(site, acts)
    stats.count = next(iter(acts_by_site.values())).shape[0]
    return stats


def test_diff_of_means_recovers_a_planted_direction():
    u, pos, neg = _planted()
    site = (0, "layer_output")
    d = diff_of_means(_stats({site: pos}), _stats({site: neg}), site)
    assert float(d.double() @ u.double()) > 0.99


def test_b1_is_the_candidate_with_highest_mean_cosine_and_b2_is_orthonormal():
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(32, generator=gen)
    candidates = torch.stack(
        [base + 0.3 * torch.randn(32, generator=gen) for _ in range(9)] + [torch.randn(32, generator=gen)]
    )
    k, b1 = select_b1(candidates)
    unit = candidates / candidates.norm(dim=1, keepdim=True)
    means = [(unit[i] @ unit.T).mean().item() for i in range(len(unit))]  # independent re-computation
    assert k == max(range(len(means)), key=means.__getitem__)
    b2 = second_axis(candidates, b1)
    assert abs(float(b1.norm()) - 1) < 1e-6 and abs(float(b2.norm()) - 1) < 1e-6
    assert abs(float(b1 @ b2)) < 1e-6


def test_discriminative_layers_follow_the_opposite_sign_rule():
    d = 16
    b1 = torch.zeros(d, dtype=torch.float64)
    b1[0] = 1
    pos_acts, neg_acts = {}, {}
    for layer, (sp, sn) in enumerate([(1, -1), (1, 1), (-1, 1), (-1, -1)]):
        for kind in ("input_norm", "post_attn_norm"):
            flip = -1 if (layer == 2 and kind == "post_attn_norm") else 1  # layer 2 fails on one hook
            pos_acts[(layer, kind)] = torch.randn(20, d).abs() * 0.1 + sp * flip * b1 * 5
            neg_acts[(layer, kind)] = torch.randn(20, d).abs() * 0.1 + sn * b1 * 5
    kept = discriminative_layers(_stats(pos_acts), _stats(neg_acts), b1, 4)
    assert kept == [0]


def test_probe_finds_the_planted_direction_and_reports_held_out_accuracy():
    u, pos, neg = _planted(seed=2)
    v, acc = fit_probe(pos[:800], neg[:800], pos[800:], neg[800:])
    assert abs(float(v.norm()) - 1) < 1e-5
    assert float(v.double() @ u.double()) > 0.9
    assert acc > 0.95
    assert float((pos @ v).mean()) > float((neg @ v).mean())  # docs/methods.md §4 row 14: sign check


def test_datasets_read_user_files_and_refuse_bad_ones(tmp_path):
    assert len(load_prompts(str(DATA / "harmful.csv"))) == 10
    cats = load_prompts(str(DATA / "catqa_small.csv"))
    assert {p.category for p in cats} == {"Illegal Activity", "Malware Viruses", "Privacy Violation Activity"}
    empty = tmp_path / "empty.csv"
    empty.write_text("text\n")
    with pytest.raises(DatasetError, match="no rows"):
        load_prompts(str(empty))
    no_text = tmp_path / "x.csv"
    no_text.write_text("foo,bar\n1,2\n")
    with pytest.raises(DatasetError, match="no text column"):
        load_prompts(str(no_text))
    with pytest.raises(DatasetError, match="not found"):
        load_prompts(str(tmp_path / "missing.jsonl"))
    train, held = split(cats, 0.25, seed=3)
    assert len(held) == 3 and len(train) == 9 and not set(map(id, train)) & set(map(id, held))
    assert split(cats, 0.25, seed=3) == (train, held), "the split is reproducible from its seed"


def test_one_labelled_file_holds_both_classes_and_one_class_is_refused(tiny_root, tmp_path):
    rows = [{"prompt": f"harmful request {i}", "label": "harmful" if i % 2 else 0} for i in range(12)]
    labelled = tmp_path / "mixed.jsonl"
    labelled.write_text("\n".join(json.dumps(r) for r in rows))
    harmful, harmless = load_labelled(str(labelled))
    assert len(harmful) == 6 and len(harmless) == 6 and all(p.harmful for p in harmful)
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\na,1\nb,1\n")
    with pytest.raises(DatasetError, match="every row is labelled harmful"):
        load_labelled(str(one_class))
    odd = tmp_path / "odd.csv"
    odd.write_text("text,label\na,1\nb,maybe\n")
    with pytest.raises(DatasetError, match="row 1 has label 'maybe'"):
        load_prompts(str(odd))
    base = dict(model=str(tiny_root / "model"), method="addition", n=10, held_out=0.0, layers=[1])
    path = calibrate_profile(CalibrationConfig(out=tmp_path / "lab", harmful=str(labelled), harmless="labels", **base))
    assert load_profile(path).spec.calibration["sizes"]["harmless_train"] == 6
    sys_path = calibrate_profile(
        CalibrationConfig(
            out=tmp_path / "sys", harmful=str(labelled), harmless="labels", contrast="system-prompt", **base
        )
    )
    sys_spec = load_profile(sys_path).spec
    assert (
        sys_spec.calibration["contrast_kind"] == "system-prompt" and "system prompt" in sys_spec.calibration["contrast"]
    )
    with pytest.raises(CalibrationError, match="contrast: unknown 'vibes'"):
        calibrate_profile(
            CalibrationConfig(out=tmp_path / "v", harmful=str(labelled), harmless="labels", contrast="vibes", **base)
        )
    with pytest.raises(CalibrationError, match=r"harmful: .* has rows labelled harmless"):
        calibrate_profile(
            CalibrationConfig(out=tmp_path / "x", harmful=str(labelled), harmless=str(DATA / "harmless.jsonl"), **base)
        )
    with pytest.raises(DatasetError, match="every row is labelled harmful"):
        calibrate_profile(CalibrationConfig(out=tmp_path / "y", harmful=str(one_class), harmless="labels", **base))
    with pytest.raises(CalibrationError, match=r"layers: \[9\] do not exist in model \(4 layers, 0\.\.3\)"):
        calibrate_profile(
            CalibrationConfig(
                out=tmp_path / "z", harmful=str(labelled), harmless="labels", **{**base, "layers": [1, 9]}
            )
        )


@pytest.mark.parametrize(
    "method", ["selective", "angular_standard", "angular_adaptive", "ablation", "addition", "probe"]
)
def test_pipeline_writes_a_valid_profile(method, tiny_root, tmp_path):
    layers = [1, 2] if method == "selective" else None  # a random model need not have discriminative layers
    cfg = CalibrationConfig(
        model=str(tiny_root / "model"),
        method=method,
        out=tmp_path / method,
        harmful=str(DATA / "harmful.csv"),
        harmless=str(DATA / "harmless.jsonl"),
        n=10,
        held_out=0.2,
        seed=0,
        batch_size=4,
        layers=layers,
    )
    path = calibrate_profile(cfg)
    profile = load_profile(path)
    spec = profile.spec
    assert spec.method == method and spec.model.hidden_size == 128 and spec.model.num_layers == 4
    assert spec.calibration["sizes"] == {
        "harmful_train": 8,
        "harmful_held_out": 2,
        "harmless_train": 8,
        "harmless_held_out": 2,
    }
    assert spec.calibration["split"] == {"held_out": 0.2, "seed": 0}
    if method in ("selective", "angular_standard", "angular_adaptive"):
        b1, b2 = profile.vectors[spec.layers[0]]["b1"], profile.vectors[spec.layers[0]]["b2"]
        assert abs(float(b1 @ b2)) < 1e-4
    if method == "probe":
        acc = spec.calibration["probe_accuracy_held_out"]
        assert len(acc) == 4 and len(spec.layers) == 3


def test_category_pipeline_has_one_vector_per_category_plus_generic(tiny_root, tmp_path):
    cfg = CalibrationConfig(
        model=str(tiny_root / "model"),
        method="category",
        out=tmp_path / "cat",
        harmful=str(DATA / "catqa_small.csv"),
        harmless=str(DATA / "harmless.jsonl"),
        n=4,
        held_out=0.0,
        layers=[1, 2],
    )
    profile = load_profile(calibrate_profile(cfg))
    assert profile.spec.categories == ["Illegal Activity", "Malware Viruses", "Privacy Violation Activity", "generic"]
    assert set(profile.vectors[1]) == set(profile.spec.categories)
    bad = CalibrationConfig(
        model=str(tiny_root / "model"),
        method="category",
        out=tmp_path / "bad",
        harmful=str(DATA / "catqa_small.csv"),
        harmless=str(DATA / "harmless.jsonl"),
        categories=["Not A Category"],
    )
    with pytest.raises(CalibrationError, match="categories: unknown"):
        calibrate_profile(bad)
    no_categories = CalibrationConfig(
        model=str(tiny_root / "model"),
        method="category",
        out=tmp_path / "bad2",
        harmful=str(DATA / "harmful.csv"),
        harmless=str(DATA / "harmless.jsonl"),
    )
    with pytest.raises(CalibrationError, match="without a category"):
        calibrate_profile(no_categories)


@pytest.mark.engine
def test_calibrate_cli_sweeps_the_angle_through_the_engine(tiny_root, tmp_path):
    """The command end to end: calibrate, then every angle as a row of one engine call, recorded in the profile."""
    import os
    import subprocess
    import sys

    out = tmp_path / "sel"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_PLUGINS", None)
    cmd = [
        sys.executable,
        "-m",
        "vllm_steer.cli",
        "calibrate",
        str(tiny_root / "model"),
        "--method",
        "selective",
        "--layers",
        "1,2",
        "--out",
        str(out),
        "--harmful",
        str(DATA / "harmful.csv"),
        "--harmless",
        str(DATA / "harmless.jsonl"),
        "--n",
        "10",
        "--sweep",
        "0:360:90",
        "--sweep-n",
        "2",
        "--max-tokens",
        "8",
        "--report",
    ]
    record_engine_start("cli:calibrate-sweep")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    spec = load_profile(out).spec
    sweep = spec.calibration["sweep"]
    assert [p["value"] for p in sweep["points"]] == [None, 0, 90, 180, 270]
    assert sweep["served_in_one_mixed_batch"] is True
    baseline, zero = sweep["points"][0], sweep["points"][1]
    # Selective Steering at 0 degrees is the identity: the same text, the same logprobs.
    assert zero["example"] == baseline["example"]
    assert zero["perplexity"] == pytest.approx(baseline["perplexity"], rel=1e-6)
    assert any(p["example"] != baseline["example"] for p in sweep["points"][2:]), "some angle must steer"
    if sweep["chosen"] is None:
        assert spec.defaults.angle == 180.0 and "no coherent point" in sweep["criterion"]
    else:
        assert spec.defaults.angle == sweep["chosen"]
    for png in ("sweep.png", "layer_projections.png", "direction_cosines.png"):
        assert (out / "report" / png).stat().st_size > 1000
    assert "discriminative layers" in (out / "report" / "README.md").read_text().lower()
