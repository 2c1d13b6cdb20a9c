"""Input checking: one form per endpoint. The JSON API feeds the parsed body to the same
forms the pages use, so both front ends accept and refuse exactly the same things."""
from __future__ import annotations

import math

from django import forms

from optimization import catalog
from optimization.catalog import CONSTRAINT_NAMES, FINE_TUNING_TECHNIQUES, MAX_EPOCHS, TECHNIQUES

from . import storage
from .models import FRAMEWORK_CHOICES, GOALS, PLAN_CHOICES, TARGET_DEVICES, TECHNIQUE_CHOICES
from .services import UPLOAD_KINDS, ServiceError, parse_input_shape

CONFIG_KEYS = {"input_shape", "architecture", "preprocessing", "techniques", "seed"}


def validate_constraints(value) -> dict:
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise forms.ValidationError("constraints must be an object like {\"max_accuracy_drop\": 1.0}")
    unknown = set(value) - set(CONSTRAINT_NAMES)
    if unknown:
        raise forms.ValidationError(
            f"unknown constraints {sorted(unknown)}; known: {', '.join(CONSTRAINT_NAMES)}")
    cleaned = {}
    for name, limit in value.items():
        if limit is None:
            continue
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit < 0:
            raise forms.ValidationError(f"constraint {name} must be a finite number of at least 0, not {limit!r}")
        cleaned[name] = limit
    return cleaned


def validate_config(value) -> dict:
    """input_shape, architecture, preprocessing, seed and per-technique options, e.g.
    {"techniques": {"qat": {"epochs": 2}}} (their names and values are checked against the
    catalog once the framework is known: `checked_options`)."""
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise forms.ValidationError("config must be an object")
    unknown = set(value) - CONFIG_KEYS
    if unknown:
        raise forms.ValidationError(f"unknown config keys {sorted(unknown)}; known: {', '.join(sorted(CONFIG_KEYS))}")
    cleaned = dict(value)
    try:
        if "input_shape" in value:
            cleaned["input_shape"] = parse_input_shape(value["input_shape"])
    except ServiceError as exc:
        raise forms.ValidationError(exc.message) from None
    if "architecture" in value and not storage.SAFE_NAME.match(str(value["architecture"])):
        raise forms.ValidationError(f"architecture {value['architecture']!r} is not a valid name")
    if not isinstance(value.get("preprocessing", {}), dict):
        raise forms.ValidationError("config.preprocessing must be an object")
    if "seed" in value and (isinstance(value["seed"], bool) or not isinstance(value["seed"], int)):
        raise forms.ValidationError("config.seed must be an integer")
    budgets = value.get("techniques", {})
    if not isinstance(budgets, dict) or not all(isinstance(b, dict) for b in budgets.values()):
        raise forms.ValidationError('config.techniques must map a technique to its options, e.g. {"qat": {"epochs": 2}}')
    if unknown := set(budgets) - set(TECHNIQUES):
        raise forms.ValidationError(f"config.techniques names unknown techniques {sorted(unknown)}; "
                                    f"the techniques are {', '.join(TECHNIQUES)}")
    return cleaned


def checked_options(framework: str, config: dict, options: dict | None) -> dict:
    """`config` with `options` ({technique: {option: value}}) merged over its "techniques",
    every name and value checked against the catalog for `framework`."""
    merged = {name: dict(values) for name, values in (config.get("techniques") or {}).items()}
    if options is not None and not isinstance(options, dict):
        raise forms.ValidationError('options must map a technique to its options, e.g. '
                                    '{"prune_structured": {"pruning_ratio": 0.3}}')
    for name, values in (options or {}).items():
        if not isinstance(values, dict):
            raise forms.ValidationError(f"options.{name} must be an object of option values")
        merged[name] = {**merged.get(name, {}), **values}
    try:
        merged = catalog.validate_all_options(framework, merged)
    except catalog.OptionError as exc:
        raise forms.ValidationError(str(exc)) from None
    return {**config, "techniques": merged} if merged else config


class ExperimentForm(forms.Form):
    """POST /api/experiments/create (a JSON body)."""

    name = forms.CharField(max_length=100)
    framework = forms.ChoiceField(choices=FRAMEWORK_CHOICES)
    target_device = forms.ChoiceField(choices=TARGET_DEVICES)
    dataset = forms.CharField(max_length=100, help_text='a preset name, or "custom" to upload one')
    goal = forms.ChoiceField(choices=GOALS, required=False)
    techniques = forms.MultipleChoiceField(
        choices=TECHNIQUE_CHOICES, required=False, widget=forms.CheckboxSelectMultiple,
        help_text="none ticked means all seven")
    pretrained_model = forms.CharField(max_length=100, required=False)
    constraints = forms.JSONField(required=False)
    config = forms.JSONField(required=False)
    options = forms.JSONField(required=False, help_text="per technique, names from GET /api/catalog")
    plan = forms.ChoiceField(choices=PLAN_CHOICES, required=False)
    time_budget_s = forms.FloatField(required=False, min_value=1, max_value=catalog.MAX_TIME_BUDGET_S,
                                     label="time budget (s)",
                                     help_text="no technique starts whose estimate cannot finish within it")
    default_plan = catalog.API_DEFAULT_PLAN

    def clean_name(self):
        return self.cleaned_data["name"].strip()

    def clean_dataset(self):
        name = self.cleaned_data["dataset"].strip()
        presets = storage.list_presets()
        if name != "custom" and name not in presets:
            raise forms.ValidationError(f"unknown dataset {name!r}; use one of {', '.join(presets)} or 'custom'")
        return name

    def clean_goal(self):
        return self.cleaned_data["goal"] or catalog.DEFAULT_GOAL

    def clean_plan(self):
        return self.cleaned_data["plan"] or self.default_plan

    def clean_techniques(self):
        chosen = set(self.cleaned_data["techniques"])
        return [name for name in TECHNIQUES if name in chosen] or list(TECHNIQUES)

    def clean_constraints(self):
        return validate_constraints(self.cleaned_data.get("constraints"))

    def clean_config(self):
        return validate_config(self.cleaned_data.get("config"))

    def clean(self):
        cleaned = super().clean()
        name, framework = cleaned.get("pretrained_model"), cleaned.get("framework")
        if name and framework:
            found = storage.pretrained_models(framework)
            if name not in found:
                available = ", ".join(found) or "none yet"
                self.add_error("pretrained_model", (
                    f"no pretrained {framework} model named {name!r} (available: {available}); "
                    "run `python manage.py seed_demo` to add the demo models"))
            else:
                cleaned["pretrained_path"] = found[name]
        if framework and "config" in cleaned:
            # config.techniques first, then the options on top: each error names its own field
            for field_name, options in (("config", None), ("options", cleaned.get("options"))):
                try:
                    cleaned["config"] = checked_options(framework, cleaned["config"], options)
                except forms.ValidationError as exc:
                    self.add_error(field_name, exc)
                    break
        return cleaned


