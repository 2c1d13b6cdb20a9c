"""The technique catalog: one set of option names for both frameworks, checked the same way
by every technique's `options()`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from optimization import catalog
from optimization.base import FRAMEWORKS, TECHNIQUES, OptimizedResult, TechniqueConfig
from optimization.catalog import OptionError, validate_options
from optimization.techniques import get_technique

ROOT = Path(__file__).resolve().parents[2]


def changed_value(option, framework):
    """A valid value other than the default, to prove the override reaches options()."""
    spec = option.for_framework(framework)
    if option.type == "choice":
        return next((c for c in spec["choices"] if c != spec["default"]), spec["default"])
    if option.type == "bool":
        return not spec["default"]
    if option.type == "int":
        return spec["max"] if spec["default"] != spec["max"] else spec["min"]
    return (spec["min"] + spec["max"]) / 2


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("name", TECHNIQUES)
def test_every_option_of_every_technique_validates_through_the_technique_itself(name, framework, tmp_path):
    technique = get_technique(framework, name)
    declared = catalog.TECHNIQUE_SPECS[name].options_for(framework)
    overrides = {key: changed_value(option, framework) for key, option in declared.items()}

    options = technique.options(TechniqueConfig(tmp_path, overrides))

    assert {key: options[key] for key in overrides} == overrides
    assert set(technique.options(TechniqueConfig(tmp_path))) >= set(declared)


@pytest.mark.parametrize("name, option", [
    ("prune_structured", "pruning_ratio"), ("hybrid", "pruning_ratio"), ("distillation", "student_width"),
    ("ptq_int4", "scheme"), ("prune_unstructured", "target_sparsity"), ("ptq_int8", "weight_granularity"),
    ("qat", "epochs"), ("distillation", "temperature"),
])
def test_the_same_idea_has_the_same_name_in_both_frameworks(name, option, tmp_path):
    for framework in FRAMEWORKS:
        assert option in get_technique(framework, name).options(TechniqueConfig(tmp_path))


def test_a_shared_option_means_the_same_range_in_both_frameworks():
    for technique in catalog.TECHNIQUE_LIST:
        for option in technique.options:
            if set(option.frameworks) == set(FRAMEWORKS) and option.type in ("int", "float"):
                specs = [option.for_framework(fw) for fw in FRAMEWORKS]
                assert all(s["max"] is not None for s in specs), (technique.name, option.name)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_an_unknown_option_is_refused_the_same_way_naming_the_allowed_ones(framework, tmp_path):
    technique = get_technique(framework, "prune_structured")
    with pytest.raises(OptionError, match="prune_structured has no option keep_fraction") as refused:
        technique.options(TechniqueConfig(tmp_path, {"keep_fraction": 0.5}))
    assert "pruning_ratio" in str(refused.value)


@pytest.mark.parametrize("framework", FRAMEWORKS)
@pytest.mark.parametrize("options, words", [
    ({"pruning_ratio": 1.5}, "from 0.05 to 0.95"),
    ({"pruning_ratio": "half"}, "must be a number"),
    ({"epochs": 2.5}, "must be an integer"),
    ({"epochs": True}, "must be an integer"),
    ({"epochs": -1}, "from 0 to 100"),
])
def test_a_bad_value_is_refused_with_what_it_must_be(framework, options, words):
    with pytest.raises(OptionError, match=words):
        validate_options("prune_structured", framework, options)


def test_an_option_of_the_other_framework_is_refused_with_the_options_of_this_one():
    with pytest.raises(OptionError, match="for pytorch; its options are"):
        validate_options("prune_structured", "pytorch", {"distill": False})
    assert validate_options("prune_structured", "tensorflow", {"distill": False})["distill"] is False


def test_choices_differ_by_framework_where_the_runtimes_differ():
    assert validate_options("ptq_int4", "tensorflow", {})["scheme"] == "w4a8"
    assert validate_options("ptq_int4", "pytorch", {"scheme": "w4"})["scheme"] == "w4"
    with pytest.raises(OptionError, match="w4a8, w4, fc4_conv8"):
        validate_options("ptq_int4", "pytorch", {"scheme": "all4"})
    with pytest.raises(OptionError, match="w4a8, fc4_conv8, all4"):
        validate_options("ptq_int4", "tensorflow", {"scheme": "w4"})


def test_result_fields_are_typed():
    result = OptimizedResult({"deploy": Path("x.onnx")})
    result.record(precision="int8", sparsity=0.5, epochs=2)
    assert result.vocabulary() == {"precision": "int8", "sparsity": 0.5, "epochs": 2}
    with pytest.raises(TypeError, match="epochs must be int"):
        result.record(epochs="two")
    with pytest.raises(TypeError, match="not a result field"):
        result.record(sparsity_reached=0.5)


def test_magnitude_pruning_by_size_prunes_bigger_models_harder_and_fine_tunes_them_shorter():
    small, medium, large = (catalog.pruning_by_size(n) for n in (400_000, 4_000_000, 40_000_000))
    assert small["target_sparsity"] < medium["target_sparsity"] < large["target_sparsity"]
    assert small["epochs"] > medium["epochs"] > large["epochs"]
    for framework in FRAMEWORKS:  # an empty value means "by size" in both frameworks
        options = validate_options("prune_unstructured", framework, {"target_sparsity": None, "epochs": 3})
        filled = catalog.with_pruning_by_size(options, 400_000)
        assert (filled["target_sparsity"], filled["epochs"]) == (small["target_sparsity"], 3)
        assert "400,000 parameters" in filled["size_choice"]["reason"]
    given = catalog.with_pruning_by_size({"target_sparsity": 0.6, "epochs": 3}, 400_000)
    assert (given["target_sparsity"], given["size_choice"]) == (0.6, None)


def test_the_catalog_is_json_and_lists_devices_from_the_profiles():
    data = json.loads(json.dumps(catalog.as_dict()))
    profiles = json.loads((ROOT / "optimization" / "devices" / "profiles.json").read_text())["devices"]
    assert [d["name"] for d in data["devices"]] == list(profiles)
    assert [t["name"] for t in data["techniques"]] == list(TECHNIQUES)
    assert ".webp" in data["image_suffixes"]
    flat = catalog.as_dict("pytorch")
    prune = next(t for t in flat["techniques"] if t["name"] == "prune_structured")
    assert {o["name"] for o in prune["options"]} == {"pruning_ratio", "epochs", "learning_rate", "channel_multiple"}
    assert next(o for o in prune["options"] if o["name"] == "epochs")["default"] == 20


def test_the_catalog_imports_without_any_framework():
    code = ("import sys, optimization.catalog, optimization.recommender; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'numpy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
