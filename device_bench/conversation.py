"""`lfm-bench conversation BUNDLE --script TURNS:USER:ANSWER`: time to first token per turn of a scripted conversation,
with the state kept (runtime/conversation.py), re-prefilled (a stateless LfmModel.chat over the whole history)
and in llama.cpp (llama-cpp-python's own prefix reuse, in a process of its own), turn by turn in rotating order;
then a long conversation saved, restored and continued against re-prefilling it; then the state's memory.

The script is made of tokens every system sees alike: user messages of USER single-token words, and answers of
exactly ANSWER tokens that each system is made to produce (the logits of each step are replaced by a one-hot of
the scripted token after the model ran: the work is the model's, only the choice is forced, and no answer ends
early at an end-of-turn token). With `reasoning` R, each answer opens with `<think>`, R-2 words and `</think>`:
LFM2.5's template drops that block once a newer user turn follows, so the next turn re-prefills from the answer's
start, as with the real checkpoint. A bundle exported from random weights has no tokenizer: it is given a
word-level one over its vocabulary (ids w0..wN, the special tokens at the config's ids) and LFM2.5-8B-A1B's
template (lfm25_template.py). llama.cpp is fed the very token ids our template renders for each turn.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime import LfmModel
from ..runtime.backends.python import LfmSession  # onnxruntime's Python binding: a desktop benchmark
from ..runtime.hugepages import reexec_with_hugepages
from ..runtime.memory import peak_rss_mb
from ..runtime.sampling import Sampling
from ..runtime.templates import ChatTemplate
from . import common, roofline
from .lfm25_template import LFM25_MOE_TEMPLATE
from .measure import Metric, Sample, cpu_wait_seconds
from .peers.llama_cpp import ConversationPeer
from .report import write_conversation_markdown, write_conversation_plot

SYSTEMS = ("kept", "reprefilled", "llama.cpp")


def parse_spec(text: str) -> tuple[int, int, int]:
    """'TURNS:USER:ANSWER' -> (turns, user tokens, answer tokens)."""
    parts = text.split(":")
    try:
        turns, user, answer = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"--script {text!r}: expected TURNS:USER:ANSWER, e.g. 10:400:128") from None
    if turns < 1 or user < 1 or answer < 1:
        raise ValueError(f"--script {text!r}: each of TURNS, USER, ANSWER must be >= 1")
    return turns, user, answer


def check_args(prog: str, args: Any) -> int:
    """0 when `--script`, the bundle and the peer's GGUF are usable; else 2, with one line saying why."""
    try:
        parse_spec(args.script)
    except ValueError as e:
        return common.fail(prog, str(e))
    return common.check(prog, Path(args.bundle), args.peer, args.gguf)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --- a tokenizer and template for bundles without one ---------------------------------------------------------

SPECIAL_EXTRA = ("<|im_start|>", "<think>", "</think>", "<|tool_call_start|>", "<|tool_call_end|>", "<unk>")
ROLE_WORDS = ("system", "user", "assistant", "tool")


def synthetic_tokenizer(vocab_size: int, bos: int, eos: int, pad: int) -> Any:
    """A word-level tokenizer over the whole vocabulary: the config's special ids, the chat markers at free ids
    from the top, the role words, and w{id} for every other id; split on whitespace, decoded with spaces."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {"<|startoftext|>": bos, "<|im_end|>": eos, "<|pad|>": pad}
    taken = set(vocab.values())
    free = (i for i in range(vocab_size - 1, -1, -1) if i not in taken)
    for name in (*SPECIAL_EXTRA, *ROLE_WORDS):
        vocab[name] = next(free)
    taken = set(vocab.values())
    vocab.update({f"w{i}": i for i in range(vocab_size) if i not in taken})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    specials = ("<|startoftext|>", "<|im_end|>", "<|pad|>", *SPECIAL_EXTRA)
    tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    return tokenizer


def chat_folder(bundle: Path, scratch: Path) -> tuple[Path, dict]:
    """The folder LfmModel reads the tokenizer and template from: the bundle when it has both, else a view of
    it (symlinks) with the synthetic tokenizer and LFM2.5-8B-A1B's template. Also says which it is."""

    try:
        if (bundle / "tokenizer.json").is_file():
            ChatTemplate.from_folder(bundle)
            return bundle, {"tokenizer": "the bundle's", "template": "the bundle's"}
    except (ValueError, OSError):
        pass
    config = json.loads((bundle / "config.json").read_text())
    view = common.link_view(bundle, scratch / "chat-view", skip={"tokenizer.json", "tokenizer_config.json",
                                                                 "chat_template.jinja"})
    eos = config["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    tokenizer = synthetic_tokenizer(int(config["vocab_size"]), int(config["bos_token_id"]), int(eos),
                                    int(config.get("pad_token_id", 0)))
    tokenizer.save(str(view / "tokenizer.json"))
    (view / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>",
        "chat_template": LFM25_MOE_TEMPLATE}))
    return view, {"tokenizer": "synthetic word-level (the bundle has none)", "template": "lfm2.5-8b-a1b (built in)"}


