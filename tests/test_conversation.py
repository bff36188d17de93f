"""Conversations that keep their state: every continuation gives the tokens a fresh generation over the whole
rendered conversation gives, while prefilling only what is new."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from shared_bundles import demo_bundle
from test_chat import LFM25_MOE_TEMPLATE
from tokenizers import Tokenizer

from lfm_edge.export.exporter import export
from lfm_edge.runtime import LfmModel, statefile
from lfm_edge.runtime.conversation import ContextFull, ConversationBusy
from lfm_edge.runtime.statefile import StateFileError
from scripted_model import write_bundle
from tiny_models import build

DEMO = Path(__file__).resolve().parent.parent / "demo_model"
SYSTEM = "You are a helpful assistant who answers in one sentence."
QUESTIONS = ["What is a list?", "And a tuple?", "How do dictionaries store keys?", "Thanks, and sets?"]
# A ChatML-like template over the tiny models' word-level vocabulary (w3..wN): same shape as LFM2's.
WORD_TEMPLATE = ("{{ bos_token }}{% for m in messages %}w3 {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
                 "{% if add_generation_prompt %}w3 assistant {% endif %}")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo model exported three ways: fp32 contrib, fp32 portable, int4."""
    root = tmp_path_factory.getbasetemp()
    return {kind: demo_bundle(root, kind) for kind in ("fp32", "portable", "int4")}


def _check_continuations(model: LfmModel, conv, questions, max_new_tokens=12) -> list:
    """Each turn's tokens equal a stateless generation over the same messages; returns the stats."""
    stats = []
    for q in questions:
        done = conv.say(q, max_new_tokens=max_new_tokens)
        fresh = model.chat(conv.messages[:-1], conv.schemas or None, max_new_tokens=max_new_tokens,
                           **conv.template_context())
        assert done.tokens == fresh.tokens, f"turn {q!r} diverged from a fresh generation"
        stats.append(done.stats)
    return stats


@pytest.mark.parametrize("kind", ["fp32", "portable", "int4"])
@pytest.mark.slow
def test_turns_prefill_only_what_is_new_and_equal_fresh_generation(demo, kind):
    model = LfmModel(demo[kind], prefix_cache_bytes=0)
    conv = model.conversation(system=SYSTEM)
    stats, prepared = [], []
    for q in QUESTIONS:
        stats += _check_continuations(model, conv, [q])
        prepared.append(conv.prepared)
    assert stats[0].reused_tokens == 0
    for ready, now in zip(prepared, stats[1:], strict=False):
        # the answer's end prepared what every next turn starts with: a turn prefills only its new message
        assert now.reused_tokens == ready.state_tokens
        assert now.prefilled_tokens == now.prompt_tokens - ready.state_tokens
        assert now.prefilled_tokens < 20
    last = stats[-1]
    assert last.state_tokens == last.prompt_tokens + last.generated_tokens - 1  # the EOS is not fed
    assert len(conv.tokens) == prepared[-1].state_tokens > last.state_tokens  # and the next turn's header is in


@pytest.mark.slow
def test_an_edited_history_rolls_back_and_stays_exact(demo):
    """Editing an earlier answer (what LFM2.5's template does to past reasoning) or question: the state rolls
    back to the newest snapshot before the change, never continues from stale rows."""
    model = LfmModel(demo["fp32"], prefix_cache_bytes=0)
    conv = model.conversation(system=SYSTEM, snapshot_every=8, prefill_chunk=5)
    _check_continuations(model, conv, QUESTIONS[:3])
    answer_start = len(model.prompt_ids(conv.messages[:2]))  # state tokens before the first answer
    conv.messages[2]["content"] = conv.messages[2]["content"][:12]  # cut inside the first answer
    (stats,) = _check_continuations(model, conv, QUESTIONS[3:])
    assert answer_start - 8 < stats.reused_tokens <= answer_start + 3
    before = conv.tokens
    conv.messages[1]["content"] = "What is a linked list?"  # the first question
    (stats,) = _check_continuations(model, conv, ["Why?"])
    after = model.prompt_ids(conv.messages[:-1])
    diverge = next(i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b)
    assert diverge - 8 < stats.reused_tokens <= diverge  # the newest snapshot (every 8) before the edit


