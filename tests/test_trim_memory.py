"""Memory pressure: LfmModel.trim_memory releases the prefix cache's RAM tier, snapshots and unused KV rows, as far
as the level says, never changes an answer, and the app's memory warning saves the chat and trims the model."""

from __future__ import annotations

import pytest
from shared_bundles import demo_bundle

from lfm_edge.mobile_app.app.pressure import MemoryWatch
from lfm_edge.runtime import LfmModel, TrimLevel, memory_warning, on_memory_warning
from lfm_edge.runtime.memory import resident_mb

SYSTEM = "You are a helpful assistant who answers in one sentence."
QUESTIONS = ["What is a list?", "And a tuple?"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return demo_bundle(tmp_path_factory.getbasetemp(), "fp32")


def _fresh(model: LfmModel, conv, max_new_tokens: int) -> list[int]:
    """The answer a stateless generation over the conversation's messages (its last answer removed) gives."""
    return model.chat(conv.messages[:-1], max_new_tokens=max_new_tokens, **conv.template_context()).tokens


def test_levels_release_in_order_and_answers_stay_exact(bundle):
    model = LfmModel(bundle, threads=1)
    conv = model.conversation(system=SYSTEM, snapshot_every=8)
    conv.say(QUESTIONS[0], max_new_tokens=24)
    prefix, snapshots = model.prefix_cache.nbytes, conv.snapshots.nbytes
    unused = conv.trimmable_bytes - snapshots
    held = prefix + conv.trimmable_bytes  # what the runtime holds beyond the weights and the live state
    assert prefix > 0 and snapshots > 0 and unused > 0
    live = conv.memory_bytes - conv.trimmable_bytes

    freed = {level: model.trim_memory(level) for level in TrimLevel}
    assert freed == {TrimLevel.MODERATE: prefix, TrimLevel.BACKGROUND: snapshots, TrimLevel.COMPLETE: unused}
    assert sum(freed.values()) >= 0.9 * held  # the goal; here all of it
    assert model.prefix_cache.nbytes == 0 and conv.trimmable_bytes == 0
    assert conv.memory_bytes == live  # the live state is untouched
    assert model.trim_memory("complete") == 0  # nothing left to release

    done = conv.say(QUESTIONS[1], max_new_tokens=24)  # the trimmed conversation continues exactly
    assert done.tokens == _fresh(model, conv, 24)
    assert done.stats.reused_tokens > 0  # the live state was kept: only the new message was prefilled


def test_strongest_level_frees_what_a_large_reserve_held_in_rss(bundle):
    """A conversation that reserved the whole context: COMPLETE gives the unused rows back to the system."""
    model = LfmModel(bundle, threads=1)
    conv = model.conversation(system=SYSTEM, reserve=model.session.context_length)
    conv.say(QUESTIONS[0], max_new_tokens=16)
    unused = conv.trimmable_bytes - conv.snapshots.nbytes
    before = resident_mb()
    freed = model.trim_memory(TrimLevel.COMPLETE)
    after = resident_mb()
    assert freed >= unused > 3 << 20
    if before.get("anonymous") is not None:  # Linux and Android: the buffers were mapped, now unmapped
        assert before["anonymous"] - after["anonymous"] >= 0.8 * unused / (1 << 20)
    done = conv.say(QUESTIONS[1], max_new_tokens=16)
    assert done.tokens == _fresh(model, conv, 16)


def test_a_generating_conversation_is_skipped_and_others_are_trimmed(bundle):
    model = LfmModel(bundle, threads=1)
    busy, idle = model.conversation(system=SYSTEM), model.conversation(system=SYSTEM)
    idle.say(QUESTIONS[0], max_new_tokens=8)
    held = idle.trimmable_bytes
    running = busy.send(QUESTIONS[0], max_new_tokens=12)
    next(running)  # the turn holds the conversation, mid-generation
    assert busy.trim_memory("complete") == 0
    assert model.trim_memory("complete") >= held > 0 and idle.trimmable_bytes == 0
    *_, done = running
    assert done.tokens == _fresh(model, busy, 12)
    del idle
    assert model.conversations == [busy]  # tracked weakly


def test_platform_levels_and_the_apps_warning(bundle, tmp_path):
    assert [TrimLevel.from_android(v) for v in (0, 5, 10, 15, 20, 40, 60, 80)] == [
        None, TrimLevel.MODERATE, TrimLevel.BACKGROUND, TrimLevel.COMPLETE, TrimLevel.MODERATE,
        TrimLevel.BACKGROUND, TrimLevel.COMPLETE, TrimLevel.COMPLETE]
    assert TrimLevel.from_ios() is TrimLevel.COMPLETE
    assert TrimLevel.of("Background") is TrimLevel.BACKGROUND and TrimLevel.of(1) is TrimLevel.MODERATE
    with pytest.raises(ValueError, match="moderate, background, complete"):
        TrimLevel.of(4)

    model = LfmModel(bundle, threads=1)
    conv = model.conversation(system=SYSTEM)
    conv.say(QUESTIONS[0], max_new_tokens=8)
    saved, notices = [], []

    def save() -> bool:
        saved.append(conv.save(tmp_path / "chat.safetensors"))
        return True

    watch = MemoryWatch(lambda: model, save, notices.append)
    other = on_memory_warning(lambda level: 7)
    try:
        first = memory_warning("background")  # what the platform glue calls (a desktop has no such callback)
        second = memory_warning(TrimLevel.COMPLETE)
    finally:
        watch.close()
        other()
    assert len(saved) == 1 and (tmp_path / "chat.safetensors").is_file()  # saved on the first warning only
    assert first > 7 and second > 7 and watch.freed == first + second - 14
    assert notices[0].startswith("Low memory (background): conversation saved; released")
    assert notices[1].startswith("Low memory (complete): released")
    assert memory_warning("complete") == 0  # unregistered
    restored = model.load_conversation(tmp_path / "chat.safetensors")
    assert restored.messages == conv.messages