# --- forcing the scripted answer ------------------------------------------------------------------------------

class ScriptedSession:
    """A session whose caches run every step for real, then hand back a one-hot of the scripted token for each
    position past `prompt_len` (so any sampler picks it). Records when the first answer token's logits came
    back, and this process's CPU wait until then."""

    def __init__(self, session: Any):
        self.session = session
        self.answer: list[int] = []
        self.prompt_len = 0
        self.first_at = 0.0
        self.wait_at_first = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)

    def expect(self, prompt_len: int, answer: Sequence[int]) -> None:
        self.prompt_len, self.answer, self.first_at = prompt_len, list(answer), 0.0

    def new_cache(self, batch: int, max_length: int) -> _ScriptedCache:
        return _ScriptedCache(self.session.new_cache(batch, max_length), self)


class _ScriptedCache:
    def __init__(self, cache: Any, owner: ScriptedSession):
        self._cache, self._owner = cache, owner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)

    def step(self, input_ids: np.ndarray, mask: np.ndarray | None = None, **options: Any) -> np.ndarray:
        logits = self._cache.step(input_ids, mask, **options)  # e.g. last=1: the rows a step returns
        owner = self._owner
        at = self._cache.length - owner.prompt_len  # index of the answer token these logits choose
        if not owner.prompt_len or not 0 <= at < len(owner.answer):
            return logits
        if at == 0:
            owner.first_at = time.perf_counter()
            owner.wait_at_first = cpu_wait_seconds()
        forced = np.full((logits.shape[0], 1, logits.shape[-1]), -1e4, dtype=np.float32)
        forced[:, :, owner.answer[at]] = 0.0
        return forced


# --- the script -----------------------------------------------------------------------------------------------

@dataclass
class Script:
    users: list[str]  # each user message's text
    user_tokens: list[int]  # tokens of each user message by itself
    answers: list[list[int]]  # each answer's forced token ids
    filler: list[int]  # single-token words, for extra messages


def word_ids(tokenizer: Any, vocab_size: int, banned: set[int], rng: np.random.Generator,
             want: int = 4000) -> tuple[list[int], list[int]]:
    """Ids of plain words that are one token after a space and decode back to themselves, and `lead`, what comes
    before each: nothing when the space is part of the word's token (`Ġword`), or the space's own token in a
    tokenizer that keeps spaces apart from words (the demo model's: `Ġ`, `word`)."""
    space = tokenizer.encode(" ", add_special_tokens=False).ids
    for lead in ([], space if len(space) == 1 else None):
        if lead is None:
            break
        out = []
        for t in rng.permutation(vocab_size)[:min(vocab_size, 40 * want)]:
            t = int(t)
            if t in banned:
                continue
            w = tokenizer.decode([t], skip_special_tokens=False).strip()
            alone = tokenizer.encode(" " + w, add_special_tokens=False).ids
            if len(w) >= 2 and w.isascii() and w.isalnum() and alone == [*lead, t]:
                out.append(t)
                if len(out) >= want:
                    break
        if len(out) >= 16:
            return out, lead
    raise ValueError(f"the tokenizer has only {len(out)} single-token words: no script can be made")


