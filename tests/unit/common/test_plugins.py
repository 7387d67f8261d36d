"""Plugin discovery (common/plugins.py) against a fake installed distribution, and the example plugin's
word matcher (examples/ban-word-plugin)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import plugins
from common.plugins import Plugin, PluginError
from tests.fake_plugins import installed

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parents[3]
MODULE = "tgi_fake_plugin_mod"

ENTRY_POINTS = f"""\
[text_generation.backends]
fake-backend = {MODULE}:load

[text_generation.logits_processors]
fake = {MODULE}:FakeProcessor
broken = tgi_fake_plugin_missing:Nothing
half-broken = {MODULE}:NoSuchAttribute

[text_generation.router_extensions]
fake = {MODULE}:extend

[console_scripts]
not-a-plugin = {MODULE}:load
"""

MODULE_SOURCE = """\
from shard.processors.base import LogitsProcessor


class FakeProcessor(LogitsProcessor):
    def new_state(self, argument, prompt_ids):
        return None

    def apply(self, scores, states, last_ids):
        return scores


def extend(app, config):
    pass


def load(config, device, parallel):
    return "a backend"
"""


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A distribution ``tgi-fake-plugin`` 1.2.3 installed in a directory put on sys.path."""
    yield from installed(
        tmp_path, monkeypatch, "tgi-fake-plugin", "1.2.3", ENTRY_POINTS, MODULE, MODULE_SOURCE
    )


def names(found: list[Plugin], group: str) -> list[str]:
    return [p.name for p in found if p.group == group]


def test_discover_lists_the_builtins_then_the_fake_distribution(fake_distribution: Path) -> None:
    found = plugins.discover()
    assert names(found, "backends")[:3] == ["ct2", "paged", "transformers"]  # built-ins first, by name
    assert "fake-backend" in names(found, "backends")
    assert names(found, "logits_processors")[:2] == ["grammar", "watermark"]
    assert {"fake", "broken", "half-broken"} <= set(names(found, "logits_processors"))
    assert "fake" in names(found, "router_extensions")
    assert all(p.group in plugins.GROUPS for p in found)  # console_scripts are not plugins

    fake = next(p for p in found if p.group == "logits_processors" and p.name == "fake")
    assert (fake.distribution, fake.version, fake.target) == (
        "tgi-fake-plugin",
        "1.2.3",
        f"{MODULE}:FakeProcessor",
    )
    assert not fake.builtin
    watermark = next(p for p in found if p.name == "watermark")
    assert watermark.builtin and watermark.distribution.lower().replace("_", "-") == "text-generation-server"


def test_without_the_distribution_nothing_of_it_is_found() -> None:
    assert not [p for p in plugins.discover() if p.distribution == "tgi-fake-plugin"]


def test_active_is_the_builtins_plus_the_enabled_ones(fake_distribution: Path) -> None:
    assert names(plugins.active("logits_processors"), "logits_processors") == ["grammar", "watermark"]
    enabled = plugins.active("logits_processors", ("fake",))
    assert names(enabled, "logits_processors") == ["grammar", "watermark", "fake"]
    assert names(plugins.active("router_extensions", ("fake",)), "router_extensions") == ["fake"]
    assert plugins.active("router_extensions") == []
    # A name enables plugins of every group, but only of that name.
    assert names(plugins.active("backends", ("fake",)), "backends") == ["ct2", "paged", "transformers"]


def test_find_loads_a_plugin_or_names_what_is_installed(fake_distribution: Path) -> None:
    plugin = plugins.find("backends", "fake-backend")
    assert plugin.load()(None, None, None) == "a backend"
    assert plugins.find("backends", "paged").builtin
    with pytest.raises(PluginError) as e:
        plugins.find("backends", "no-such-backend")
    message = str(e.value)
    assert "no backends plugin named 'no-such-backend'" in message
    assert "paged" in message and "fake-backend" in message


def test_check_enabled_loads_every_entry_point_of_the_name(fake_distribution: Path) -> None:
    loaded = plugins.check_enabled(("fake",))
    assert sorted(p.group for p in loaded) == ["logits_processors", "router_extensions"]
    assert plugins.check_enabled(()) == []


def test_check_enabled_names_a_missing_plugin_and_the_installed_ones(fake_distribution: Path) -> None:
    with pytest.raises(PluginError) as e:
        plugins.check_enabled(("fake", "no-such-plugin"))
    message = str(e.value)
    assert message.startswith("--plugin no-such-plugin: no installed plugin has this name")
    assert "fake" in message and "broken" in message
    assert "watermark" not in message  # built-ins are always on: not listed as optional


