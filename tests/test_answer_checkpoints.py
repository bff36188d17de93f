"""Answers survive a kill: with autosave, a conversation checkpoints its state into a journal beside its file
while it answers; after SIGKILL at any moment the next load shows the answer so far, marked partial, and
continue_answer finishes it with exactly the tokens an uninterrupted greedy run gives. The journal is never
torn: a record cut short or garbled at the end is ignored, damage before the end is a StateFileError."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from shared_bundles import demo_bundle

from lfm_edge.runtime import LfmModel, StateFileError, journal, persist

SYSTEM = "You are brief."
# questions the demo model answers at length (to "What is a list?" after "You are brief." it answers 9 tokens, no text)
QUESTIONS = ["Tell me about lists.", "And tuples?"]
MAX_NEW = 40

CHILD = textwrap.dedent("""
    import sys
    from lfm_edge.runtime import LfmModel
    bundle, path, every = sys.argv[1], sys.argv[2], int(sys.argv[3])
    conv = LfmModel(bundle, threads=1).conversation(system={system!r})
    conv.autosave(path, every_tokens=every)
    print("ready", flush=True)
    for question in {questions!r}:
        for event in conv.send(question, max_new_tokens={max_new}):
            print("event", flush=True)
    print("done", flush=True)
""").format(system=SYSTEM, questions=QUESTIONS, max_new=MAX_NEW)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return demo_bundle(tmp_path_factory.getbasetemp(), "fp32")


@pytest.fixture(scope="module")
def reference(bundle):
    """The uninterrupted run: each answer's tokens, and the messages after both turns."""
    conv = LfmModel(bundle, threads=1).conversation(system=SYSTEM)
    answers = [conv.say(q, max_new_tokens=MAX_NEW).tokens for q in QUESTIONS]
    return answers, conv.messages


def _finish(model: LfmModel, path: Path, reference) -> str:
    """Load what a killed process left and finish its interrupted work; every answer must be the reference's.
    Returns what was found: "nothing", "question", "partial" or "answer"."""
    answers, messages = reference
    if not path.exists():
        return "nothing"
    conv = model.load_conversation(path)
    found = conv.messages
    if conv.partial is not None:
        assert found[-1]["partial"] is True and found[-1]["role"] == "assistant"
        assert found[:-1] == messages[:len(found) - 1]
        turn = sum(m["role"] == "user" for m in found) - 1
        *_, done = conv.continue_answer()
        assert done.tokens == answers[turn], f"the continuation of answer {turn} differs"
        assert conv.messages == messages[:len(found)]
        return "partial"
    assert found == messages[:len(found)]
    if found[-1]["role"] == "user":  # killed before the answer's first checkpoint
        done = conv.say(None, max_new_tokens=MAX_NEW)
        assert done.tokens == answers[sum(m["role"] == "user" for m in found) - 1]
        return "question"
    return "answer"


@pytest.mark.slow
def test_killed_at_random_points_continues_exactly(bundle, reference, tmp_path):
    model = LfmModel(bundle, threads=1)
    rng = random.Random(29)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    seen = []
    # kill after so many streamed events (a few landing inside the checkpoint writes: one per token), plus jitter
    for n, target in enumerate([-1, 0, 3, 17, 30, 45, 58, 70, rng.randrange(80), 10_000]):
        path = tmp_path / f"kill-{n}" / "chat.safetensors"
        path.parent.mkdir()
        child = subprocess.Popen([sys.executable, str(script), str(bundle), str(path), str(1 + n % 3)],
                                 stdout=subprocess.PIPE, text=True, env=env)
        events = 0
        for line in child.stdout:
            events += line.startswith("event")
            if line.startswith("ready") and target < 0 or line.startswith("event") and events >= target:
                break  # (-1: as soon as the model is loaded; 10_000: never, the child finishes)
        for _ in range(rng.randrange(2000)):  # a few microseconds to a millisecond more
            pass
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        try:
            seen.append(_finish(model, path, reference))
        except StateFileError:  # a refusal is allowed, never a torn state nor another exception
            seen.append("refused")
    print("kills:", seen)
    assert seen.count("partial") >= 3 and seen[-1] == "answer", seen
    assert "refused" not in seen, seen