@pytest.mark.parametrize("chunk,every", [(5, 7), (7, 7), (3, 1), (512, 4)])
@pytest.mark.slow
def test_chunk_boundaries_on_and_next_to_snapshot_points(demo, chunk, every):
    model = LfmModel(demo["fp32"], prefix_cache_bytes=0)
    conv = model.conversation(system=SYSTEM, snapshot_every=every, prefill_chunk=chunk)
    prepared = set()
    for q in QUESTIONS[:2]:
        _check_continuations(model, conv, [q], max_new_tokens=6)
        prepared.add(conv.prepared.state_tokens)
    conv.messages[2]["content"] = conv.messages[2]["content"][:5]
    _check_continuations(model, conv, QUESTIONS[2:3], max_new_tokens=6)
    prepared.add(conv.prepared.state_tokens)
    boundaries = {n for s in conv.stats for n in (s.prompt_tokens, s.state_tokens)} | prepared
    assert conv.snapshots.items and all(s.length % every == 0 or s.length in boundaries
                                        for s in conv.snapshots.items)


def test_rewind_reset_and_their_errors(demo):
    model = LfmModel(demo["int4"], prefix_cache_bytes=0)
    conv = model.conversation(system=SYSTEM)
    _check_continuations(model, conv, QUESTIONS[:3], max_new_tokens=6)
    assert conv.turns == 3
    for bad in (-1, 4):
        with pytest.raises(ValueError, match=r"rewind\(.*turns 0\.\.3"):
            conv.rewind(bad)
    conv.rewind(1)
    assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]
    (stats,) = _check_continuations(model, conv, ["Something else?"], max_new_tokens=6)
    assert stats.reused_tokens > 0
    conv.reset()
    assert conv.messages == [{"role": "system", "content": SYSTEM}] and conv.tokens == []
    (stats,) = _check_continuations(model, conv, ["Hello?"], max_new_tokens=6)
    assert stats.reused_tokens == 0


@pytest.mark.parametrize("name,ops,quant", [("moe_mixed", "contrib", "fp32"), ("moe_mixed", "portable", "fp32"),
                                            ("dense_attention_last", "contrib", "int4"),
                                            ("moe_attn_first_last_nobias", "contrib", "fp32"),
                                            ("dense_conv_only_idxs", "portable", "fp32"),
                                            ("moe_attention_only", "contrib", "fp32")])
@pytest.mark.slow
def test_tiny_configs_continue_exactly(tmp_path, name, ops, quant):
    build(name, tmp_path / "ckpt")
    cfg_path = tmp_path / "ckpt" / "tokenizer_config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"chat_template": WORD_TEMPLATE}))
    model = LfmModel(export(tmp_path / "ckpt", tmp_path / "bundle", ops=ops, quant=quant).bundle)
    conv = model.conversation(system="w10 w11 w12 w13 w14 w15 w16 w17", snapshot_every=6, prefill_chunk=4)
    rng = np.random.default_rng(0)
    questions = [" ".join(f"w{i}" for i in rng.integers(20, 200, size=n)) for n in (9, 13, 5)]
    stats = _check_continuations(model, conv, questions, max_new_tokens=7)
    assert stats[-1].reused_tokens > 0
    conv.messages[2]["content"] = "w40 w41"  # an earlier answer edited
    _check_continuations(model, conv, ["w50 w51 w52"], max_new_tokens=7)
    assert conv.prepared is not None and conv.prepared.prefilled_tokens > 0  # "a"/"b" are unknown words here
    other = model.conversation(system="w10 w11 w12 w13 w14 w15 w16 w17")  # the prefix cache serves it
    (stats,) = _check_continuations(model, other, questions[:1], max_new_tokens=7)
    system = model.prompt_ids(other.messages[:1], add_generation_prompt=False)
    assert len(system) <= stats.reused_tokens < stats.prompt_tokens and model.prefix_cache.hits == 1


