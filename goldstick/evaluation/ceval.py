"""C-Eval: load the official layout, build the official answer-only prompt, score models, compare them.

Data (``load_ceval``): a folder in the official layout ``{dev,val,test}/{subject}_{split}.csv`` (dev columns
``id,question,A,B,C,D,answer,explanation``, val ``id,question,A,B,C,D,answer``, test without ``answer``), or the hub
dataset ``ceval/ceval-exam`` through ``datasets`` where the hub is reachable. Every field is read as a string and
``\\r\\n``/``\\r`` inside fields become ``\\n``; a missing column or an answer outside A-D is an error naming the file
and line.

Prompt (``build_prompt``): the official answer-only prompt of the C-Eval repository, with the Chinese subject name::

    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n
    {dev question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{answer}\\n\\n      (x k shots, dev rows in file order)
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

Answer: the argmax over the next-token logits of the tokens ``A``, ``B``, ``C``, ``D`` at the position after ``答案：``
(no space), as the official code does for open models. Where the tokenizer would merge the letter with what precedes
it (so that ``prompt + "A"`` does not tokenize as ``prompt`` followed by the token ``A``), that question falls back to
comparing the log-likelihoods of the four continuations. A prompt longer than the model's context drops shots from
the end (the tutorial's advice), and a zero-shot prompt still too long keeps its last tokens; both are counted.

Scores: accuracy in points per subject, per category (mean over its subjects), C-Eval Hard (mean over its 8
subjects), overall as the mean over subjects (the official "Average") and, secondary, question-weighted.

The comparison of a float model with quantized ones (paired bootstrap, flips, McNemar, KL), the reports and the
overlap guard are in ``ceval_analysis``; regression jobs in ``ceval_jobs``. The network has no KV cache, so a
shared few-shot prefix cannot be reused across questions; every prompt runs in full (sorted by length and batched
with left padding to waste little on padding).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from goldstick.errors import GoldstickError

# ---- the 52 subjects ---------------------------------------------------------------------------------------------
# (handle, English name, Chinese name, category), in the order of the official subject_mapping.json
SUBJECT_TABLE: tuple[tuple[str, str, str, str], ...] = (
    ("computer_network", "Computer Network", "计算机网络", "STEM"),
    ("operating_system", "Operating System", "操作系统", "STEM"),
    ("computer_architecture", "Computer Architecture", "计算机组成", "STEM"),
    ("college_programming", "College Programming", "大学编程", "STEM"),
    ("college_physics", "College Physics", "大学物理", "STEM"),
    ("college_chemistry", "College Chemistry", "大学化学", "STEM"),
    ("advanced_mathematics", "Advanced Mathematics", "高等数学", "STEM"),
    ("probability_and_statistics", "Probability and Statistics", "概率统计", "STEM"),
    ("discrete_mathematics", "Discrete Mathematics", "离散数学", "STEM"),
    ("electrical_engineer", "Electrical Engineer", "注册电气工程师", "STEM"),
    ("metrology_engineer", "Metrology Engineer", "注册计量师", "STEM"),
    ("high_school_mathematics", "High School Mathematics", "高中数学", "STEM"),
    ("high_school_physics", "High School Physics", "高中物理", "STEM"),
    ("high_school_chemistry", "High School Chemistry", "高中化学", "STEM"),
    ("high_school_biology", "High School Biology", "高中生物", "STEM"),
    ("middle_school_mathematics", "Middle School Mathematics", "初中数学", "STEM"),
    ("middle_school_biology", "Middle School Biology", "初中生物", "STEM"),
    ("middle_school_physics", "Middle School Physics", "初中物理", "STEM"),
    ("middle_school_chemistry", "Middle School Chemistry", "初中化学", "STEM"),
    ("veterinary_medicine", "Veterinary Medicine", "兽医学", "STEM"),
    ("college_economics", "College Economics", "大学经济学", "Social Science"),
    ("business_administration", "Business Administration", "工商管理", "Social Science"),
    ("marxism", "Marxism", "马克思主义基本原理", "Social Science"),
    ("mao_zedong_thought", "Mao Zedong Thought", "毛泽东思想和中国特色社会主义理论体系概论", "Social Science"),
    ("education_science", "Education Science", "教育学", "Social Science"),
    ("teacher_qualification", "Teacher Qualification", "教师资格", "Social Science"),
    ("high_school_politics", "High School Politics", "高中政治", "Social Science"),
    ("high_school_geography", "High School Geography", "高中地理", "Social Science"),
    ("middle_school_politics", "Middle School Politics", "初中政治", "Social Science"),
    ("middle_school_geography", "Middle School Geography", "初中地理", "Social Science"),
    ("modern_chinese_history", "Modern Chinese History", "近代史纲要", "Humanities"),
    ("ideological_and_moral_cultivation", "Ideological and Moral Cultivation", "思想道德修养与法律基础", "Humanities"),
    ("logic", "Logic", "逻辑学", "Humanities"),
    ("law", "Law", "法学", "Humanities"),
    ("chinese_language_and_literature", "Chinese Language and Literature", "中国语言文学", "Humanities"),
    ("art_studies", "Art Studies", "艺术学", "Humanities"),
    ("professional_tour_guide", "Professional Tour Guide", "导游资格", "Humanities"),
    ("legal_professional", "Legal Professional", "法律职业资格", "Humanities"),
    ("high_school_chinese", "High School Chinese", "高中语文", "Humanities"),
    ("high_school_history", "High School History", "高中历史", "Humanities"),
    ("middle_school_history", "Middle School History", "初中历史", "Humanities"),
    ("civil_servant", "Civil Servant", "公务员", "Other"),
    ("sports_science", "Sports Science", "体育学", "Other"),
    ("plant_protection", "Plant Protection", "植物保护", "Other"),
    ("basic_medicine", "Basic Medicine", "基础医学", "Other"),
    ("clinical_medicine", "Clinical Medicine", "临床医学", "Other"),
    ("urban_and_rural_planner", "Urban and Rural Planner", "注册城乡规划师", "Other"),
    ("accountant", "Accountant", "注册会计师", "Other"),
    ("fire_engineer", "Fire Engineer", "注册消防工程师", "Other"),
    ("environmental_impact_assessment_engineer", "Environmental Impact Assessment Engineer", "环境影响评价工程师",
     "Other"),
    ("tax_accountant", "Tax Accountant", "税务师", "Other"),
    ("physician", "Physician", "医师资格", "Other"),
)


@dataclass(frozen=True)
class Subject:
    handle: str
    english: str
    chinese: str
    category: str

    @property
    def hard(self) -> bool:
        return self.handle in HARD


SUBJECTS: dict[str, Subject] = {row[0]: Subject(*row) for row in SUBJECT_TABLE}
CATEGORIES: tuple[str, ...] = ("STEM", "Social Science", "Humanities", "Other")
# C-Eval Hard (README): the 8 subjects with complex LaTeX equations and non-trivial reasoning
HARD: tuple[str, ...] = ("advanced_mathematics", "discrete_mathematics", "probability_and_statistics",
                         "college_chemistry", "college_physics", "high_school_mathematics", "high_school_chemistry",
                         "high_school_physics")
SPLITS = ("dev", "val", "test")
LETTERS = ("A", "B", "C", "D")
HUB_NAME = "ceval/ceval-exam"
COLUMNS = {"dev": ("id", "question", "A", "B", "C", "D", "answer", "explanation"),
           "val": ("id", "question", "A", "B", "C", "D", "answer"),
           "test": ("id", "question", "A", "B", "C", "D")}
PROMPT_HEADER = "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"


class CEvalError(GoldstickError, ValueError):
    pass


def subjects_in(category: str) -> list[str]:
    return [h for h, s in SUBJECTS.items() if s.category == category]


def _category_alias(name: str) -> str | None:
    key = name.strip().lower().replace("_", " ").replace("-", " ")
    for cat in CATEGORIES:
        if key == cat.lower():
            return cat
    return None


def select_subjects(spec: str | Sequence[str] | None, available: Iterable[str] | None = None) -> list[str]:
    """Subject handles, in the official order, for a selection.

    ``spec``: None/"all" (every subject, restricted to ``available`` when given), or names separated by commas (or a
    list): subject handles, category names (``STEM``, ``Social Science`` / ``social_science``, ``Humanities``,
    ``Other``) and ``hard`` (the C-Eval Hard subset). Named subjects must be in ``available`` when that is given.
    """
    available_set = set(available) if available is not None else set(SUBJECTS)
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all")):
        return [h for h in SUBJECTS if h in available_set]
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s).strip() for s in spec]
    chosen: set[str] = set()
    for name in filter(None, names):
        if name in SUBJECTS:
            if name not in available_set:
                raise CEvalError(f"subject {name!r} is not in the data")
            chosen.add(name)
        elif name.lower() == "hard":
            chosen.update(h for h in HARD if h in available_set)
        elif name.lower() == "all":
            chosen.update(h for h in SUBJECTS if h in available_set)
        elif (cat := _category_alias(name)) is not None:
            chosen.update(h for h in subjects_in(cat) if h in available_set)
        else:
            raise CEvalError(f"unknown subject or category {name!r} (subjects are C-Eval handles such as "
                             f"'computer_network'; categories: {', '.join(CATEGORIES)}, hard)")
    if not chosen:
        raise CEvalError(f"the selection {spec!r} matches no subject in the data")
    return [h for h in SUBJECTS if h in chosen]


# ---- data --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Question:
    subject: str
    split: str
    id: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A".."D", or "" where the split has no labels
    explanation: str = ""
    source: str = ""  # file the row came from
    line: int = 0  # line of the file on which the row starts

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.split}/{self.id}"


def _normalise(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


MAX_FIELD_CHARS = 65536  # the longest real C-Eval field is a few thousand characters


def read_csv(path: str | Path, split: str | None = None, subject: str | None = None) -> list[Question]:
    """Rows of one official CSV (``{subject}_{split}.csv``); every field a string, line ends normalised."""
    path = Path(path)
    stem = path.name[:-4] if path.name.endswith(".csv") else path.name
    if split is None or subject is None:
        guess_subject, _, guess_split = stem.rpartition("_")
        split = split or guess_split
        subject = subject or guess_subject
    if split not in COLUMNS:
        raise CEvalError(f"{path}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    required = COLUMNS[split]
    rows: list[Question] = []
    reader = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            try:
                header = next(reader)
            except StopIteration:
                raise CEvalError(f"{path}:1: empty file (expected the header {','.join(required)})") from None
            header = [h.strip() for h in header]
            missing = [c for c in required if c not in header and not (split == "dev" and c == "explanation")]
            if missing:
                raise CEvalError(f"{path}:1: missing column(s) {', '.join(missing)} in the header "
                                 f"{','.join(header)!r} (a {split} file has {','.join(required)})")
            index = {name: i for i, name in enumerate(header)}
            start = reader.line_num + 1
            for number, record in enumerate(reader):
                line = start
                start = reader.line_num + 1
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                if len(record) != len(header):
                    raise CEvalError(f"{path}:{line}: {len(record)} fields, the header has {len(header)}")
                if max(len(field) for field in record) > MAX_FIELD_CHARS:  # whatever csv.field_size_limit says
                    raise CEvalError(f"{path}:{line}: a field of more than {MAX_FIELD_CHARS} characters; C-Eval "
                                     f"questions are a few thousand at most")
                get = lambda name: _normalise(record[index[name]]) if name in index else ""  # noqa: E731
                answer = get("answer").strip()
                if split != "test" or "answer" in index:
                    if answer not in LETTERS and not (split == "test" and answer == ""):
                        raise CEvalError(f"{path}:{line}: answer {answer!r} is not one of A, B, C, D")
                rows.append(Question(subject=subject, split=split, id=get("id").strip() or str(number),
                                     question=get("question"), options=tuple(get(c) for c in LETTERS), answer=answer,
                                     explanation=get("explanation"), source=str(path), line=line))
    except UnicodeDecodeError as exc:
        raise CEvalError(f"{path}: not UTF-8 text ({exc.reason}); C-Eval files are UTF-8 CSV") from None
    except csv.Error as exc:  # e.g. a field past the csv module's size limit
        line = reader.line_num if reader is not None else 1
        raise CEvalError(f"{path}:{line}: not a readable CSV row ({exc})") from None
    return rows


@dataclass
class CEvalData:
    """Questions of one split (``items``) and the dev rows (``dev``, the few-shot examples), per subject."""

    source: str
    split: str
    items: dict[str, list[Question]]
    dev: dict[str, list[Question]]
    files: dict[str, str] = field(default_factory=dict)  # file -> sha256 of the files read

    @property
    def subjects(self) -> list[str]:
        return list(self.items)

    def questions(self) -> list[Question]:
        return [q for rows in self.items.values() for q in rows]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def available_subjects(folder: str | Path, split: str) -> list[str]:
    folder = Path(folder)
    found = {p.name[: -len(f"_{split}.csv")] for p in (folder / split).glob(f"*_{split}.csv")}
    unknown = sorted(found - set(SUBJECTS))
    if unknown:
        raise CEvalError(f"{folder / split}: file(s) for unknown subject(s) {', '.join(unknown)} "
                         f"(C-Eval subject handles are listed in goldstick.evaluation.ceval.SUBJECTS)")
    return [h for h in SUBJECTS if h in found]


def load_ceval(data: str | Path, split: str = "val", subjects: str | Sequence[str] | None = None,
               limit: int | None = None, shots: int = 0) -> CEvalData:
    """Load ``split`` (and the dev rows when ``shots`` > 0) from a folder in the official layout, or from the hub.

    ``limit`` keeps the first N questions of each subject (file order). ``subjects`` is a selection for
    ``select_subjects``. ``data`` equal to ``ceval/ceval-exam`` (or ``hub:NAME``) loads through ``datasets``.
    """
    if split not in SPLITS:
        raise CEvalError(f"unknown split {split!r} (choose from {', '.join(SPLITS)})")
    if shots < 0 or shots > 5:
        raise CEvalError(f"shots must be between 0 and 5 (C-Eval has 5 dev rows per subject), got {shots}")
    if limit is not None and limit <= 0:
        raise CEvalError(f"limit must be positive, got {limit}")
    if split == "dev" and shots:
        raise CEvalError("the dev rows are the few-shot examples: evaluate dev only zero-shot")
    text = str(data)
    path = Path(text).expanduser()
    if not path.exists() and (text == HUB_NAME or text.startswith("hub:")):
        return _load_hub(text.removeprefix("hub:"), split, subjects, limit, shots)
    if not path.is_dir():
        raise CEvalError(f"C-Eval data folder {text!r} not found (expected {{dev,val,test}}/{{subject}}_{{split}}.csv"
                         f" inside it; or '{HUB_NAME}' to load from the hub)")
    if not (path / split).is_dir():
        raise CEvalError(f"{path}: no {split}/ folder (the official layout is {{dev,val,test}}/{{subject}}_{{split}}.csv)")
    chosen = select_subjects(subjects, available_subjects(path, split))
    items, dev, files = {}, {}, {}
    for handle in chosen:
        file = path / split / f"{handle}_{split}.csv"
        rows = read_csv(file, split, handle)
        files[str(file)] = _sha256(file)
        items[handle] = rows[:limit] if limit else rows
        if shots:
            dev_file = path / "dev" / f"{handle}_dev.csv"
            if not dev_file.exists():
                raise CEvalError(f"{dev_file}: not found ({shots}-shot prompts take their examples from dev/)")
            dev[handle] = read_csv(dev_file, "dev", handle)
            files[str(dev_file)] = _sha256(dev_file)
            if len(dev[handle]) < shots:
                raise CEvalError(f"{dev_file}: {len(dev[handle])} rows, {shots} shots requested")
    return CEvalData(source=str(path), split=split, items=items, dev=dev, files=files)


def _load_hub(name: str, split: str, subjects, limit, shots) -> CEvalData:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise CEvalError(f"loading {name!r} from the hub needs the 'datasets' package ({exc})") from None
    chosen = select_subjects(subjects)
    items, dev = {}, {}

    def rows_of(handle: str, which: str) -> list[Question]:
        try:
            ds = datasets.load_dataset(name, name=handle, split=which)
        except Exception as exc:  # datasets raises many types; one message naming the subject is what helps
            raise CEvalError(f"{name} ({handle}, {which}) could not be loaded from the hub: {exc}") from None
        out = []
        for i, row in enumerate(ds):
            answer = str(row.get("answer") or "").strip()
            if which != "test" and answer not in LETTERS:
                raise CEvalError(f"{name} {handle}/{which} row {i}: answer {answer!r} is not one of A, B, C, D")
            out.append(Question(subject=handle, split=which, id=str(row.get("id", i)),
                                question=_normalise(str(row["question"])),
                                options=tuple(_normalise(str(row[c])) for c in LETTERS), answer=answer,
                                explanation=_normalise(str(row.get("explanation") or "")),
                                source=f"hub:{name}/{handle}/{which}", line=i + 2))
        return out

    for handle in chosen:
        rows = rows_of(handle, split)
        items[handle] = rows[:limit] if limit else rows
        if shots:
            dev[handle] = rows_of(handle, "dev")
    return CEvalData(source=f"hub:{name}", split=split, items=items, dev=dev)


# ---- prompt ------------------------------------------------------------------------------------------------------
def format_question(q: Question, with_answer: bool) -> str:
    a, b, c, d = q.options
    text = f"{q.question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\n答案："
    return text + f"{q.answer}\n\n" if with_answer else text


def prompt_prefix(subject: str, shots: Sequence[Question] = ()) -> str:
    """The header with the Chinese subject name, then the shots (question, options and answer each)."""
    name = SUBJECTS[subject].chinese if subject in SUBJECTS else subject
    return PROMPT_HEADER.format(subject=name) + "".join(format_question(s, True) for s in shots)


def build_prompt(q: Question, shots: Sequence[Question] = ()) -> str:
    """The official answer-only prompt: header, ``shots`` (dev rows, in the order given), then the question."""
    return prompt_prefix(q.subject, shots) + format_question(q, False)


# ---- tokenization and scoring ------------------------------------------------------------------------------------
@dataclass
class Request:
    """One question, tokenized. ``continuations`` is None for next-token scoring, else the 4 token lists to score."""

    ids: list[int]
    shots: int
    truncated: bool
    continuations: list[list[int]] | None = None
    group: str = ""  # requests of one group share their prompt's header and shots (subject/shots)


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


def letter_token_ids(tokenizer) -> list[int] | None:
    """The single token of each of A, B, C, D; None if a letter is not one token."""
    ids = _encode(tokenizer, list(LETTERS))
    if any(len(x) != 1 for x in ids):
        return None
    return [x[0] for x in ids]


def tokenize_requests(tokenizer, questions: Sequence[Question], dev: dict[str, list[Question]], shots: int,
                      bos_id: int | None, max_len: int | None) -> tuple[list[Request], list[int] | None]:
    """Prompts -> token ids, checking that each answer letter follows the prompt as its own token."""
    letters = letter_token_ids(tokenizer)
    requests: list[Request] = []
    bos = [bos_id] if bos_id is not None else []
    for q in questions:
        k = shots
        while True:
            prompt = build_prompt(q, dev.get(q.subject, [])[:k] if k else ())
            ids = bos + _encode(tokenizer, [prompt])[0]
            if max_len is None or len(ids) <= max_len or k == 0:
                break
            k -= 1
        full = [bos + x for x in _encode(tokenizer, [prompt + letter for letter in LETTERS])]
        clean = letters is not None and all(f[:-1] == ids and f[-1] == t for f, t in zip(full, letters))
        truncated = False
        if clean:
            if max_len is not None and len(ids) > max_len:  # keep bos and the last tokens (ending in 答案：)
                truncated = True
                ids = bos + ids[len(ids) - (max_len - len(bos)):]
            group = "" if truncated else f"{q.subject}/{k}"
            requests.append(Request(ids=ids, shots=k, truncated=truncated, group=group))
            continue
        # the letter merges with the text before it: score the 4 continuations from their common prefix
        common = 0
        while common < len(ids) and all(len(f) > common and f[common] == ids[common] for f in full):
            common += 1
        common = max(common, 1)
        prefix, conts = ids[:common], [f[common:] for f in full]
        longest = max(len(c) for c in conts)
        if max_len is not None and len(prefix) + longest > max_len:
            truncated = True
            prefix = bos + prefix[len(prefix) - (max_len - longest - len(bos)):]
        requests.append(Request(ids=prefix, shots=k, truncated=truncated, continuations=conts))
    return requests, letters


def _as_numpy(x) -> np.ndarray:
    return x.asnumpy() if hasattr(x, "asnumpy") else np.asarray(x)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _batches(lengths: Sequence[int], batch_tokens: int, max_batch: int) -> list[list[int]]:
    """Indices grouped by similar length (longest first), each batch within ``batch_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups, current, width = [], [], 0
    for i in order:
        w = max(width, lengths[i])
        if current and (w * (len(current) + 1) > batch_tokens or len(current) >= max_batch):
            groups.append(current)
            current, w = [], lengths[i]
        current.append(i)
        width = w
    if current:
        groups.append(current)
    return groups


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    first, n = seqs[0], min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