def _interrupted(model: LfmModel, path: Path, every: int, events: int):
    """A conversation that answered the first question and stopped mid-way through the second (its generator
    abandoned: what a kill leaves in the file, minus the process's death)."""
    conv = model.conversation(system=SYSTEM)
    conv.autosave(path, every_tokens=every)
    conv.say(QUESTIONS[0], max_new_tokens=MAX_NEW)
    running = conv.send(QUESTIONS[1], max_new_tokens=MAX_NEW)
    for _ in range(events):
        next(running)
    return conv, running


def _record_ends(path: Path) -> list[int]:
    """Byte offsets where each of the journal's records ends."""
    raw = path.read_bytes()
    (n,) = __import__("struct").unpack_from("<I", raw, 4)
    ends, offset = [], 8 + n + 32
    while offset < len(raw):
        _, text, data = journal.RECORD_PREFIX.unpack_from(raw, offset)
        offset += journal.RECORD_PREFIX.size + text + data + 32
        ends.append(offset)
    return ends


def test_a_torn_or_garbled_last_record_is_ignored_and_damage_before_it_refused(bundle, reference, tmp_path):
    model = LfmModel(bundle, threads=1)
    path = tmp_path / "live" / "chat.safetensors"
    path.parent.mkdir()
    _interrupted(model, path, every=4, events=20)
    jpath = journal.path_for(path)
    raw, ends = jpath.read_bytes(), _record_ends(jpath)
    assert len(ends) >= 4 and ends[-1] == len(raw)
    rng = random.Random(4)
    cuts = sorted({ends[-2], ends[-2] + 1, ends[-2] + 16, len(raw) - 33, len(raw) - 1,
                   *(rng.randrange(ends[-2], len(raw)) for _ in range(6))})
    for cut in cuts:  # the last write, cut anywhere: the state is the record before it
        folder = tmp_path / f"cut-{cut}"
        folder.mkdir()
        shutil.copy(path, folder / path.name)
        journal.path_for(folder / path.name).write_bytes(raw[:cut])
        assert _finish(model, folder / path.name, reference) == "partial"
    garbled = bytearray(raw)
    garbled[ends[-2] + 40] ^= 1  # inside the last record: as if its write was torn
    journal.path_for(path).write_bytes(bytes(garbled))
    assert _finish(model, path, reference) == "partial"
    shutil.rmtree(path.parent)
    path.parent.mkdir()
    _interrupted(model, path, every=4, events=20)
    garbled = bytearray(jpath.read_bytes())
    garbled[_record_ends(jpath)[-3] + 40] ^= 1  # a record with more after it: damage
    jpath.write_bytes(bytes(garbled))
    with pytest.raises(StateFileError, match=r"chat.safetensors.journal: record \d+: does not match its checksum"):
        model.load_conversation(path)


def test_the_file_follows_saves_and_a_partial_answer_survives_a_plain_save(bundle, reference, tmp_path):
    model = LfmModel(bundle, threads=1)
    path = tmp_path / "chat.safetensors"
    conv, running = _interrupted(model, path, every=2, events=9)
    loaded = model.load_conversation(path)
    assert loaded.partial is not None and loaded.messages[-1]["partial"]
    # the app saves on pause: the partial answer and what continues it are in the plain file too
    loaded.save(tmp_path / "plain.safetensors")
    again = model.load_conversation(tmp_path / "plain.safetensors")
    assert again.partial == loaded.partial and again.messages == loaded.messages
    assert _finish(model, tmp_path / "plain.safetensors", reference) == "partial"
    running.close()
    conv.save(path)  # a save to the autosaved path starts a new journal for the new file
    assert journal.path_for(path).stat().st_size < 200
    assert model.load_conversation(path).messages == conv.messages
    other = model.conversation(system=SYSTEM)
    other.say("Hello", max_new_tokens=4)
    old_journal = journal.path_for(path).read_bytes()
    conv.say("Go on", max_new_tokens=6)  # appends to the journal
    other.save(path)  # another conversation's save: the journal now belongs to no file here
    assert journal.path_for(path).read_bytes() != old_journal
    assert model.load_conversation(path).messages == other.messages  # a stale journal is ignored


def test_answer_fields_are_checked(tmp_path):
    good = {"prompt_length": 10, "pending": 5, "max_new_tokens": 20, "stop": [], "reasoning_budget": None,
            "allow_special_tokens": False}
    assert persist.check_answer("f", good, 15, 100, [7]) == good
    for change, words in [({"pending": 7}, "pending 7"), ({"prompt_length": 16}, "prompt_length 16"),
                          ({"max_new_tokens": 6}, "max_new_tokens 6"), ({"stop": [1]}, "stop"),
                          ({"pending": True}, "pending has the wrong type"), ({"extra": 1}, "must be an object")]:
        with pytest.raises(StateFileError, match=words):
            persist.check_answer("f: field 'answer'", good | change, 15, 100, [7])


