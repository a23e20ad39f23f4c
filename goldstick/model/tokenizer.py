"""The project's own byte-level BPE tokenizer, trained on ``goldstick/data/tokenizer_corpus.txt``.

The test models need a real tokenizer (CEval prompts are Chinese) but nothing may be downloaded, so we train a small
one with the ``tokenizers`` library from a mixed Chinese/English corpus written for this project. Training takes a
fraction of a second and is deterministic (fixed corpus order; BPE merge ties are broken by the pair itself).

Shape of the tokenizer, modelled on DeepSeek-V3/R1's:

* special tokens first: ``<｜begin▁of▁sentence｜>`` = 0 (bos), ``<｜end▁of▁sentence｜>`` = 1 (eos),
  ``<｜▁pad▁｜>`` = 2 (pad), then the chat markers ``<｜User｜>``, ``<｜Assistant｜>``; ``<think>``/``</think>`` are
  added (non-special) after the learned vocabulary;
* pre-tokenization: runs of 1-3 digits, runs of CJK characters, words with an optional leading space, punctuation
  runs and whitespace are split apart, then mapped to byte-level symbols; so a Chinese run is learned as words and
  single characters (each a merge of its 3 UTF-8 bytes), and no text is ever out of vocabulary;
* a template post-processor puts bos in front of every sequence (``add_special_tokens=False`` to skip it), and a
  byte-level decoder gives exact round trips.

The learned vocabulary is capped at ``vocab_size`` but the trainer stops earlier when no pair occurs at least
``min_frequency`` times (about 3.2k tokens for the bundled corpus at the default 4096/2); a model built on it
should use ``vocab_size >= len(tokenizer)``, as R1 (129280 rows for ~128.8k tokens) does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from goldstick.errors import TokenizerError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
CORPUS_PATH = DATA_DIR / "tokenizer_corpus.txt"

BOS_TOKEN = "<｜begin▁of▁sentence｜>"
EOS_TOKEN = "<｜end▁of▁sentence｜>"
PAD_TOKEN = "<｜▁pad▁｜>"
USER_TOKEN = "<｜User｜>"
ASSISTANT_TOKEN = "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, USER_TOKEN, ASSISTANT_TOKEN]  # ids 0..4
THINK_TOKENS = ["<think>", "</think>"]

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MIN_FREQUENCY = 2

# Pre-tokenizer pieces (each split keeps its matches as separate pieces)
_DIGITS = r"\p{N}{1,3}"
_CJK = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+"
_REST = r" ?\p{L}+| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# A plain chat template: bos, then <｜User｜>question / <｜Assistant｜>answer<eos> turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}<｜User｜>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<｜Assistant｜>{{ message['content'] }}<｜end▁of▁sentence｜>"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)


class LoadedTokenizer(NamedTuple):
    tokenizer: Tokenizer
    bos_id: int
    eos_id: int


def corpus_lines(path: str | Path = CORPUS_PATH) -> list[str]:
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = DEFAULT_MIN_FREQUENCY,
                    corpus: str | Path = CORPUS_PATH) -> Tokenizer:
    """Train the BPE tokenizer in memory (deterministic for a given corpus and arguments)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must hold the 256 byte symbols and the special tokens, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_DIGITS), behavior="isolated"),
        pre_tokenizers.Split(Regex(_CJK), behavior="isolated"),
        pre_tokenizers.Split(Regex(_REST), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(corpus), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    bos = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN}:0 $A:0",
        pair=f"{BOS_TOKEN}:0 $A:0 {BOS_TOKEN}:1 $B:1",
        special_tokens=[(BOS_TOKEN, bos)],
    )
    return tok


def train_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE, out_path: str | Path = ".",
                    model_max_length: int = 1024, min_frequency: int = DEFAULT_MIN_FREQUENCY) -> Tokenizer:
    """Train and write ``tokenizer.json`` + ``tokenizer_config.json`` into the directory ``out_path``.

    (A path ending in ``.json`` names the tokenizer file itself; the config goes next to it.) The files load with
    ``tokenizers.Tokenizer.from_file`` and ``transformers.AutoTokenizer.from_pretrained(dir)``.
    """
    out = Path(out_path)
    tokenizer_file = out if out.suffix == ".json" else out / "tokenizer.json"
    tokenizer_file.parent.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_size, min_frequency)
    tok.save(str(tokenizer_file), pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (tokenizer_file.parent / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return tok


def load_tokenizer(model_dir: str | Path) -> LoadedTokenizer:
    """``tokenizer.json`` of a model directory plus its bos/eos ids (from tokenizer_config.json, else config.json)."""
    model_dir = Path(model_dir)
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{model_dir}: no tokenizer.json (goldstick tokenizes calibration data, prompts and "
                             "C-Eval questions with the model's own tokenizer; copy it from the source model)")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own untyped Exception for a malformed file
        raise TokenizerError(f"{path}: not a readable tokenizer ({exc})") from None
    bos_id = eos_id = None
    tc_path = model_dir / "tokenizer_config.json"
    if tc_path.exists():
        tc = json.loads(tc_path.read_text(encoding="utf-8"))
        bos_id = _token_id(tok, tc.get("bos_token"))
        eos_id = _token_id(tok, tc.get("eos_token"))
    cfg_path = model_dir / "config.json"
    if (bos_id is None or eos_id is None) and cfg_path.exists():
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        bos_id = cfg.get("bos_token_id") if bos_id is None else bos_id
        eos_id = cfg.get("eos_token_id") if eos_id is None else eos_id
        if isinstance(eos_id, list):
            eos_id = eos_id[0]
    bos_id = tok.token_to_id(BOS_TOKEN) if bos_id is None else bos_id
    eos_id = tok.token_to_id(EOS_TOKEN) if eos_id is None else eos_id
    return LoadedTokenizer(tok, bos_id, eos_id)


def _token_id(tok: Tokenizer, token) -> int | None:
    if isinstance(token, dict):  # {"content": ..., "__type": "AddedToken"} form
        token = token.get("content")
    return tok.token_to_id(token) if isinstance(token, str) else None