def shared_prefixes(requests: Sequence[Request], min_prefix: int = 16) -> dict[str, tuple[list[int], int]]:
    """Group -> (its requests, length of the token prefix they all share), for groups worth a shared prefill.

    The prefix is the longest common run of *token ids* (not of text: a BPE merge across the header/question
    boundary would make a text prefix tokenize differently), leaving every request at least one token of its own.
    """
    members: dict[str, list[int]] = {}
    for r, req in enumerate(requests):
        if req.continuations is None and req.group:
            members.setdefault(req.group, []).append(r)
    plans = {}
    for group, rows in members.items():
        if len(rows) < 2:
            continue
        seqs = [requests[r].ids for r in rows]
        length = min(_common_prefix_length(seqs), min(len(s) for s in seqs) - 1)
        if length >= min_prefix:
            plans[group] = (rows, length)
    return plans


def score_requests(net, requests: Sequence[Request], letter_ids: list[int] | None, pad_id: int = 0,
                   batch_tokens: int = 4096, max_batch: int = 32, progress: bool = True,
                   desc: str = "ceval", share_prefix: bool = True) -> np.ndarray:
    """[N, 4] scores of A-D: next-token logits (or continuation log-likelihoods for fallback requests).

    With ``share_prefix`` (and a network with a KV cache), the prompt header and shots that a subject's questions
    share are run once per subject, and only each question's own tokens per question: five-shot prompts are
    mostly shots, so this does most of the work once instead of once per question.
    """
    from mindspore import Tensor

    scores = np.zeros((len(requests), 4), dtype=np.float64)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc=desc, unit="q", file=sys.stderr, leave=False)
    plans = shared_prefixes(requests) if share_prefix and hasattr(net, "forward_cached") else {}
    for rows, length in plans.values():
        _score_shared_prefix(net, requests, rows, length, letter_ids, scores, pad_id, batch_tokens, max_batch, bar)
    done_shared = {r for rows, _ in plans.values() for r in rows}

    # each fallback request becomes 4 sequences; next-token requests one
    seqs: list[list[int]] = []
    owner: list[tuple[int, int]] = []  # (request, letter or -1)
    for r, req in enumerate(requests):
        if r in done_shared:
            continue
        if req.continuations is None:
            seqs.append(req.ids)
            owner.append((r, -1))
        else:
            for j, cont in enumerate(req.continuations):
                seqs.append(req.ids + cont)
                owner.append((r, j))
    groups = _batches([len(s) for s in seqs], batch_tokens, max_batch)
    for group in groups:
        width = max(len(seqs[i]) for i in group)
        ids = np.full((len(group), width), pad_id, dtype=np.int32)
        mask = np.zeros((len(group), width), dtype=np.int32)
        for row, i in enumerate(group):  # left padding: every sequence ends at the last position
            ids[row, width - len(seqs[i]):] = seqs[i]
            mask[row, width - len(seqs[i]):] = 1
        logits = _as_numpy(net(Tensor(ids), Tensor(mask)))
        done = 0
        for row, i in enumerate(group):
            r, j = owner[i]
            if j < 0:
                scores[r] = logits[row, -1, letter_ids].astype(np.float64)
                done += 1
            else:
                cont = requests[r].continuations[j]
                n = len(cont)
                lp = _log_softmax(logits[row, width - n - 1:width - 1])
                scores[r, j] = float(lp[np.arange(n), cont].sum())
                done += j == 3
        if bar is not None:
            bar.update(done)
    if bar is not None:
        bar.close()
    return scores


