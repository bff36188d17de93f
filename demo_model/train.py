"""Train lfm-edge's bundled demo model: a tiny LFM2-MoE on Python's own documentation.

Corpus: ``pydoc_data.topics.topics`` (shipped with CPython, PSF license). Every 20th topic
(by sorted key) is held out and written to ``heldout.txt``. Mixed in: synthetic tool-use chats
(tool_chats.py), rendered with the runtime's chat template, trained on what the assistant writes.
Deterministic for a given seed.

The shipped weights call the demo tools (README: Tool calls). Three runs, each from the one before (``--init``): a
pydoc-only model, then the tool stage, which mixes the tool chats and the echo rows into the pydoc batches, then
a short stage with echo rows of city names and made-up names. All use a tokenizer that keeps spaces apart from
words (``--spaces-apart``), so a tool call copies a city or an expression from the question token for token:

    nice -n 19 python demo_model/train.py --spaces-apart --chat-batch 0 --copy-batch 0 --out build/demo-stage1
    nice -n 19 python demo_model/train.py --spaces-apart --init build/demo-stage1 --out build/demo-stage2 \
        --steps 800 --lr 2e-3 --warmup 20
    nice -n 19 python demo_model/train.py --spaces-apart --init build/demo-stage2 --out demo_model \
        --steps 300 --lr 1e-3 --warmup 10 --echo-cities 0.3 --echo-letters 0.4

``--preset quality`` trains the demo's wider sibling, the model quantization quality is compared on: every
weight row a multiple of 256 (hidden 256, expert size 256, dense intermediate 768), so llama.cpp's K-quants
(Q4_K, Q3_K, Q2_K: 256-wide super-blocks) apply to every tensor instead of falling back to other formats.
It is rebuilt, not shipped (about 40 MB), with the default tokenizer (the pydoc-only demo's before the tool stage)
and its pydoc-only recipe:

    nice -n 10 python demo_model/train.py --preset quality --out build/quality-model --steps 1000 --threads 2
"""

import argparse
import json
import math
import random
import re
import time
from functools import partial
from pathlib import Path
from pydoc_data.topics import topics

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, Lfm2MoeConfig, Lfm2MoeForCausalLM

from lfm_edge.runtime.templates import ChatTemplate

try:  # run as a script (python demo_model/train.py) or imported as lfm_edge.demo_model.train
    import tool_chats
except ImportError:
    from lfm_edge.demo_model import tool_chats

SPECIAL_TOKENS = [
    "<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>", "<|im_start|>",
    "<|im_end|>", "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>", "<|tool_call_end|>",
    "<|tool_response_start|>", "<|tool_response_end|>", "<think>", "</think>",
]  # fmt: skip
PAD, BOS, EOT, IM_END = 0, 1, 2, 7
VOCAB_SIZE, SEQ_LEN, BATCH, HELDOUT_MAX_CHARS = 3000, 128, 16, 60_000
# a chat is one row of at most CHAT_LEN tokens (of 1,000 chats drawn, the longest had 790: five tool schemas);
# IGNORE: a label not trained on
CHAT_LEN, IGNORE = 800, -100
# LFM2-style ChatML: bos, optional system prompt (+ tool list), one block per message.
CHAT_TEMPLATE = r"""{{- bos_token -}}
{%- set ns = namespace(system_prompt="") -%}
{%- if messages and messages[0]["role"] == "system" -%}
  {%- set ns.system_prompt = messages[0]["content"] -%}{%- set messages = messages[1:] -%}
{%- endif -%}
{%- if tools -%}
  {%- set ns.system_prompt = ns.system_prompt + ("\n" if ns.system_prompt else "") + "List of tools: <|tool_list_start|>[" -%}
  {%- for tool in tools -%}
    {%- if tool is not string -%}{%- set tool = tool | tojson -%}{%- endif -%}
    {%- set ns.system_prompt = ns.system_prompt + tool + (", " if not loop.last else "") -%}
  {%- endfor -%}
  {%- set ns.system_prompt = ns.system_prompt + "]<|tool_list_end|>" -%}
{%- endif -%}
{%- if ns.system_prompt -%}{{- "<|im_start|>system\n" + ns.system_prompt + "<|im_end|>\n" -}}{%- endif -%}
{%- for message in messages -%}
  {%- set content = message["content"] -%}
  {%- if content is not string -%}{%- set content = content | tojson -%}{%- endif -%}
  {%- if message["role"] == "tool" -%}{%- set content = "<|tool_response_start|>" + content + "<|tool_response_end|>" -%}{%- endif -%}
  {{- "<|im_start|>" + message["role"] + "\n" + content + "<|im_end|>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- "<|im_start|>assistant\n" -}}{%- endif -%}
"""  # noqa: E501