def make_script(model: Any, turns: int, user: int, answer: int, reasoning: int, seed: int = 0) -> Script:
    tokenizer, session = model.tokenizer, model.session
    rng = np.random.default_rng(seed)
    banned = set(session.eos_token_ids) | {session.pad_token_id}
    banned |= set(tokenizer.get_added_tokens_decoder())
    pool, lead = word_ids(tokenizer, session.vocab_size, banned, rng)

    def spoken(ids: list[int]) -> list[int]:  # the words' tokens, each after its space token if it has one
        return [x for t in ids for x in (*lead, t)]

    think, end_think = tokenizer.token_to_id("<think>"), tokenizer.token_to_id("</think>")
    if reasoning and (think is None or end_think is None):
        raise ValueError("--reasoning needs <think> and </think> tokens in the tokenizer")
    if reasoning and not 2 <= reasoning < answer:
        raise ValueError(f"--reasoning {reasoning}: expected 2 <= R < ANSWER ({answer})")
    users, counts, answers = [], [], []
    for _ in range(turns):
        text = tokenizer.decode(spoken(rng.choice(pool, user).tolist()), skip_special_tokens=False).strip()
        users.append(text)
        counts.append(len(tokenizer.encode(text, add_special_tokens=False).ids))
        words = spoken(rng.choice(pool, answer).tolist())[:answer]
        answers.append([think, *words[:reasoning - 2], end_think, *words[reasoning:]] if reasoning else words)
    return Script(users, counts, answers, pool)


# --- the measurements -----------------------------------------------------------------------------------------

def _sample(ttft: float, wait: float, threads: int) -> Sample:
    return Sample(ttft, ttft, wait / max(ttft * threads, 1e-9), os.getloadavg()[0])


def _ours(model: Any, scripted: ScriptedSession, messages: list[dict], answer: list[int], threads: int,
          send: Callable[[], Any]) -> tuple[Sample, Any]:
    prompt = model.prompt_ids(messages)
    scripted.expect(len(prompt), answer)
    wait0, start = cpu_wait_seconds(), time.perf_counter()
    done = send()
    if not scripted.first_at:
        raise RuntimeError("the scripted answer's first token was never reached")
    return _sample(scripted.first_at - start, scripted.wait_at_first - wait0, threads), done


def run_turns(model: Any, scripted: ScriptedSession, script: Script, answer_tokens: int, rounds: int, threads: int,
              peer: ConversationPeer | None, progress: Callable[[str], None] = lambda m: None,
              conversation_options: dict | None = None, compare: set[int] | None = None,
              ) -> tuple[list[dict], list[Any]]:
    """Each round a fresh conversation of len(script.users) turns; at each turn the systems run in rotating order.
    The kept conversation runs every turn (its state carries over); the re-prefilled one and llama.cpp only at
    the turns in `compare` (1-based; default all), their cost growing with the history. One short warm-up
    generation on each system first. Returns one dict per turn and each round's kept Conversation."""

    greedy = Sampling()
    turns = len(script.users)
    compare = set(range(1, turns + 1)) if compare is None else compare
    systems = [s for s in SYSTEMS if s != "llama.cpp" or peer is not None]
    per_turn = [{"turn": k + 1, "user_tokens": script.user_tokens[k], **{s: Metric("s") for s in systems},
                 "detail": {s: [] for s in systems}} for k in range(turns)]
    warm = [{"role": "user", "content": model.tokenizer.decode(script.filler[:32]).strip()}]
    _ours(model, scripted, warm, script.answers[0], threads,
          lambda: model.chat(warm, max_new_tokens=2, sampling=greedy))
    if peer is not None:
        peer.turn(model.prompt_ids(warm), script.answers[0][:2], reset=True)
    conversations = []
    for r in range(rounds):
        conv = model.conversation(**(conversation_options or {}))
        history: list[dict] = []
        llama_fresh = True
        for k in range(turns):
            user = {"role": "user", "content": script.users[k]}
            answer = script.answers[k]
            prompt = model.prompt_ids([*history, user])
            present = [s for s in systems if s == "kept" or k + 1 in compare]
            shift = (r * turns + k) % len(present)
            order = present[shift:] + present[:shift]
            raw = None
            for system in order:
                if system == "kept":
                    sample, done = _ours(model, scripted, [*conv.messages, user], answer, threads,
                                         lambda c=conv, u=script.users[k]: c.say(u, max_new_tokens=answer_tokens,
                                                                                 sampling=greedy))
                    raw = done.raw
                    s = done.stats
                    extra = {"reused": s.reused_tokens, "prefilled": s.prefilled_tokens, "prompt": s.prompt_tokens,
                             "state_tokens": s.state_tokens, "generated": s.generated_tokens,
                             "ttft_generation": s.time_to_first_token, "as_scripted": done.tokens == answer,
                             "snapshots_bytes": conv.snapshots.nbytes, "state_bytes": conv.state_bytes}
                elif system == "reprefilled":
                    # only the first token is generated: a fresh state's time to it does not depend on the rest
                    sample, done = _ours(model, scripted, [*history, user], answer, threads,
                                         lambda m=[*history, user]: model.chat(m, max_new_tokens=1, sampling=greedy))
                    s = done.stats
                    extra = {"reused": s.reused_tokens, "prefilled": s.prefilled_tokens, "prompt": s.prompt_tokens,
                             "ttft_generation": s.time_to_first_token}
                else:
                    got = peer.turn(prompt, answer, reset=llama_fresh)
                    llama_fresh = False
                    sample = Sample(got["ttft"], got["ttft"], got["cpu_wait_share"], got["loadavg"][0])
                    extra = {"reused": len(prompt) - got["prefilled"], "prefilled": got["prefilled"],
                             "prompt": len(prompt), "as_scripted": got["as_scripted"]}
                per_turn[k][system].samples.append(sample)
                per_turn[k]["detail"][system].append(extra | {"round": r + 1, "loadavg": loadavg(),
                                                              "order": order.index(system)})
            history += [user, {"role": "assistant", "content": raw}]
            if conv.messages != history:
                raise RuntimeError(f"turn {k + 1}: the kept conversation's messages differ from the script's history")
            line = ", ".join(f"{s} {per_turn[k][s].samples[-1].value:.2f}s" for s in order)
            progress(f"round {r + 1}/{rounds} turn {k + 1}/{turns} ({len(prompt)} tokens): {line}; "
                     f"load {loadavg()[0]}")
        conversations.append(conv)
    out = []
    for t in per_turn:
        row = {"turn": t["turn"], "user_tokens": t["user_tokens"],
               "prompt_tokens": t["detail"]["kept"][0]["prompt"]}
        for s in systems:
            if t[s].samples:
                row[s] = t[s].summary() | {"detail": t["detail"][s]}
        out.append(row)
    return out, conversations