@pytest.mark.slow
def test_saved_conversation_continues_exactly_in_a_new_process(demo, tmp_path):
    model = LfmModel(demo["fp32"])
    conv = model.conversation(system=SYSTEM)
    _check_continuations(model, conv, QUESTIONS[:2], max_new_tokens=10)
    size = conv.save(tmp_path / "chat.safetensors")
    assert size == (tmp_path / "chat.safetensors").stat().st_size
    here = conv.say(QUESTIONS[2], max_new_tokens=10)
    code = (f"import json; from lfm_edge.runtime import LfmModel; m = LfmModel({str(demo['fp32'])!r}); "
            f"c = m.load_conversation({str(tmp_path / 'chat.safetensors')!r}); d = c.say({QUESTIONS[2]!r}, "
            "max_new_tokens=10); print(json.dumps([d.tokens, d.stats.reused_tokens, d.stats.prompt_tokens]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    tokens, reused, prompt = json.loads(out.strip().splitlines()[-1])
    assert tokens == here.tokens
    assert reused == here.stats.reused_tokens > 0 and prompt == here.stats.prompt_tokens  # as if it never stopped


def test_saved_file_is_safetensors_and_bad_files_are_refused(demo, tmp_path):
    from safetensors.numpy import load_file

    model = LfmModel(demo["fp32"])
    conv = model.conversation(system=SYSTEM)
    conv.say(QUESTIONS[0], max_new_tokens=6)
    path = tmp_path / "chat.safetensors"
    conv.save(path)
    tensors = load_file(str(path))  # the reference implementation of the format reads it
    assert {k for k in tensors if k.startswith("kv.")} and {k for k in tensors if k.startswith("conv.")}
    assert next(iter(tensors.values())).shape[0] == 1
    data = path.read_bytes()

    def refused(raw: bytes, match: str, loader=model) -> None:
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(raw)
        with pytest.raises(StateFileError, match=match) as e:
            loader.load_conversation(bad)
        assert str(bad) in str(e.value)

    refused(data[:len(data) // 2], "truncated")
    refused(data[:5], "too short")
    flipped = bytearray(data)
    flipped[-3] ^= 0x40
    refused(bytes(flipped), "checksum")
    refused(b"\x00" * 64, "header|not a saved")
    tensors, doc = statefile.read(path)
    future = tmp_path / "future.safetensors"
    statefile.write(future, tensors, dict(doc, version=2))
    refused(future.read_bytes(), "newer lfm-edge")
    refused(data, "another bundle", LfmModel(demo["int4"]))
    missing = {k: v for k, v in tensors.items() if not k.startswith("kv.")}
    statefile.write(future, missing, doc)
    refused(future.read_bytes(), "tensor 'kv.")
    with pytest.raises(StateFileError, match="cannot read"):
        model.load_conversation(tmp_path / "nope.safetensors")


@pytest.mark.slow
def test_context_limit_errors_or_drops_oldest_turns(demo, tmp_path):
    small = tmp_path / "small"
    shutil.copytree(demo["fp32"], small)
    (small / "manifest.json").unlink()  # the edited genai_config would not match it
    genai = json.loads((small / "genai_config.json").read_text())
    genai["model"]["context_length"] = 96
    (small / "genai_config.json").write_text(json.dumps(genai))
    model = LfmModel(small)
    conv = model.conversation(system="Be brief.")
    conv.say("What is a list?", max_new_tokens=20)
    with pytest.raises(ContextFull, match="exceed the context length 96.*drop_oldest"):
        conv.say("And what is a tuple in Python, compared with a list?", max_new_tokens=20)
    conv = model.conversation(system="Be brief.", context_policy="drop_oldest")
    for q in ["What is a list?", "And a tuple?", "And a set, in Python?"]:
        done = conv.say(q, max_new_tokens=20)
        fresh = model.chat(conv.messages[:-1], max_new_tokens=20)
        assert done.tokens == fresh.tokens
    assert conv.messages[0]["role"] == "system" and conv.messages[1]["content"] != "What is a list?"
    with pytest.raises(ValueError, match="context_policy"):
        model.conversation(context_policy="truncate")


@pytest.mark.slow
def test_budgets_of_zero_work_just_slower(demo):
    model = LfmModel(demo["fp32"], prefix_cache_bytes=0)
    conv = model.conversation(system=SYSTEM, max_snapshots=0)
    stats = _check_continuations(model, conv, QUESTIONS[:3], max_new_tokens=8)
    assert len(conv.snapshots.items) == 0 and model.prefix_cache.nbytes == 0
    # appending continues the live state; an edit has no snapshot to return to, so it starts from zero
    assert all(s.reused_tokens > 0 for s in stats[1:])
    conv.messages[2]["content"] = "Edited."
    (stats,) = _check_continuations(model, conv, ["Why?"], max_new_tokens=8)
    assert stats.reused_tokens == 0


@pytest.mark.slow
def test_one_send_at_a_time_and_threads_equal_serial(demo):
    model = LfmModel(demo["int4"])
    conv = model.conversation(system=SYSTEM)
    running = conv.send(QUESTIONS[0], max_new_tokens=8)
    next(running)
    with pytest.raises(ConversationBusy, match="one send at a time"):
        next(conv.send(QUESTIONS[1]))
    with pytest.raises(ConversationBusy):
        conv.save("unused.safetensors")
    list(running)

    def talk(n: int) -> list[list[int]]:
        c = model.conversation(system=SYSTEM)
        return [c.say(q, max_new_tokens=8).tokens for q in QUESTIONS[n % 2:n % 2 + 3]]

    serial = [talk(n) for n in range(4)]
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(talk, range(4))) == serial


@pytest.mark.slow
def test_tool_rounds_prefill_only_the_tool_result_and_what_follows(tmp_path):
    """A scripted model: calls a tool, then answers. The second round reuses the whole first round's state."""
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")

    def ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    def weather(city: str) -> dict:
        """Weather.

        Args:
            city: the city
        """
        return {"city": city, "sky": "sunny"}

    probe = LfmModel(write_bundle(tmp_path / "probe", DEMO, {}, tok.get_vocab_size(), eos))
    conv = probe.conversation(tools={"weather": weather})
    call = "<|tool_call_start|>[weather(city='Paris')]<|tool_call_end|>"
    first = conv.messages + [{"role": "user", "content": "Paris?"}]
    second = first + [{"role": "assistant", "content": call}, {"role": "tool", "content": json.dumps(weather("Paris"))}]
    at1, at2 = len(probe.prompt_ids(first, conv.schemas)), len(probe.prompt_ids(second, conv.schemas))
    script = {at1 + i: t for i, t in enumerate(ids(call))} | {at2 + i: t for i, t in enumerate(ids("Sunny."))}
    model = LfmModel(write_bundle(tmp_path / "scripted", DEMO, script, tok.get_vocab_size(), eos))
    conv = model.conversation(tools={"weather": weather})
    run = conv.run_tools("Paris?")
    assert run.answer.text == "Sunny." and [m["role"] for m in conv.messages] == ["user", "assistant", "tool",
                                                                                   "assistant"]
    round1, round2 = conv.stats
    assert round2.reused_tokens == round1.state_tokens  # the call's tokens re-tokenize as generated
    assert round2.prefilled_tokens == at2 - round1.state_tokens


def _lfm25_tokenizer_folder(tmp_path: Path) -> Path:
    """The demo tokenizer with LFM2.5-8B-A1B's chat template (reasoning dropped from past answers, the date in
    the system prompt)."""
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(DEMO / "tokenizer.json", folder)
    cfg = json.loads((DEMO / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": LFM25_MOE_TEMPLATE}))
    return folder


def test_lfm25_template_dropping_reasoning_reprefills_one_answer(tmp_path):
    """LFM2.5's template drops an earlier answer's <think> block: the state rolls back to that answer's start
    (the snapshot at the end of its prompt) and prefills the answer without its reasoning, nothing before."""
    folder = _lfm25_tokenizer_folder(tmp_path)
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    probe = LfmModel(write_bundle(tmp_path / "probe", folder, {}, tok.get_vocab_size(), eos))
    said = "<think>The user greets me; I greet back.</think>Hello there."
    at1 = len(probe.prompt_ids([{"role": "user", "content": "Hi"}]))
    script = {at1 + i: t for i, t in enumerate(tok.encode(said, add_special_tokens=False).ids)}
    model = LfmModel(write_bundle(tmp_path / "scripted", folder, script, tok.get_vocab_size(), eos))
    conv = model.conversation()
    first = conv.say("Hi", max_new_tokens=40)
    assert first.reasoning == "The user greets me; I greet back." and first.text == "Hello there."
    # the answer's end prepared the next turn: rolled back to the answer's start (not to zero) and prefilled
    # the answer as the template renders it from now on, without its reasoning
    assert conv.prepared.reused_tokens == at1
    stripped = model.prompt_ids([*conv.messages, {"role": "user", "content": "x"}])
    assert conv.tokens == stripped[:len(conv.tokens)] and "<think>" not in tok.decode(conv.tokens[at1:],
                                                                                       skip_special_tokens=False)
    ready = conv.prepared.state_tokens
    second = conv.say("How are you?", max_new_tokens=4)
    assert second.stats.reused_tokens == ready  # the next turn prefills its message and the answer's header only
    assert second.stats.prefilled_tokens == second.stats.prompt_tokens - ready < 16


def test_a_conversation_continued_another_day_renders_its_own_date(tmp_path):
    """LFM2.5's template writes today's date into the system prompt: the conversation keeps the date it
    started on, so continuing it the next day (or after a save) reuses its state instead of re-prefilling."""
    import time

    folder = _lfm25_tokenizer_folder(tmp_path)
    tok = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    model = LfmModel(write_bundle(tmp_path / "b", folder, {}, tok.get_vocab_size(), tok.token_to_id("<|im_end|>")))
    conv = model.conversation(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    conv.started = time.time() - 3 * 86400
    conv.say("Hi", max_new_tokens=3)
    then = time.strftime("%Y-%m-%d", time.localtime(conv.started))
    assert f"Today's date: {then}" in tok.decode(conv.tokens, skip_special_tokens=False)
    conv.save(tmp_path / "c.safetensors")
    again = model.load_conversation(tmp_path / "c.safetensors")
    assert again.started == conv.started
    assert again.say("Still there?", max_new_tokens=3).stats.reused_tokens >= len(conv.tokens) - 3


@pytest.mark.slow
def test_snapshot_ring_is_bounded_in_count_and_bytes(demo):
    model = LfmModel(demo["fp32"], prefix_cache_bytes=0)
    conv = model.conversation(system=SYSTEM, snapshot_every=4, max_snapshots=5)
    _check_continuations(model, conv, QUESTIONS[:2], max_new_tokens=8)
    assert len(conv.snapshots.items) == 5
    one = conv.snapshots.items[0].nbytes
    conv2 = model.conversation(system=SYSTEM, snapshot_every=4, snapshot_bytes=3 * one)
    _check_continuations(model, conv2, QUESTIONS[:2], max_new_tokens=8)
    assert conv2.snapshots.nbytes <= 3 * one and len(conv2.snapshots.items) == 3
    assert conv2.state_bytes > conv2.snapshots.nbytes


@pytest.mark.slow
def test_kv_buffers_double_by_need_or_stay_at_a_reservation(demo):
    model = LfmModel(demo["int4"], prefix_cache_bytes=0)
    grows = model.conversation(system=SYSTEM)
    capacities = []
    for q in QUESTIONS:
        grows.say(q, max_new_tokens=24)
        capacities.append(grows._cache.capacity)
    assert capacities[0] < capacities[-1] and all(c & (c - 1) == 0 for c in capacities)  # powers of two
    assert capacities[-1] < 2 * (grows.stats[-1].state_tokens + 24)
    reserved = model.conversation(system=SYSTEM, reserve=1024)
    _check_continuations(model, reserved, QUESTIONS, max_new_tokens=24)
    assert reserved._cache.capacity == 1024
    with pytest.raises(ValueError, match="reserve 99999"):
        model.conversation(reserve=99999)


def test_threads_share_the_prefix_cache_safely(demo):
    model = LfmModel(demo["fp32"])
    barrier = threading.Barrier(3)

    def first_turn(_: int) -> tuple[list[int], int]:
        c = model.conversation(system=SYSTEM)
        barrier.wait()
        d = c.say(QUESTIONS[0], max_new_tokens=6)
        return d.tokens, d.stats.reused_tokens

    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(first_turn, range(3)))
    fresh = model.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}],
                       max_new_tokens=6)
    assert all(tokens == fresh.tokens for tokens, _ in results)
    again = model.conversation(system=SYSTEM).say(QUESTIONS[1], max_new_tokens=6)
    assert again.stats.reused_tokens > 0 and model.prefix_cache.hits >= 1


@pytest.mark.slow
def test_lfm_chat_keeps_one_conversation_and_continues_a_session(demo, tmp_path):
    import re

    cmd = [sys.executable, "-m", "lfm_edge.runtime.cli.chat", str(demo["int4"]), "-n", "8", "--no-tools"]
    session = tmp_path / "chat.safetensors"
    first = subprocess.run(cmd + ["--session", str(session)], input="What is a list?\nAnd a tuple?\n/quit\n",
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    turns = [tuple(map(int, m)) for m in re.findall(r"state (\d+) tokens, (\d+) reused, (\d+) prefilled", first.stderr)]
    assert len(turns) == 2 and turns[0][1] == 0 and turns[1][1] > 0 and turns[1][2] < turns[1][1]
    again = subprocess.run(cmd + ["--session", str(session)], input="And a set?\n/save " + str(tmp_path / "b.st")
                           + "\n/load " + str(tmp_path / "nope") + "\n/quit\n", capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0, again.stderr
    assert "continuing" in again.stderr and "(2 turns" in again.stderr
    (turn,) = [tuple(map(int, m)) for m in re.findall(r"state (\d+) tokens, (\d+) reused, (\d+) prefilled",
                                                      again.stderr)]
    assert turn[1] > turns[1][0] - 16  # the saved state was reused, not re-prefilled
    assert "(saved 3 turns" in again.stdout and "cannot read" in again.stderr


@pytest.mark.slow
def test_the_prefix_cache_on_disk_serves_the_next_start(demo, tmp_path):
    """A new process (a new LfmModel over the same folder) finds the system prompt's state on disk; a damaged
    file is a miss, and a file of another bundle is never used."""
    first = LfmModel(demo["fp32"], prefix_cache_dir=tmp_path / "prefixes")
    first.conversation(system=SYSTEM).say(QUESTIONS[0], max_new_tokens=4)
    (saved,) = (tmp_path / "prefixes").glob("prefix-*.safetensors")
    restarted = LfmModel(demo["fp32"], prefix_cache_dir=tmp_path / "prefixes")
    conv = restarted.conversation(system=SYSTEM)
    (stats,) = _check_continuations(restarted, conv, QUESTIONS[1:2])
    assert stats.reused_tokens > 0 and restarted.prefix_cache.disk_hits == 1
    other = LfmModel(demo["int4"], prefix_cache_dir=tmp_path / "prefixes")
    assert other.conversation(system=SYSTEM).say(QUESTIONS[1], max_new_tokens=4).stats.reused_tokens == 0
    saved.write_bytes(saved.read_bytes()[:-10])  # damaged after it was indexed
    damaged = LfmModel(demo["fp32"], prefix_cache_dir=tmp_path / "prefixes")
    saved.write_bytes(saved.read_bytes()[:-10])
    (stats,) = _check_continuations(damaged, damaged.conversation(system=SYSTEM), QUESTIONS[1:2])
    assert stats.reused_tokens == 0 and damaged.prefix_cache.disk_hits == 0
    statefile.read(saved)  # the damaged file was dropped, and written again whole from the new prefill