class UploadForm(forms.Form):
    """POST /api/experiments/{id}/upload (multipart)."""

    file = forms.FileField()
    kind = forms.ChoiceField(choices=[(k, k) for k in UPLOAD_KINDS], required=False)
    input_shape = forms.CharField(max_length=50, required=False, help_text="one sample, e.g. 1,8,8")
    architecture = forms.CharField(max_length=100, required=False, help_text="for a .pth state_dict")


class SetupForm(ExperimentForm):
    """The setup page: the same fields, with constraints and budgets as separate inputs
    and the files in the same post."""

    constraints = None
    config = None
    options = None
    default_plan = catalog.PAGE_DEFAULT_PLAN
    pretrained_model = forms.ChoiceField(required=False, label="Model")
    model_file = forms.FileField(required=False, label="or upload a model")
    input_shape = forms.CharField(max_length=50, required=False, help_text="one sample, e.g. 1,8,8 (if the file does not say)")
    architecture = forms.CharField(max_length=100, required=False, help_text="for a .pth state_dict")
    dataset = forms.ChoiceField()
    dataset_file = forms.FileField(required=False, label="custom dataset (.npz or .zip)")
    max_accuracy_drop = forms.FloatField(required=False, min_value=0, initial=1.0, label="max accuracy drop (points)")
    max_size_mb = forms.FloatField(required=False, min_value=0, label="max size (MB)")
    max_latency_ms = forms.FloatField(required=False, min_value=0, label="max latency on the device (ms)")
    max_memory_mb = forms.FloatField(required=False, min_value=0, label="max memory (MB)")
    max_energy_mj = forms.FloatField(required=False, min_value=0, label="max energy per inference (mJ)")
    epochs = forms.IntegerField(
        required=False, min_value=0, max_value=MAX_EPOCHS, label="fine-tuning epochs",
        help_text="Blank: each technique's own budget, longest after a channel cut, where recovery "
                  "is close to retraining.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = sorted({name for fw, _ in FRAMEWORK_CHOICES for name in storage.pretrained_models(fw)})
        self.fields["pretrained_model"].choices = [("", "— upload my own —")] + [(n, n) for n in names]
        self.fields["dataset"].choices = [(n, n) for n in storage.list_presets()] + [("custom", "custom (upload)")]
        self.fields["techniques"].initial = list(TECHNIQUES)
        self.fields["plan"].initial = catalog.PAGE_DEFAULT_PLAN
        # Numbers as text: a browser turns what <input type=number> cannot hold (1e400) into an
        # empty value and the post would silently drop it; here the server sees it and says so.
        for field in self.fields.values():
            if isinstance(field, (forms.FloatField, forms.IntegerField)):
                field.widget = forms.TextInput(attrs={"inputmode": "decimal", "autocomplete": "off"})
                field.error_messages["invalid"] = "enter a finite number, like 2.5"

    def clean(self):
        cleaned = super().clean()
        if not cleaned.get("pretrained_model") and not cleaned.get("model_file"):
            self.add_error("model_file", "upload a model or pick a pretrained one")
        if cleaned.get("dataset") == "custom" and not cleaned.get("dataset_file"):
            self.add_error("dataset_file", "upload the dataset, or pick a preset")
        limits = {name: cleaned.get(name) for name in CONSTRAINT_NAMES if name in self.fields}
        cleaned["constraints"] = validate_constraints({k: v for k, v in limits.items() if v is not None})
        epochs = cleaned.get("epochs")
        config = {"techniques": {name: {"epochs": epochs} for name in FINE_TUNING_TECHNIQUES}} if epochs is not None else {}
        if cleaned.get("input_shape"):
            config["input_shape"] = cleaned["input_shape"]
        try:
            cleaned["config"] = validate_config(config)
        except forms.ValidationError as exc:
            self.add_error("input_shape", exc)
            return cleaned
        if cleaned.get("framework"):
            try:
                cleaned["config"] = checked_options(cleaned["framework"], cleaned["config"], None)
            except forms.ValidationError as exc:
                self.add_error("epochs", exc)
        return cleaned