def _score_shared_prefix(net, requests, rows, length, letter_ids, scores, pad_id, batch_tokens, max_batch, bar):
    """Prefill the rows' common prefix once, then run their own tokens in batches on copies of that cache."""
    from mindspore import Tensor

    prefix = requests[rows[0]].ids[:length]
    cache = net.new_cache(1)
    net.forward_cached(Tensor(np.asarray([prefix], dtype=np.int32)), cache, last_only=True)
    suffixes = [requests[r].ids[length:] for r in rows]
    for group in _batches([len(x) for x in suffixes], batch_tokens, max_batch):
        width = max(len(suffixes[i]) for i in group)
        ids = np.full((len(group), width), pad_id, dtype=np.int32)
        mask = np.zeros((len(group), width), dtype=np.int32)
        for row, i in enumerate(group):  # left padding after the prefix: masked, positions continue per row
            ids[row, width - len(suffixes[i]):] = suffixes[i]
            mask[row, width - len(suffixes[i]):] = 1
        logits = _as_numpy(net.forward_cached(Tensor(ids), cache.repeat(len(group)), mask, last_only=True))
        for row, i in enumerate(group):
            scores[rows[i]] = logits[row, -1, letter_ids].astype(np.float64)
        if bar is not None:
            bar.update(len(group))


