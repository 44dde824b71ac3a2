"""What a host serves, as the owner writes it: repeated ``--model`` flags or a ``--config host.toml`` file.

The grammar is checked through the real argument parser (``gpunexus node
serve ...``), before anything starts; a bad file is one clear error.
"""

from __future__ import annotations

import textwrap

import pytest

from gpunexus.cli import build_parser
from gpunexus.node.host.config import ConfigError, specs_from_args


def specs(*argv: str):
    return specs_from_args(build_parser().parse_args(["node", "serve", *argv]))


def write(tmp_path, text: str):
    path = tmp_path / "host.toml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_one_model_is_what_it_always_was():
    [spec] = specs("--model", "tiny", "--price", "0.25", "--slots", "3", "--license", "MIT")
    assert (spec.id, spec.backend, spec.price_micro(), spec.slots, spec.license) == ("tiny", "reference", 250_000, 3, "MIT")


def test_repeated_model_flags_share_every_other_flag():
    tiny, nano = specs("--model", "tiny", "--model", "nano", "--price", "0.3", "--slots", "2", "--min-tokens-per-s", "5")
    assert (tiny.id, nano.id) == ("tiny", "nano")
    for spec in (tiny, nano):
        assert spec.price_micro() == 300_000 and spec.slots == 2 and spec.minimums.tokens_per_s == 5


def test_a_config_file_gives_each_model_its_own_terms_and_flags_fill_the_gaps(tmp_path):
    path = write(tmp_path, """\
        [[model]]
        id = "tiny"
        price = 0.25
        slots = 3
        license = "Apache-2.0"

        [[model]]
        id = "chat-small"
        reference = "nano"
        price = "market"
        min_price = "0.1"
        min_tokens_per_s = 2
        min_vram_gb = 4
        min_compute_capability = "8.0"
        min_bandwidth_mbps = 100
        force = true
        """)
    tiny, small = specs("--config", path, "--slots", "5", "--license", "flag licence")
    assert (tiny.price_micro(), tiny.slots, tiny.license, tiny.follows_market, tiny.force) == (250_000, 3, "Apache-2.0", False, False)
    assert (small.id, small.reference, small.follows_market, small.price_micro(), small.slots, small.license) == ("chat-small", "nano", True, 100_000, 5, "flag licence")
    assert (small.minimums.tokens_per_s, small.minimums.vram_gb, small.minimums.compute_capability, small.force) == (2.0, 4.0, (8, 0), True)
    assert small.minimums.bandwidth_mbps == 100.0
    assert small.minimums.source == f"{path}: [[model]] #2 (chat-small), flags for the rest"  # what node check prints as the minimums' source
    assert tiny.minimums.vram_gb is None and tiny.minimums.bandwidth_mbps is None  # one table's minimums are not another's


@pytest.mark.parametrize("text, message", [
    ("[[model]]\nid = 'tiny'\nprize = 1\n", "unknown key(s) prize"),
    ("[[model]]\nid = 'tiny'\nslots = '2'\n", "slots = '2' is not an integer"),
    ("[[model]]\nid = 'tiny'\nforce = 1\n", "force = 1 is not true or false"),
    ("[[model]]\nid = 'tiny'\nslots = true\n", "slots = True is not an integer"),
    ("[[model]]\nid = 'tiny'\nslots = 0\n", "slots must be at least 1"),
    ("[[model]]\nid = 'tiny'\nprice = 'cheap'\n", "--price/--min-price (or price/min_price in --config)"),
    ("[[model]]\nid = 'tiny'\nmin_vram_gb = -1\n", "min_vram_gb must be a positive number"),
    ("[[model]]\nid = 'tiny'\nmin_compute_capability = 'eight'\n", "min_compute_capability:"),
    ("[[model]]\nid = 'tiny'\nbackend = 'vllm'\n", "backend 'vllm' is not one of reference, openai, exllamav2"),
    ("[[model]]\nid = 'tiny'\n[[model]]\nid = 'tiny'\n", "model 'tiny' is named twice"),
    ("[[model]]\nbackend = 'reference'\n", "[[model]] #1: no id"),
    ("listen = '/ip4/0.0.0.0/tcp/4001'\n[[model]]\nid = 'tiny'\n", "unknown top-level key(s) listen"),
    ("", "no [[model]] table"),
    ("[[model]\n", "is not valid TOML"),
])
def test_a_bad_file_is_one_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        specs("--config", write(tmp_path, text))
    assert message in str(caught.value)


def test_flags_that_name_one_models_files_refuse_several_models(tmp_path):
    with pytest.raises(ConfigError, match="--model-dir names one model's files, but --model is given 2 times: use --config"):
        specs("--model", "a", "--model", "b", "--backend", "exllamav2", "--model-dir", "/models/a")
    with pytest.raises(ConfigError, match="--config and --model both name models"):
        specs("--model", "tiny", "--config", write(tmp_path, "[[model]]\nid = 'nano'\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        specs("--config", str(tmp_path / "missing.toml"))


def test_an_upstream_says_what_it_supports_per_model(tmp_path):
    path = write(tmp_path, """\
        [[model]]
        id = "llama"
        backend = "openai"
        upstream = "http://127.0.0.1:11434/v1"
        upstream_supports = ["tools", "json_schema"]

        [[model]]
        id = "plain"
        backend = "openai"
        upstream = "http://127.0.0.1:11434/v1"
        """)
    llama, plain = specs("--config", path)
    assert llama.upstream_supports.tools and llama.upstream_supports.json_schema and not llama.upstream_supports.vision
    assert plain.upstream_supports is None
    [flagged] = specs("--model", "m", "--backend", "openai", "--upstream", "http://u/v1", "--upstream-supports", "vision")
    assert flagged.upstream_supports.vision
    with pytest.raises(ConfigError, match="upstream_supports: unknown capability 'telepathy'"):
        specs("--config", write(tmp_path, "[[model]]\nid = 'm'\nupstream_supports = 'tools,telepathy'\n"))