def run_restore(model: Any, scripted: ScriptedSession, script: Script, tokens: int, follow: int, answer_tokens: int,
                runs: int, threads: int, folder: Path, progress: Callable[[str], None] = lambda m: None) -> dict:
    """A conversation of at least `tokens` tokens, saved; then, alternately, restored from the file and continued
    with a `follow`-token user message, and the same history re-prefilled: time to the first new token of each."""

    greedy = Sampling()
    rng = np.random.default_rng(1)
    tok = model.tokenizer
    history: list[dict] = []
    k = 0
    while len(model.prompt_ids(history or [{"role": "user", "content": ""}])) < tokens:
        history += [{"role": "user", "content": script.users[k % len(script.users)]},
                    {"role": "assistant", "content": tok.decode(script.answers[k % len(script.answers)],
                                                                skip_special_tokens=False)}]
        k += 1
    last = {"role": "user", "content": tok.decode(rng.choice(script.filler, follow).tolist()).strip()}
    one = [int(script.filler[0])]
    conv = model.conversation()
    conv.messages = history[:-1]  # ends with a user message: the model answers it
    progress(f"restore: building a {len(model.prompt_ids(conv.messages))}-token conversation (one prefill)")
    build, done = _ours(model, scripted, conv.messages, script.answers[0], threads,
                        lambda: conv.say(None, max_new_tokens=answer_tokens, sampling=greedy))
    path = folder / "conversation.safetensors"
    t0 = time.perf_counter()
    size = conv.save(path)
    save_s = time.perf_counter() - t0
    state_tokens = len(conv.tokens)
    metrics = {"load": Metric("s"), "restored_ttft": Metric("s"), "restored_total": Metric("s"),
               "reprefilled_ttft": Metric("s")}
    loads = []
    for r in range(runs + 1):
        for system in (("restored", "reprefilled") if r % 2 else ("reprefilled", "restored")):
            if system == "restored":
                wait0, start = cpu_wait_seconds(), time.perf_counter()
                restored = model.load_conversation(path)
                load_s = time.perf_counter() - start
                wait_load = cpu_wait_seconds() - wait0
                sample, again = _ours(model, scripted, [*restored.messages, last], one, threads,
                                      lambda c=restored: c.say(last["content"], max_new_tokens=1, sampling=greedy))
                reused = again.stats.reused_tokens
                total = load_s + sample.value
                if r:
                    metrics["load"].samples.append(_sample(load_s, wait_load, threads))
                    metrics["restored_ttft"].samples.append(sample)
                    metrics["restored_total"].samples.append(
                        Sample(total, total, (sample.cpu_wait_share * sample.value + wait_load / threads) / total,
                               sample.loadavg))
                    loads.append({"reused": reused, "prefilled": again.stats.prefilled_tokens, "loadavg": loadavg()})
                progress(f"restore {r}/{runs}{' (warm-up)' if not r else ''}: load {load_s:.2f}s + first token "
                         f"{sample.value:.2f}s (reused {reused}); load {loadavg()[0]}")
                del restored, again
            elif r:  # the re-prefill's warm-up is the build above
                messages = [*conv.messages, last]
                sample, _ = _ours(model, scripted, messages, one, threads,
                                  lambda m=messages: model.chat(m, max_new_tokens=1, sampling=greedy))
                metrics["reprefilled_ttft"].samples.append(sample)
                progress(f"re-prefill {r}/{runs}: {sample.value:.2f}s; load {loadavg()[0]}")
    summary = {k: m.summary() for k, m in metrics.items() if m.samples}
    restored = summary["restored_total"]["median"]
    return {"state_tokens": state_tokens, "follow_tokens": follow, "file_bytes": size, "save_s": save_s,
            "build_ttft_s": build.value, "snapshots": len(conv.snapshots.items),
            "snapshots_bytes": conv.snapshots.nbytes, "state_bytes": conv.state_bytes, "runs": runs,
            "metrics": summary, "restored_detail": loads,
            "speedup": summary["reprefilled_ttft"]["median"] / restored if "reprefilled_ttft" in summary else None}