# ---- results -----------------------------------------------------------------------------------------------------
@dataclass
class ModelRun:
    """One model's answers on the questions of a ``CEvalData`` (same order as ``data.questions()``)."""

    label: str
    path: str
    scores: np.ndarray  # [N, 4] letter scores (logits, or continuation log-likelihoods)
    questions: list[Question]
    seconds: float = 0.0

    @property
    def predictions(self) -> np.ndarray:
        return self.scores.argmax(-1)

    @property
    def probabilities(self) -> np.ndarray:
        return np.exp(_log_softmax(self.scores))

    @property
    def correct(self) -> np.ndarray:
        answers = np.array([LETTERS.index(q.answer) if q.answer in LETTERS else -1 for q in self.questions])
        return self.predictions == answers

    def summary(self) -> dict:
        return accuracy_summary(self.questions, self.correct)


def accuracy_summary(questions: Sequence[Question], correct: np.ndarray) -> dict:
    """Accuracy in points: per subject, per category and Hard (means over subjects), overall (mean over subjects,
    the official average) and question-weighted."""
    by_subject: dict[str, list[bool]] = {}
    for q, ok in zip(questions, correct):
        by_subject.setdefault(q.subject, []).append(bool(ok))
    subjects = {s: 100.0 * float(np.mean(v)) for s, v in by_subject.items()}
    categories = {}
    for cat in CATEGORIES:
        vals = [subjects[s] for s in subjects if SUBJECTS[s].category == cat]
        if vals:
            categories[cat] = float(np.mean(vals))
    hard = [subjects[s] for s in subjects if s in HARD]
    return {
        "overall": float(np.mean(list(subjects.values()))) if subjects else float("nan"),
        "overall_question_weighted": 100.0 * float(np.mean(correct)) if len(correct) else float("nan"),
        "categories": categories,
        "hard": float(np.mean(hard)) if hard else None,
        "subjects": subjects,
        "n_subjects": len(subjects),
        "n_questions": int(len(correct)),
        "n_correct": int(np.sum(correct)),
    }