@pytest.mark.parametrize(
    ("name", "cause"),
    [("broken", "ModuleNotFoundError"), ("half-broken", "AttributeError")],
)
def test_check_enabled_names_a_broken_plugin_its_package_and_the_cause(
    fake_distribution: Path, name: str, cause: str
) -> None:
    with pytest.raises(PluginError) as e:
        plugins.check_enabled((name,))
    message = str(e.value)
    assert f"plugin {name!r} (logits_processors, from tgi-fake-plugin 1.2.3) failed to load" in message
    assert cause in message


def test_a_plugin_uninstalled_after_discovery_fails_clearly(fake_distribution: Path) -> None:
    plugin = plugins.find("logits_processors", "fake")
    gone = Plugin(plugin.group, plugin.name, f"{MODULE}:Elsewhere", plugin.distribution, plugin.version)
    with pytest.raises(PluginError, match="no longer installed"):
        gone.load()


# The example plugin's matcher (examples/ban-word-plugin/ban_word_plugin/__init__.py), imported from
# its folder: it needs no installation.


@pytest.fixture
def ban_word_plugin(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(REPO / "examples" / "ban-word-plugin"))
    import ban_word_plugin

    return ban_word_plugin


@pytest.mark.parametrize("word", ["Paris", "abab", "aaa", "the"])
def test_the_banned_sets_are_exactly_the_tokens_that_complete_the_word(ban_word_plugin, word: str) -> None:
    texts = ["", "a", "b", "ab", "ba", "aba", "abab", "bab", "Par", "is", "PARIS!", " paris", "P", "ari", "s"]
    texts += ["t", "th", "he", "The", "e", "aa", "aaa", "x"]
    matcher = ban_word_plugin.WordMatcher.of(word)
    banned = matcher.banned(texts)
    assert len(banned) == len(word)
    for state in range(len(word)):
        brute = [i for i, text in enumerate(texts) if matcher.run(state, text)[1]]
        assert banned[state] == brute, (word, state)
    assert banned[0] == matcher.containing(texts)


def test_the_matcher_follows_the_word_over_several_tokens(ban_word_plugin) -> None:
    matcher = ban_word_plugin.WordMatcher.of("Paris")
    state = 0
    for piece in ["In ", "P", "ar"]:
        state, completed = matcher.run(state, piece)
        assert not completed
    assert state == 3
    assert matcher.run(state, "is")[1] and matcher.run(state, "IS")[1]
    assert not matcher.run(state, "k")[1]
    assert matcher.run(0, "pa")[0] == 2 and matcher.run(2, "x")[0] == 0


def test_the_word_comes_from_ban_word(ban_word_plugin, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BAN_WORD", raising=False)
    assert ban_word_plugin.ban_word() == "Paris"
    monkeypatch.setenv("BAN_WORD", " Berlin ")
    assert ban_word_plugin.ban_word() == "Berlin"
    monkeypatch.setenv("BAN_WORD", " ")
    with pytest.raises(ValueError, match="BAN_WORD is empty"):
        ban_word_plugin.ban_word()


def test_the_processor_bans_what_would_complete_the_word(
    ban_word_plugin, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from ban_word_plugin.processor import BanWord
    from tokenizers import Tokenizer

    from shard.processors.base import ProcessorArgumentError, ProcessorContext

    monkeypatch.setenv("BAN_WORD", "paris")
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    processor = BanWord()
    processor.setup(ProcessorContext(tiny_model_dir, vocab + 3, (0,), torch.device("cpu")))
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(vocab)]
    containing = {i for i, text in enumerate(texts) if "paris" in text.lower()}
    assert containing  # the tiny tokenizer's corpus says "Paris"

    rows = [processor.new_state(None, [1, 2]), processor.new_state("", [3])]
    with pytest.raises(ProcessorArgumentError, match="no argument"):
        processor.new_state("Berlin", [1])
    # Row 1 has just generated a beginning of the word ("p", "pa", ...) that a token of the tiny
    # vocabulary can complete.
    lowered = [text.lower() for text in texts]
    par = next(
        i
        for i, text in enumerate(lowered)
        if text
        and "paris".startswith(text)
        and text != "paris"
        and any(t.startswith("paris"[len(text) :]) for t in lowered)
    )
    processor.advance([rows[1]], [par])
    assert rows[1].matched == len(texts[par])

    scores = processor.apply(torch.zeros(2, vocab + 3), rows, torch.tensor([2, par]))
    banned = [set(torch.isinf(row).nonzero().flatten().tolist()) for row in scores]
    assert banned[0] == containing
    rest = "paris"[len(texts[par]) :]
    assert banned[1] == containing | {i for i, text in enumerate(texts) if text.lower().startswith(rest)}
    assert banned[1] > banned[0]

    # A token that breaks the word off starts over.
    other = next(i for i, text in enumerate(texts) if text == "x")
    processor.advance([rows[1]], [other])
    assert rows[1].matched == 0