def run(bundle: Path, spec: str, threads: int = 2, rounds: int = 2, reasoning: int = 0, gguf: str | None = None,
        restore_tokens: int = 0, restore_follow: int = 16, restore_runs: int = 2, llama_rollback: int = 0,
        compare_turns: Sequence[int] | None = None,
        progress: Callable[[str], None] = lambda m: None, seed: int = 0) -> dict:
    """The whole conversation benchmark; returns bench.json's "conversation" section."""

    turns, user, answer = parse_spec(spec)
    with tempfile.TemporaryDirectory(prefix="lfm-convbench-") as tmp:
        folder, source = chat_folder(bundle, Path(tmp))
        progress("loading the bundle")
        t0 = time.perf_counter()
        scripted = ScriptedSession(LfmSession(bundle, threads=threads, verify="none"))
        model = LfmModel(folder, session=scripted)
        load_s = time.perf_counter() - t0
        script = make_script(model, turns, user, answer, reasoning, seed)
        longest = len(model.prompt_ids([m for k in range(turns) for m in (
            {"role": "user", "content": script.users[k]},
            {"role": "assistant", "content": model.tokenizer.decode(script.answers[k], skip_special_tokens=False)})]))
        peer, peer_info = None, None
        if gguf:
            progress("llama.cpp: loading the GGUF in its own process")
            peer = ConversationPeer(gguf, threads, n_ctx=longest + answer + 64, n_rs_seq=llama_rollback)
            peer_info = dict(peer.info, gguf=str(gguf))
        try:
            compare = None if compare_turns is None else {1, turns} | set(compare_turns)  # first and last always
            per_turn, conversations = run_turns(model, scripted, script, answer, rounds, threads, peer, progress,
                                                compare=compare)
        finally:
            if peer is not None:
                peer_info["peak_rss_mb"] = peer.peak_rss_mb()
                peer.close()
        restore = None
        if restore_tokens:
            restore = run_restore(model, scripted, script, restore_tokens, restore_follow, answer, restore_runs,
                                  threads, Path(tmp), progress)
    conv = conversations[-1]
    weights = roofline.bytes_per_token(bundle).stored
    budget = model.prefix_cache.max_bytes + conv.snapshots.max_bytes
    memory = {"weights_bytes": weights, "snapshots_bytes": max(c.snapshots.nbytes for c in conversations),
              "snapshots": len(conv.snapshots.items), "snapshot_bytes_limit": conv.snapshots.max_bytes,
              "one_snapshot_bytes": conv.snapshots.items[-1].nbytes if conv.snapshots.items else 0,
              "state_bytes": conv.state_bytes, "prefix_cache_budget_bytes": model.prefix_cache.max_bytes,
              "prefix_cache_bytes": model.prefix_cache.nbytes,
              "snapshots_and_prefix_budget_over_weights":
                  (max(c.snapshots.nbytes for c in conversations) + model.prefix_cache.max_bytes) / weights,
              "limits_over_weights": budget / weights, "peak_rss_mb": peak_rss_mb()}
    first, last = per_turn[0], per_turn[-1]
    summary = {"ttft_first_kept_s": first["kept"]["median"], "ttft_last_kept_s": last["kept"]["median"],
               "last_over_first_kept": last["kept"]["median"] / first["kept"]["median"],
               "ttft_last_reprefilled_s": last["reprefilled"]["median"],
               "last_kept_over_reprefilled": last["kept"]["median"] / last["reprefilled"]["median"]}
    if "llama.cpp" in last:
        summary["ttft_last_llama_s"] = last["llama.cpp"]["median"]
        summary["last_kept_over_llama"] = last["kept"]["median"] / last["llama.cpp"]["median"]
        summary["last_kept_over_llama_per_round"] = statistics.median(
            a.value / b.value for a, b in zip(_samples(last, "kept"), _samples(last, "llama.cpp"), strict=True))
    return {"spec": {"turns": turns, "user": user, "answer": answer, "reasoning": reasoning}, **source,
            "compared_turns": sorted(compare) if compare is not None else list(range(1, turns + 1)),
            "rounds": rounds, "threads": threads, "load_s": load_s, "turns": per_turn, "summary": summary,
            "restore": restore, "memory": memory, "peer": peer_info}