def evaluate_network(net, tokenizer, data: CEvalData, shots: int, bos_id: int | None, pad_id: int = 0,
                     max_len: int | None = None, label: str = "model", path: str = "", batch_tokens: int = 4096,
                     progress: bool = True, requests: list[Request] | None = None,
                     letter_ids: list[int] | None = None, share_prefix: bool = True) -> ModelRun:
    """Score one network on every question of ``data`` (``requests`` may be passed to reuse tokenization)."""
    questions = data.questions()
    if requests is None:
        requests, letter_ids = tokenize_requests(tokenizer, questions, data.dev, shots, bos_id, max_len)
    started = time.time()
    scores = score_requests(net, requests, letter_ids, pad_id=pad_id, batch_tokens=batch_tokens,
                            progress=progress, desc=label, share_prefix=share_prefix)
    return ModelRun(label=label, path=path, scores=scores, questions=questions, seconds=time.time() - started)


# ---- the runner: float model + quantized ones --------------------------------------------------------------------
def _model_label(path: str, taken: set[str]) -> str:
    base = Path(path).name or "model"
    label, n = base, 2
    while label in taken:
        label, n = f"{base}-{n}", n + 1
    return label


def parse_model_arg(text: str, taken: set[str]) -> tuple[str, str]:
    """``LABEL=DIR`` or ``DIR`` -> (label, dir)."""
    label, sep, path = text.partition("=")
    if sep and label and not Path(text).exists():
        if label in taken:
            raise CEvalError(f"model label {label!r} is used twice")
        return label, path
    return _model_label(text, taken), text