def build_corpus() -> tuple[list[str], str]:
    """Split the pydoc topics into training documents and (truncated) held-out text."""
    keys = sorted(topics)
    train = [topics[k] for i, k in enumerate(keys) if i % 20 != 0]
    heldout = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 20 == 0)
    return train, heldout[:HELDOUT_MAX_CHARS]


def train_tokenizer(docs: list[str], spaces_apart: bool = False) -> Tokenizer:
    """Byte-level BPE (GPT-2's split); LFM2's special tokens get ids 0..15; every encoding starts with bos.

    `spaces_apart`: no token mixes spaces with anything else. The merges are learned on GPT-2's pieces with their
    runs of spaces cut off ("Ġ" + "Halifax", not "ĠHalifax"), so a word has the same tokens after a space as after
    a quote: the tool calls copy a city or an expression from the question (`... in Halifax?` ->
    `city="Halifax"`), token for token instead of spelling "ĠHal" as "Hal" (README: Tool calls). The saved
    pre-tokenizer is plain GPT-2 ByteLevel either way (llama.cpp's `gpt-2`, so GGUF export names it): with no
    merge across a space, BPE on GPT-2's pieces gives the same tokens as on the cut pieces. About 1.5x the tokens
    of the default for the same text."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([byte_level, pre_tokenizers.Split(Regex("Ġ+"), "isolated")]) \
        if spaces_apart else byte_level
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(docs, trainer=trainer)
    tok.pre_tokenizer = byte_level
    assert not spaces_apart or not [t for t in tok.get_vocab() if "Ġ" in t and t.strip("Ġ")], "a space mixed in"
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    bos = [("<|startoftext|>", BOS)]
    tok.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A", special_tokens=bos)
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|pad|>"},
        **{"add_bos_token": True, "add_eos_token": False, "model_max_length": 4096},
        **{"clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# Widths per preset. "quality": every row length a multiple of 256 (llama.cpp's K-quant super-block).
PRESETS = {
    "demo": {"hidden_size": 128, "intermediate_size": 320, "moe_intermediate_size": 96},
    "quality": {"hidden_size": 256, "intermediate_size": 768, "moe_intermediate_size": 256},
}


def build_config(vocab_size: int, preset: str = "demo") -> Lfm2MoeConfig:
    return Lfm2MoeConfig(
        vocab_size=vocab_size, num_hidden_layers=6, max_position_embeddings=4096, **PRESETS[preset],
        layer_types=["conv", "conv", "full_attention", "conv", "full_attention", "conv"],
        num_attention_heads=4, num_key_value_heads=2, conv_L_cache=3, conv_bias=False,
        num_dense_layers=2,
        num_experts=8, num_experts_per_tok=2, use_expert_bias=True, norm_topk_prob=True,
        routed_scaling_factor=1.0, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=IM_END,
    )  # fmt: skip


def encode_docs(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """One token stream: <|startoftext|> doc <|endoftext|> for every document."""
    return torch.tensor([i for enc in tok.encode_batch(docs) for i in [*enc.ids, EOT]], dtype=torch.long)


def build_chats(tok: Tokenizer, docs: list[str], count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """`count` synthetic tool chats as (token ids, labels): ids as the runtime renders and tokenizes the chat
    (LfmModel.prompt_ids), labels = ids on the assistant's own tokens, IGNORE elsewhere."""
    template = ChatTemplate(CHAT_TEMPLATE, {"bos_token": "<|startoftext|>", "eos_token": "<|im_end|>",
                                            "pad_token": "<|pad|>"})
    rng, chats = random.Random(seed), []
    while len(chats) < count:
        messages, tools = tool_chats.make_chat(rng, docs)
        text, spans = tool_chats.render_with_spans(template, messages, tools)
        enc = tok.encode(text, add_special_tokens=False)
        if len(enc.ids) > CHAT_LEN:
            continue
        inside = [any(s <= a and b <= e for s, e in spans) for a, b in enc.offsets]
        labels = [i if keep else IGNORE for i, keep in zip(enc.ids, inside, strict=True)]
        chats.append((enc.ids, labels))
    return chats