def _samples(row: dict, system: str) -> list[Sample]:
    return [Sample(**{k: v for k, v in s.items() if k != "quiet"}) for s in row[system]["samples"]]


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # run as a command: restart with huge pages for the weights (runtime/hugepages.py)
        reexec_with_hugepages()
    parser = common.parser("conversation", __doc__)
    parser.add_argument("--script", default="6:400:128", metavar="TURNS:USER:ANSWER",
                        help="user turns, tokens per user message, tokens per answer (default 6:400:128)")
    parser.add_argument("--reasoning", type=int, default=0, metavar="R",
                        help="each answer is a <think> block of R tokens, then the rest")
    parser.add_argument("--restore-tokens", type=int, default=0, metavar="N",
                        help="also save a conversation of N tokens, then restore and continue it against "
                             "re-prefilling it")
    parser.add_argument("--restore-follow", type=int, default=16, metavar="N",
                        help="--restore-tokens: tokens of the user message that continues the restored conversation")
    parser.add_argument("--restore-runs", type=int, default=2, metavar="N",
                        help="--restore-tokens: restores measured after one warm-up (re-prefills: N after the first "
                             "one, which builds the conversation)")
    parser.add_argument("--compare-turns", type=common.ints, default=None, metavar="LIST",
                        help="turns at which the re-prefilled and llama.cpp systems run (their cost grows with the "
                             "history; the first and last always); default every turn")
    parser.add_argument("--llama-rollback", type=int, default=0, metavar="N",
                        help="with --peer llama: llama.cpp keeps N recurrent-state snapshots per sequence (n_rs_seq, "
                             "experimental) so it can roll back up to N tokens instead of re-evaluating the whole "
                             "history; default 0, llama-cpp-python's default. llama-cpp-python 0.3.36 aborts at "
                             "LFM2.5-8B-A1B's full depth with any N > 0")
    common.add_peer(parser)
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    if check_args("conversation", args):
        return 2
    section = run(bundle, args.script, args.threads, args.runs, args.reasoning,
                  args.gguf if args.peer == "llama" else None, args.restore_tokens, args.restore_follow,
                  args.restore_runs, llama_rollback=args.llama_rollback, compare_turns=args.compare_turns,
                  progress=common.progress)
    result = {
        **common.header(args.threads, bundle, section["memory"]["weights_bytes"]),
        "conversation": section,
        "settings": {"threads": args.threads, "runs": args.runs, "conversation": args.script,
                     "reasoning": args.reasoning, "restore_tokens": args.restore_tokens,
                     "restore_follow": args.restore_follow, "peer": args.peer, "gguf": args.gguf,
                     "llama_rollback": args.llama_rollback, "compare_turns": args.compare_turns,
                     "restore_runs": args.restore_runs},
    }
    return common.write_reports(result, Path(args.out), write_conversation_markdown, write_conversation_plot)