def resolve_model_dir(path: str | Path | None) -> Path:
    if path is None or str(path) in ("", "default"):
        from goldstick.testing.make_model import default_model_path

        return default_model_path()
    p = Path(path).expanduser()
    if not (p / "config.json").exists():
        raise CEvalError(f"{p}: not a checkpoint folder (no config.json)")
    return p


def _tokenizer_digest(model_dir: Path) -> str | None:
    f = model_dir / "tokenizer.json"
    return _sha256(f) if f.exists() else None


def run_ceval(model: str | Path | None, quantized: Sequence[str | tuple[str, str]] = (),
              data: str | Path = "", split: str = "val", shots: int = 0, subjects=None, limit: int | None = None,
              out: str | Path | None = None, batch_tokens: int = 4096, bootstrap_samples: int = 2000,
              seed: int = 0, confidence: float = 0.95, progress: bool = True, plots: bool = True,
              calibration_overrides: dict[str, dict] | None = None, allowed_drop: float | None = None,
              gate: str = "significant", overlap: str = "warn", extra: dict | None = None,
              log: Callable[[str], None] | None = None, share_prefix: bool = True):
    """Evaluate the float ``model`` and each ``quantized`` checkpoint on the same prompts; compare; write reports.

    ``quantized`` items are directories or ``(label, directory)`` pairs. ``calibration_overrides`` maps a label to the
    calibration provenance to check for overlap (default: the checkpoint's ``report.json``). With ``allowed_drop``,
    each comparison is gated (``ceval_analysis.gate_report``; the verdict is ``report["gate"]``); ``overlap="fail"``
    also fails a model whose calibration data overlaps the questions. ``extra`` is merged into the report (job
    details). Returns the report
    dict (also written as ``out/ceval.json``, ``out/ceval.md``, plots and ``out/predictions.jsonl`` when ``out`` is
    given).
    """
    from goldstick.evaluation.ceval_report import build_report, calibration_of, check_overlap, gate_report, overlap_banner, write_report
    from goldstick.io.loader import load_model
    from goldstick.model.tokenizer import PAD_TOKEN, load_tokenizer

    say = log or (lambda msg: print(msg, file=sys.stderr))
    started = time.time()
    float_dir = resolve_model_dir(model)
    candidates: list[tuple[str, Path]] = []
    taken = {"float"}
    for item in quantized:
        label, path = item if isinstance(item, tuple) else parse_model_arg(str(item), taken)
        taken.add(label)
        candidates.append((label, resolve_model_dir(path)))

    ceval = load_ceval(data, split=split, subjects=subjects, limit=limit, shots=shots)
    questions = ceval.questions()
    if not questions:
        raise CEvalError(f"{data}: no questions selected")
    unlabelled = [q for q in questions if q.answer not in LETTERS]
    if unlabelled:
        raise CEvalError(f"{unlabelled[0].source}: split {split!r} has no answers (C-Eval test labels are not "
                         f"released; evaluate on val)")
    loaded = load_tokenizer(float_dir)
    tok = loaded.tokenizer
    pad_id = tok.token_to_id(PAD_TOKEN)
    pad_id = loaded.eos_id if pad_id is None else pad_id
    max_len = _max_positions(float_dir)
    requests, letter_ids = tokenize_requests(tok, questions, ceval.dev, shots, loaded.bos_id, max_len)
    notes = []
    reference_tok = _tokenizer_digest(float_dir)
    for label, path in candidates:
        if _tokenizer_digest(path) not in (None, reference_tok):
            notes.append(f"{label}: its tokenizer.json differs from the float model's; prompts were tokenized with "
                         f"the float model's tokenizer for every model")

    say(f"ceval: {len(questions)} questions, {len(ceval.items)} subjects, split {split}, {shots}-shot, "
        f"{1 + len(candidates)} model(s)")
    runs = []
    for label, path in [("float", float_dir)] + candidates:
        net = load_model(path)
        run = evaluate_network(net, tok, ceval, shots, loaded.bos_id, pad_id=pad_id, max_len=max_len, label=label,
                               path=str(path), batch_tokens=batch_tokens, progress=progress, requests=requests,
                               letter_ids=letter_ids, share_prefix=share_prefix)
        del net
        say(f"ceval: {label}: {run.summary()['overall']:.2f} points (mean over subjects) in {run.seconds:.1f}s")
        runs.append(run)

    overlaps = {}
    for label, path in candidates:
        provenance = (calibration_overrides or {}).get(label) or calibration_of(path)
        overlaps[label] = check_overlap(provenance, ceval, tokenizer=tok, base=path)
    report = build_report(ceval, runs, requests, shots=shots, limit=limit, max_len=max_len,
                          bootstrap_samples=bootstrap_samples, seed=seed, confidence=confidence, overlaps=overlaps,
                          notes=notes, letter_ids=letter_ids)
    report.update(extra or {})
    if allowed_drop is not None:
        gate_report(report, allowed_drop, gate, overlap_fails=overlap == "fail")
    report["settings"]["shared_prefix"] = share_prefix
    report["settings"]["seconds_total"] = round(time.time() - started, 1)
    for label, info in overlaps.items():
        if info["status"] == "overlap":
            print(overlap_banner(label, info), file=sys.stderr)
    if out is not None:
        write_report(report, runs, Path(out), plots=plots)
    return report