def chat_batch(chats: list[tuple[list[int], list[int]]], start: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Chats start..start+size of the (length-sorted) pool, right-padded to the longest of them."""
    rows = chats[start : start + size]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (i, lab) in enumerate(rows):
        ids[r, : len(i)], labels[r, : len(lab)] = torch.tensor(i), torch.tensor(lab)
    return ids, labels


@torch.no_grad()
def evaluate(model: Lfm2MoeForCausalLM, stream: torch.Tensor) -> float:
    """Mean next-token loss over non-overlapping SEQ_LEN windows."""
    n = (len(stream) - 1) // SEQ_LEN
    logits = model(input_ids=stream[: n * SEQ_LEN].view(n, SEQ_LEN)).logits
    return F.cross_entropy(logits.flatten(0, 1), stream[1 : n * SEQ_LEN + 1]).item()


def count_load(count: torch.Tensor, _module: torch.nn.Module, _inputs: tuple, out: tuple) -> None:
    """Router forward hook: out = (logits, weights, selected experts); accumulate expert load."""
    if torch.is_grad_enabled():
        count.add_(torch.bincount(out[2].flatten(), minlength=len(count)))


def dropout_hook(rate: list[float], module: torch.nn.Module, _inputs: tuple, out: object) -> object:
    """Training-only dropout on a sub-layer's output (LFM2 has no dropout in its config); rate[0] is the rate
    of the batch being run (the pydoc text's; the synthetic batches run without)."""
    p, on = rate[0], module.training and torch.is_grad_enabled()  # never in evaluate() or generate()
    return (F.dropout(out[0], p, on), *out[1:]) if isinstance(out, tuple) else F.dropout(out, p, on)


def echo_rows(tok: Tokenizer, words: list[str], rows: int, rng: random.Random, cities: float = 0.0,
              letters: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Copying rows, framed as chats: the user writes a short text (words of the pydoc text, an invented city, an
    arithmetic expression), the assistant writes it back once and ends its turn; trained on the copy and its
    <|im_end|>. A tool call copies the expression or the city from the question, and the pydoc text and the chats
    alone did not make the model learn to copy (it called get_weather(city="Bello") whatever city was asked).
    Half of the texts follow a space in the user's turn, as a city or an expression does in a question, so the
    model also learns that " Lisbon" (tokens "ĠL", "is", ...) is written "Lisbon" ("L", "is", ...) after `city="`
    (with --spaces-apart: "Ġ", "L", "is", ... and the same tokens after `city="`). Earlier versions repeated random
    token spans many times in a plain row: the model learned to repeat in documents too ("The listThe list...").
    A share `cities` of the rows is one city name after a space instead (the weather calls' copy), and a share
    `letters` one made-up name of any letters (tool_chats.random_name): held-out cities ("Halifax": H al if a x)
    are made of pieces the training cities rarely have, and the model cut them short or looped in them."""
    encoded = []
    for _ in range(rows):
        pieces, space = [], None  # random draws in the order of the runs without them (same rows for 0.0)
        if letters and rng.random() < letters:
            pieces, space = [tool_chats.random_name(rng)], True
        elif cities and rng.random() < cities:
            pieces, space = [tool_chats._city_name(rng)], True
        for _ in range(0 if pieces else rng.randint(1, 3)):
            kind = rng.random()
            if kind < 0.4:
                word = rng.choice(words)
                pieces.append(word.capitalize() if rng.random() < 0.5 else word)
            elif kind < 0.7:
                pieces.append(tool_chats._city_name(rng))
            else:
                pieces.append(tool_chats._expression(rng))
        text = " ".join(pieces)
        space = rng.random() < 0.5 if space is None else space
        head = f"<|im_start|>user\n{' ' if space else ''}{text}<|im_end|>\n<|im_start|>assistant\n"
        head_ids = tok.encode(head, add_special_tokens=False).ids
        tail_ids = tok.encode(f"{text}<|im_end|>", add_special_tokens=False).ids
        ids = [BOS, *head_ids, *tail_ids]
        encoded.append((ids, [IGNORE] * (1 + len(head_ids)) + tail_ids))
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((rows, width), PAD, dtype=torch.long)
    labels = torch.full((rows, width), IGNORE, dtype=torch.long)
    for r, (i, lab) in enumerate(encoded):
        ids[r, : len(i)], labels[r, : len(lab)] = torch.tensor(i), torch.tensor(lab)
    return ids, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it)")
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint (trained by this "
                        "script: its tokenizer must be the one this script trains) instead of random weights")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: steps // 30)")
    parser.add_argument("--save-every", type=int, default=0, help="also save the model to OUT/step-N every N steps")
    parser.add_argument("--echo-cities", type=float, default=0.0, help="share of the copying rows that are one "
                        "city name after a space")
    parser.add_argument("--echo-letters", type=float, default=0.0, help="share of the copying rows that are one "
                        "made-up name of any letters after a space")
    parser.add_argument("--spaces-apart", action="store_true", help="a tokenizer with no token that mixes a space "
                        "with text (train_tokenizer); a stage started with --init must use the same")
    parser.add_argument("--chats", type=int, default=12_000, help="synthetic tool chats in the pool")
    parser.add_argument("--chat-batch", type=int, default=None, help="chats per step (default: 4 for the demo, "
                        "0 for the quality model, which is trained on pydoc alone)")
    parser.add_argument("--copy-batch", type=int, default=None, help="rows of the copying task (echo_rows) per "
                        "step (default: 32 for the demo, 0 for the quality model)")
    args = parser.parse_args()
    tools = args.preset == "demo"
    args.chat_batch = (4 if tools else 0) if args.chat_batch is None else args.chat_batch
    args.copy_batch = (32 if tools else 0) if args.copy_batch is None else args.copy_batch
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    train_docs, heldout = build_corpus()
    tok = train_tokenizer(train_docs, args.spaces_apart)
    if args.init:  # the model's token ids must mean what they meant when it was trained
        if Tokenizer.from_file(str(args.init / "tokenizer.json")).to_str() != tok.to_str():
            raise SystemExit(f"{args.init}: its tokenizer is not the one this script trains")
        model = Lfm2MoeForCausalLM.from_pretrained(args.init, dtype=torch.float32)
    (args.out / "heldout.txt").write_text(heldout)
    save_tokenizer(tok, args.out)
    train_ids, heldout_ids = encode_docs(tok, train_docs), encode_docs(tok, [heldout])
    words = sorted({w for doc in train_docs for w in re.findall(r"[A-Za-z]{3,12}", doc)})  # for echo_rows
    print(f"train tokens {len(train_ids)}, held-out tokens {len(heldout_ids)}, vocab {tok.get_vocab_size()}")
    chats = sorted(build_chats(tok, train_docs, args.chats, args.seed), key=lambda c: len(c[0])) \
        if args.chat_batch else []
    if chats:  # batches of neighbours in length order: little padding
        chat_tokens = sum(len(ids) for ids, _ in chats)
        trained = sum(sum(label != IGNORE for label in labels) for _, labels in chats)
        print(f"tool chats {len(chats)}: {chat_tokens} tokens, {trained} of them the assistant's")

    if not args.init:
        model = Lfm2MoeForCausalLM(build_config(tok.get_vocab_size(), args.preset))
    model.train()
    if args.init:
        print(f"from {args.init}: held-out {evaluate(model, heldout_ids):.4f} (eval mode: without dropout)")
    moe_blocks = [m for m in model.modules() if hasattr(m, "expert_bias")]
    counts = [torch.zeros(model.config.num_experts) for _ in moe_blocks]
    for block, count in zip(moe_blocks, counts, strict=True):
        if not args.init:  # non-zero bias from the start
            block.expert_bias.copy_(0.01 * torch.randn(model.config.num_experts))
        block.gate.register_forward_hook(partial(count_load, count))
    rate = [args.dropout]
    for layer in model.model.layers:
        for sub in (layer.conv if hasattr(layer, "conv") else layer.self_attn, layer.feed_forward):
            sub.register_forward_hook(partial(dropout_hook, rate))
    model.model.embed_tokens.register_forward_hook(partial(dropout_hook, rate))
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    # linear warm-up, then cosine decay to 10 % of the peak
    warmup = max(1, args.steps // 30 if args.warmup is None else args.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / args.steps)))
    )
    gen = torch.Generator().manual_seed(args.seed)
    start, avg, chat_avg, copy_avg = time.time(), None, None, None
    for step in range(1, args.steps + 1):
        offsets = torch.randint(0, len(train_ids) - SEQ_LEN, (BATCH,), generator=gen)
        batch = torch.stack([train_ids[o : o + SEQ_LEN] for o in offsets.tolist()])
        rate[0] = args.dropout
        loss = model(input_ids=batch, labels=batch).loss
        rate[0] = 0.0
        chat_loss, copy_loss = torch.zeros(()), torch.zeros(())
        if chats:
            first = int(torch.randint(0, len(chats) - args.chat_batch + 1, (1,), generator=gen))
            ids, labels = chat_batch(chats, first, args.chat_batch)
            chat_loss = model(input_ids=ids, labels=labels).loss
        if args.copy_batch:
            rng = random.Random(int(torch.randint(0, 2**31, (1,), generator=gen)))
            ids, labels = echo_rows(tok, words, args.copy_batch, rng, args.echo_cities, args.echo_letters)
            copy_loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        (loss + chat_loss + copy_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # auxiliary-loss-free load balancing, as LFM2-MoE / DeepSeek-V3 do
            for block, count in zip(moe_blocks, counts, strict=True):
                block.expert_bias.add_(1e-3 * torch.sign(count.mean() - count))
                count.zero_()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        chat_avg = chat_loss.item() if chat_avg is None else 0.98 * chat_avg + 0.02 * chat_loss.item()
        copy_avg = copy_loss.item() if copy_avg is None else 0.98 * copy_avg + 0.02 * copy_loss.item()
        if step % 50 == 0 or step == args.steps:
            msg = f"step {step:5d}  loss {loss.item():.4f}  avg {avg:.4f}  chats {chat_avg:.4f}  "
            msg += f"copying {copy_avg:.4f}  {time.time() - start:6.0f}s"
            if step % 250 == 0 or step == args.steps:
                msg += f"  held-out {evaluate(model, heldout_ids):.4f}"
            print(msg, flush=True)
        if args.save_every and step % args.save_every == 0 and step < args.steps:
            model.save_pretrained(args.out / f"step-{step}", safe_serialization=True)
            save_tokenizer(tok, args.out / f"step-{step}")

    model.eval()
    train_loss = evaluate(model, train_ids[: 64 * SEQ_LEN + 1])
    heldout_loss = evaluate(model, heldout_ids)
    ppl, minutes = math.exp(heldout_loss), (time.time() - start) / 60
    print(f"final train loss {train_loss:.4f}  held-out {heldout_loss:.4f} (ppl {ppl:.1f})  {minutes:.1f} min")
    model.save_pretrained(args.out, safe_serialization=True)
    GenerationConfig(bos_token_id=BOS, eos_token_id=IM_END, pad_token_id=PAD, do_sample=False).save_pretrained(args.out)
    out = model.generate(torch.tensor([tok.encode("The list").ids]), max_new_tokens=40, do_sample=False)
    print("sample:", repr(tok.decode(out[0].tolist())))


if __name__ == "__main__":
    main()