def test_a_loaded_conversation_keeps_appending_to_its_journal(bundle, reference, tmp_path):
    """Killed twice in one answer: the second process continues the first one's journal (the file itself is
    not rewritten) and the third still finishes the answer exactly."""
    model = LfmModel(bundle, threads=1)
    path = tmp_path / "chat.safetensors"
    _, running = _interrupted(model, path, every=2, events=6)
    running.close()
    base = path.stat()
    first = model.load_conversation(path)
    first.autosave(path, every_tokens=2)
    cut = len(first.tokens)
    continuing = first.continue_answer()
    for _ in range(10):
        next(continuing)
    assert path.stat().st_mtime_ns == base.st_mtime_ns and path.stat().st_ino == base.st_ino
    second = model.load_conversation(path)
    assert second.partial is not None and len(second.tokens) >= cut + 8
    assert _finish(model, path, reference) == "partial"
    continuing.close()


def test_the_app_shows_a_cut_answer_and_finishes_it(bundle, reference, tmp_path):
    """The chat controller restores the file a killed app left: the answer so far, marked; Send with no text
    finishes it into the same bubble, exactly."""
    from test_mobile_app_logic import UiQueue

    from lfm_edge.mobile_app.app.transcript import IDLE, ChatController

    model = LfmModel(bundle, threads=1)
    path = tmp_path / "chat.safetensors"
    _interrupted(model, path, every=2, events=7)[1].close()
    ui = UiQueue()
    chat = ChatController(ui.post, tools={}, max_new_tokens=MAX_NEW, system=SYSTEM)
    chat.autosave = path
    chat.set_model(model)
    assert chat.restore(path) is None
    bubble = chat.items[-1]
    assert bubble.role == "assistant" and bubble.footer.startswith("interrupted") and bubble.text
    assert chat.send("") is None
    ui.run_until(lambda: chat.state == IDLE and chat.wait(0))
    assert chat.items[-1] is bubble and not bubble.footer.startswith("interrupted")
    assert chat.conversation.messages == reference[1] and chat.conversation.partial is None
    assert chat.send("") == "nothing to send"


def test_checkpoints_by_time_and_a_rewound_partial_answer(bundle, reference, tmp_path):
    model = LfmModel(bundle, threads=1)
    path = tmp_path / "chat.safetensors"
    conv = model.conversation(system=SYSTEM)
    conv.autosave(path, every_tokens=10_000, every_seconds=1e-9)  # every token, by the clock
    running = conv.send(QUESTIONS[0], max_new_tokens=MAX_NEW)
    for _ in range(6):
        next(running)
    loaded = model.load_conversation(path)
    assert len(loaded.tokens) - loaded.partial["prompt_length"] == 5  # a checkpoint at each of tokens 1..6
    assert _finish(model, path, reference) == "partial"
    running.close()
    loaded.rewind(0)
    assert loaded.partial is None and loaded.messages == [{"role": "system", "content": SYSTEM}]
    with pytest.raises(ValueError, match="no partial answer"):
        next(loaded.continue_answer())


@pytest.mark.slow
def test_lifecycle_study_kills_an_answer_and_times_the_next_start(tmp_path_factory):
    """device_bench/studies/lifecycle.py --resume: a real SIGKILL of a child mid-answer, then a fresh process that
    continues the partial answer; what the kill lost is within one checkpoint interval."""
    from lfm_edge.device_bench.studies import lifecycle

    bundle = demo_bundle(tmp_path_factory.getbasetemp(), "int4")
    # a short filler: the demo model answers a question after a long one with whitespace, which streams no pieces
    result = lifecycle.resume(str(bundle), context=60, every=4, kill_after=12, threads=1)
    assert result["killed_after_pieces"] >= 12
    assert 12 - 4 <= result["answer_tokens_kept"] and result["pieces_lost_at_most"] <= 4
    marks = result["marks_s"]
    assert list(marks) == ["python started", "model loaded", "conversation loaded", "first new token"]
    assert 0 < marks["python started"] < marks["model loaded"] < marks["conversation loaded"] < marks["first new token"]
    restore = marks["first new token"] - marks["model loaded"]
    assert result["restore_to_first_token_s"] == pytest.approx(restore, abs=2e-3)