def _max_positions(model_dir: Path) -> int | None:
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    value = cfg.get("max_position_embeddings")
    return int(value) if value else None


# ---- CLI ---------------------------------------------------------------------------------------------------------
def add_ceval_parser(sub) -> None:
    p = sub.add_parser(
        "ceval", help="C-Eval accuracy of a float model and quantized ones; or run a regression job (YAML)",
        description="C-Eval answer-only evaluation (official prompt, next-token A/B/C/D logits) of a float model "
                    "and quantized checkpoints on the same questions, with the accuracy-loss analysis. With a job "
                    "file (eval/*.yaml), runs the job and exits 3 when the accuracy drop fails its gate.")
    p.add_argument("job", nargs="?", help="a regression job file (YAML); the other options then override it")
    p.add_argument("--model", help="float checkpoint folder (default: the embedded tiny model)")
    p.add_argument("--quantized", action="append", default=[], metavar="[LABEL=]DIR",
                   help="quantized checkpoint folder (repeatable)")
    p.add_argument("--data", help=f"C-Eval folder ({{dev,val,test}}/{{subject}}_{{split}}.csv) or '{HUB_NAME}' "
                                  "(default: $GOLDSTICK_CEVAL_DIR)")
    p.add_argument("--split", default=None, choices=SPLITS, help="split to evaluate (default: val)")
    p.add_argument("--shots", type=int, default=None, choices=(0, 1, 2, 3, 4, 5),
                   help="dev examples in the prompt (default 0)")
    p.add_argument("--subjects", help="comma-separated subject handles, categories or 'hard' (default: all)")
    p.add_argument("--limit", type=int, help="first N questions of each subject")
    p.add_argument("--out", help="report folder (ceval.json, ceval.md, plots)")
    p.add_argument("--allowed-drop", type=float, default=None,
                   help="gate: allowed drop in points (float minus quantized, mean over subjects); exit 3 if exceeded")
    p.add_argument("--gate", choices=("point", "significant", "strict"), default=None,
                   help="gate rule (default: significant; see eval/README.md)")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 2000)")
    p.add_argument("--seed", type=int, default=None, help="bootstrap seed (default 0)")
    p.add_argument("--batch-tokens", type=int, default=None, help="padded tokens per forward batch (default 4096)")
    p.add_argument("--no-shared-prefix", action="store_true",
                   help="run every prompt whole instead of prefilling each subject's shared header/shots once")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_ceval_cli)


