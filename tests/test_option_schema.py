"""One option schema (LNSRConfig's fields) and one default lam: the CLI flags, the ``lnsr:`` specs,
the tune grid, best.json, twopass, profile and README's option table are derived from it."""
import argparse
import inspect
import json
import math
import os
import re

import pytest

import lnsr
from lnsr.cli import build_parser
from lnsr.config import DEFAULT_LAM, LNSRConfig, options_table
from lnsr.finetune.cli import method_defaults
from lnsr.finetune.tune import DEFAULT_GRID, parse_grid
from lnsr.methods import parse_method_spec
from tiny_models import batch, build

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SCHEMA = LNSRConfig.schema()
# The shared flags of lnsr finetune / lnsr tune, by name: the schema must not rename or drop one.
LNSR_FLAGS = ["--sigma", "--noise", "--inject-at", "--lam", "--normalize", "--dropout", "--detach-clean", "--backend"]
BEST_JSON = os.path.join(ROOT, "docs", "runs", "study", "strength", "mrpc1k", "mrpc", "best.json")


def _subparser(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _action(parser, flag):
    return next(a for a in parser._actions if flag in a.option_strings)


# -- (1) one default lam ----------------------------------------------------------------------------------
def test_lam_has_one_default_everywhere():
    want = LNSRConfig().lam
    assert want == DEFAULT_LAM == 0.003
    for command in ("finetune", "tune"):
        assert build_parser().parse_args([command, "--task", "mrpc"]).lam == want, command
    # lnsr:... specs without lam=: the shared flag's default
    args = build_parser().parse_args(["finetune", "--task", "mrpc"])
    for spec in ("lnsr", "lnsr:sigma=0.1"):
        assert parse_method_spec(spec, method_defaults(args))[2]["lam"] == want, spec
    # tune's default grid is centred on it
    grid = parse_grid(DEFAULT_GRID)
    assert list(grid) == ["lam"] and len(grid["lam"]) % 2 == 1
    lams = [float(v) for v in grid["lam"]]
    assert lams == sorted(lams) and lams[len(lams) // 2] == want
    # lnsr.LNSR itself
    with lnsr.LNSR(build("bert", layers=2)) as reg:
        assert reg.lam == want
    # the help states the value and its source
    help_ = SCHEMA["lam"].help
    assert f"default {want:g}:" in help_ and "docs/results.md" in help_ and "lnsr tune" in help_
    for command in ("finetune", "tune"):  # said once: the formatter adds no "(default: ...)" of its own
        text = " ".join(_subparser(command).format_help().split())
        text = text[text.index("LNSR options (method lnsr):"):]  # past the usage lines
        entry = text[text.index("--lam LAM"):text.index("--normalize {")]
        assert entry.count("default") == 1 and f"default {want:g}:" in entry, entry


def test_lnsr_trainer_takes_its_default_from_lnsr_config(tmp_path):
    pytest.importorskip("accelerate")
    import transformers as tf
    from lnsr.integrations import LNSRTrainer

    args = tf.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = LNSRTrainer(model=build("bert", layers=2), args=args, lnsr={"sigma": 0.1})
    assert trainer.lnsr_config.lam == LNSRConfig().lam == DEFAULT_LAM


# -- the schema itself -------------------------------------------------------------------------------------
def test_every_option_is_in_the_schema_with_a_consistent_type_and_default():
    assert tuple(SCHEMA) == LNSRConfig.names()
    for name, opt in SCHEMA.items():
        assert opt.help and "\n" not in opt.help and opt.doc, name
        if opt.type is not None:  # the annotation's scalar type holds the default
            assert (opt.default is None and opt.optional) or type(opt.default) is opt.type, name
        if opt.choices is not None:
            assert opt.default in opt.choices, name
    assert LNSRConfig.cli_names() == ("sigma", "noise", "inject_at", "lam", "normalize", "dropout", "detach_clean",
                                      "backend")
    # add_to_loss would count lam * P twice in lnsr finetune (its loop adds reg.loss itself)
    assert set(LNSRConfig.spec_names()) == set(LNSRConfig.cli_names()) | {"every", "noisy_fraction"}


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        LNSRConfig(0.1)  # the field order is the table's: a positional value would land anywhere


# -- (2a) the command line's flags -------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["finetune", "tune"])
def test_cli_flags_are_the_schema(command):
    parser = _subparser(command)
    group = next(g for g in parser._action_groups if g.title == "LNSR options (method lnsr)")
    assert [a.option_strings[0] for a in group._group_actions] == LNSR_FLAGS
    for name in LNSRConfig.cli_names():
        opt, act = SCHEMA[name], _action(parser, SCHEMA[name].flag)
        assert act.option_strings == [opt.flag] and act.dest == name
        assert act.default == opt.default and act.help == opt.help
        if opt.type is bool:
            assert isinstance(act, argparse._StoreTrueAction), name
        else:
            assert act.choices == opt.choices
            assert act.type is (None if opt.choices else opt.type), name
    parsed = build_parser().parse_args([command, "--task", "mrpc", "--lam", "0.1", "--noise", "gaussian",
                                        "--detach-clean", "--inject-at", "-1"])
    assert method_defaults(parsed) == {**LNSRConfig().to_json(LNSRConfig.cli_names()), "lam": 0.1,
                                       "noise": "gaussian", "detach_clean": True, "inject_at": -1}


def test_profile_flags_are_the_schema():
    parser = _subparser("profile")
    for name in ("sigma", "noise"):
        act = _action(parser, SCHEMA[name].flag)
        assert (act.default, act.help, act.choices) == (SCHEMA[name].default, SCHEMA[name].help, SCHEMA[name].choices)


# -- (2b) lnsr:key=value ------------------------------------------------------------------------------------
def test_spec_values_are_typed():
    label, name, options = parse_method_spec("lnsr:lam=0.01,noise=gaussian,detach_clean=true", {})
    assert (label, name) == ("lnsr_lam0.01_noisegaussian_detach_cleantrue", "lnsr")
    assert options == {"lam": 0.01, "noise": "gaussian", "detach_clean": True}
    assert type(options["lam"]) is float and options["detach_clean"] is True
    assert LNSRConfig.parse_overrides("lam=0.01,noise=gaussian,detach_clean=true") == options
    assert LNSRConfig.parse_overrides(["inject-at=-2", "every=3", "noisy_fraction=0.5", "detach_clean=0"]) == {
        "inject_at": -2, "every": 3, "noisy_fraction": 0.5, "detach_clean": False}
    assert LNSRConfig.parse_value("rank", "none") is None and LNSRConfig.parse_value("rank", "2") == 2


@pytest.mark.parametrize("spec, words", [
    ("lnsr:lamda=1", r"keys from sigma, noise, inject_at, lam, normalize, dropout, detach_clean, backend, every, "
                     r"noisy_fraction$"),
    ("lnsr:add_to_loss=true", r"keys from .*noisy_fraction$"),  # not a spec option
    ("lnsr:lam", r"keys from .*noisy_fraction$"),
    ("lnsr:noise=uniform", r"noise must be one of gaussian, relative, manifold, got 'uniform'"),
    ("lnsr:lam=abc", r"lam='abc': expected a float"),
    ("lnsr:lam=-1", r"lam must be a finite float >= 0"),
    ("lnsr:inject_at=1.5", r"inject_at='1.5': expected an int"),
    ("lnsr:detach_clean=maybe", r"detach_clean='maybe': expected true or false"),
    ("lnsr:every=0", r"every must be an int >= 1"),
])
def test_bad_spec_is_one_line_that_says_what_to_give(spec, words):
    with pytest.raises(SystemExit) as e:
        parse_method_spec(spec, {})
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"bad method spec {spec!r}: "), text
    assert re.search(words, text), text


def test_parse_overrides_errors_name_the_keys():
    with pytest.raises(ValueError, match=r"unknown option 'lamda'; the keys are sigma, noise, .*noisy_fraction$"):
        LNSRConfig.parse_overrides("lamda=1")
    with pytest.raises(ValueError, match=r"'lam' is not key=value; the keys are"):
        LNSRConfig.parse_overrides("lam")
    with pytest.raises(ValueError, match=r"unknown LNSR option 'nope'; the options are sigma, "):
        LNSRConfig.parse_value("nope", "1")
    with pytest.raises(ValueError, match=r"layer_weights cannot be given as text: pass it from Python"):
        LNSRConfig.parse_value("layer_weights", "1")


# -- (2c) the tune grid -------------------------------------------------------------------------------------
@pytest.mark.parametrize("item, words", [
    ("lr=1e-4,2e-5", r"'lr' is not an LNSR option; choose from sigma, noise, inject_at, lam, .*noisy_fraction$"),
    ("add_to_loss=true", r"'add_to_loss' is not an LNSR option"),
    ("noise=relative,uniform", r"noise must be one of gaussian, relative, manifold, got 'uniform'"),
    ("lam=0.01,x", r"lam='x': expected a float"),
    ("inject_at=0,1.5", r"inject_at='1.5': expected an int"),
])
def test_tune_grid_axes_go_through_the_schema(item, words):
    with pytest.raises(SystemExit) as e:
        parse_grid([item])
    assert "\n" not in str(e.value) and re.search(words, str(e.value)), str(e.value)


def test_tune_grid_accepts_every_spec_option():
    good = {"sigma": "0.1", "noise": "manifold", "inject_at": "-1", "lam": "0", "normalize": "gain",
            "dropout": "off", "detach_clean": "true", "backend": "torch", "every": "2", "noisy_fraction": "0.5"}
    assert set(good) == set(LNSRConfig.spec_names())
    assert parse_grid([f"{k}={v}" for k, v in good.items()]) == {k: [v] for k, v in good.items()}


# -- (2d) best.json -----------------------------------------------------------------------------------------
def test_json_round_trip():
    cfg = LNSRConfig(lam=0.01, noise="gaussian", layer_weights=[1, 2.5], detach_clean=True, blocks="encoder.layer",
                     rank=3, every=2, noisy_fraction=0.5, check_finite=False)
    data = cfg.to_json()
    assert data["layer_weights"] == [1.0, 2.5] and list(data) == list(LNSRConfig.names())
    assert LNSRConfig.from_json(json.dumps(data)) == cfg
    assert LNSRConfig.from_json(data) == cfg
    assert cfg.to_json(["lam", "noise"]) == {"lam": 0.01, "noise": "gaussian"}
    assert LNSRConfig.from_json({"lam": "0.01", "detach_clean": "true"}) == LNSRConfig(lam=0.01, detach_clean=True)
    with pytest.raises(ValueError, match=r"unknown LNSR option\(s\) \['lamda'\]; the options are sigma, "):
        LNSRConfig.from_json({"lamda": 0.1})
    with pytest.raises(ValueError, match=r"blocks holds modules, which JSON cannot carry"):
        LNSRConfig(blocks=[object()]).to_json()
    with pytest.raises(ValueError, match=r"not JSON"):
        LNSRConfig.from_json("{lam: 1")
    with pytest.raises(ValueError, match=r"no 'best' entry"):
        LNSRConfig.from_json({"best": None, "ranking": []})


def test_an_existing_best_json_reads():
    if not os.path.exists(BEST_JSON):
        pytest.skip(f"{BEST_JSON} is not in this checkout")
    with open(BEST_JSON) as f:
        text = f.read()
    stored = json.loads(text)["best"]
    cfg = LNSRConfig.from_json(text)  # the whole record of lnsr tune
    assert cfg == LNSRConfig.from_json(stored["options"]) == LNSRConfig.make(stored["options"])
    assert (cfg.lam, cfg.inject_at, cfg.noise) == (0.003, 0, "relative")
    assert cfg.to_json(stored["options"]) == stored["options"]  # the same options, the same JSON
    label, name, options = parse_method_spec(f"lnsr:@{BEST_JSON}", {})
    assert (label, name, options) == (stored["label"], "lnsr", stored["options"])
    label, _, options = parse_method_spec(f"lnsr:@{BEST_JSON},lam=0.01", {})
    assert label == stored["label"] + "_lam0.01" and options == {**stored["options"], "lam": 0.01}


def test_best_json_with_a_bad_option_is_refused(tmp_path):
    path = tmp_path / "best.json"
    for options, words in (({"lam": 0.01, "n_anchor": 3}, r"unknown lnsr option\(s\) \['n_anchor'\]; the options "
                                                          r"are sigma, "),
                           ({"noise": "uniform"}, r"noise must be one of"), ({"lam": "x"}, r"lam='x': expected")):
        path.write_text(json.dumps({"best": {"method": "lnsr", "label": "lnsr_x", "options": options}}))
        with pytest.raises(SystemExit, match=r"bad method spec .*best\.json: " + words):
            parse_method_spec(f"lnsr:@{path}", {})


# -- (2e) README's option table -----------------------------------------------------------------------------
def test_options_table_has_a_row_per_option():
    lines = options_table().splitlines()
    assert lines[:2] == ["| option | default | meaning |", "|---|---|---|"]
    rows = [re.match(r"\| `(\w+)` \| (.+?) \| (.+) \|$", ln) for ln in lines[2:]]
    assert all(rows) and [r.group(1) for r in rows] == list(LNSRConfig.names())
    shown = {r.group(1): r.group(2) for r in rows}
    assert shown["lam"] == f"`{DEFAULT_LAM}`" and shown["noise"] == '`"relative"`' and shown["blocks"] == "auto"
    assert "default 0.003: the held-out choice of 3 of the 4 regimes of docs/results.md" in lines[2 + 3]


def test_readme_option_table_is_generated():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    begin, end = "<!-- options:begin -->", "<!-- options:end -->"
    if begin not in text or end not in text:
        pytest.skip(f"README.md has no {begin} ... {end} markers yet: put them around the option table")
    block = text[text.index(begin) + len(begin):text.index(end)].strip("\n")
    fill = 'python -c "from lnsr.config import options_table; print(options_table(), end=\'\')"'
    if not block.strip():
        # the markers are placed but the table is not pasted in yet; any text there is compared exactly
        pytest.skip(f"README.md's {begin} block is empty: fill it with the output of {fill}")
    assert block == options_table().strip("\n"), f"README.md's option table differs from the schema: regenerate " \
                                                 f"the block between the markers with {fill}"


# -- (2f) twopass and profile take LNSRConfig's options ------------------------------------------------------
def test_two_pass_and_profile_have_no_defaults_of_their_own():
    from lnsr.profile import noise_profile
    from lnsr.twopass import two_pass

    for fn in (two_pass, noise_profile):
        params = inspect.signature(fn).parameters
        assert not set(params) & (set(LNSRConfig.names()) - {"inject_at"}), fn.__name__
    model = build("bert", layers=2)
    model.train()
    inputs = batch("bert")
    _, p = two_pass(model, inputs, seed=5, sigma=0.1)
    _, q = two_pass(model, inputs, LNSRConfig(sigma=0.1, dropout="independent", lam=0.5), seed=5)
    assert p.item() == q.item() > 0
    with pytest.raises(ValueError, match=r"normalize='token'"):
        two_pass(model, inputs, seed=5, normalize="gain")
    with pytest.raises(ValueError, match=r"sigma must be"):
        two_pass(model, inputs, seed=5, sigma=-1.0)
    batches = [{k: v for k, v in inputs.items() if k != "labels"}]
    prof = noise_profile(model, batches, inject_at=[0], backend="torch")
    assert (prof["sigma"], prof["noise"]) == (LNSRConfig().sigma, LNSRConfig().noise)
    again = noise_profile(model, batches, LNSRConfig(sigma=0.05, backend="torch"), inject_at=[0])
    assert not math.isnan(prof["change"][0, -1]) and (prof["change"][0, 1:] == again["change"][0, 1:]).all()
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['sigmaa'\]"):
        noise_profile(model, batches, sigmaa=0.1)