def run_ceval_cli(args) -> int:
    from goldstick.evaluation.ceval_report import print_summary
    from goldstick.evaluation.ceval_jobs import load_job, run_job

    if args.job:
        job = load_job(args.job)
        overrides = {k: getattr(args, k) for k in ("data", "split", "shots", "subjects", "limit", "out", "gate",
                                                   "seed", "batch_tokens")
                     if getattr(args, k) is not None}
        if args.model:
            overrides["model"] = args.model
        if args.quantized:
            overrides["quantized"] = list(args.quantized)
            overrides["recipe"] = []
        if args.allowed_drop is not None:
            overrides["allowed_drop"] = args.allowed_drop
        if args.bootstrap is not None:
            overrides["bootstrap_samples"] = args.bootstrap
        job = job.with_overrides(**overrides)
        return run_job(job, progress=not args.no_progress, plots=not args.no_plots)
    data = args.data or os.environ.get("GOLDSTICK_CEVAL_DIR")
    if not data:
        raise CEvalError("ceval: --data is required (or set GOLDSTICK_CEVAL_DIR, or give a job file)")
    if not args.quantized:
        print("ceval: no --quantized model: evaluating the float model alone", file=sys.stderr)
    report = run_ceval(args.model, args.quantized, data=data, split=args.split or "val", shots=args.shots or 0,
                       subjects=args.subjects, limit=args.limit, out=args.out,
                       batch_tokens=args.batch_tokens or 4096,
                       bootstrap_samples=args.bootstrap if args.bootstrap is not None else 2000,
                       seed=args.seed or 0, progress=not args.no_progress, plots=not args.no_plots,
                       allowed_drop=args.allowed_drop, gate=args.gate or "significant",
                       share_prefix=not args.no_shared_prefix)
    print_summary(report, args.out)
    return 0 if report.get("gate", {}).get("passed", True) else 3
