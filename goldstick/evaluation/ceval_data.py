"""C-Eval data and prompts: the 52 subjects, the official CSV layout (or the hub), the answer-only prompt, and
the prompts tokenized into requests.

Data (``load_ceval``): a folder in the official layout ``{dev,val,test}/{subject}_{split}.csv`` (dev columns
``id,question,A,B,C,D,answer,explanation``, val ``id,question,A,B,C,D,answer``, test without ``answer``), or the hub
dataset ``ceval/ceval-exam`` through ``datasets`` where the hub is reachable. Every field is read as a string and
``\\r\\n``/``\\r`` inside fields become ``\\n``; a missing column or an answer outside A-D is an error naming the file
and line.

Prompt (``build_prompt``): the official answer-only prompt of the C-Eval repository, with the Chinese subject name::

    以下是中国关于{科目}考试的单项选择题，请选出其中的正确答案。\\n\\n
    {dev question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{answer}\\n\\n      (x k shots, dev rows in file order)
    {question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：

Requests (``tokenize_requests``): each prompt as token ids, checked so that each answer letter ``A``..``D`` follows
the prompt as its own token (no space after ``答案：``). Where the tokenizer would merge the letter with what precedes
it (so that ``prompt + "A"`` does not tokenize as ``prompt`` followed by the token ``A``), the request carries the
four continuations to compare by log-likelihood instead. A prompt longer than the model's context drops shots from
the end (the tutorial's advice), and a zero-shot prompt still too long keeps its last tokens; both are recorded.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from goldstick.errors import GoldstickError
from goldstick.io.files import sha256_file

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


def field_of(record: list[str], index: dict[str, int], name: str) -> str:
    """The column ``name`` of a CSV row (line ends normalised); "" where the file has no such column."""
    return _normalise(record[index[name]]) if name in index else ""


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
                answer = field_of(record, index, "answer").strip()
                if split != "test" or "answer" in index:
                    if answer not in LETTERS and not (split == "test" and answer == ""):
                        raise CEvalError(f"{path}:{line}: answer {answer!r} is not one of A, B, C, D")
                rows.append(Question(subject=subject, split=split,
                                     id=field_of(record, index, "id").strip() or str(number),
                                     question=field_of(record, index, "question"),
                                     options=tuple(field_of(record, index, c) for c in LETTERS), answer=answer,
                                     explanation=field_of(record, index, "explanation"), source=str(path),
                                     line=line))
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


def available_subjects(folder: str | Path, split: str) -> list[str]:
    folder = Path(folder)
    found = {p.name[: -len(f"_{split}.csv")] for p in (folder / split).glob(f"*_{split}.csv")}
    unknown = sorted(found - set(SUBJECTS))
    if unknown:
        raise CEvalError(f"{folder / split}: file(s) for unknown subject(s) {', '.join(unknown)} "
                         f"(C-Eval subject handles are listed in goldstick.evaluation.ceval_data.SUBJECTS)")
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
        raise CEvalError(f"{path}: no {split}/ folder (the official layout is "
                         f"{{dev,val,test}}/{{subject}}_{{split}}.csv)")
    chosen = select_subjects(subjects, available_subjects(path, split))
    items, dev, files = {}, {}, {}
    for handle in chosen:
        file = path / split / f"{handle}_{split}.csv"
        rows = read_csv(file, split, handle)
        files[str(file)] = sha256_file(file)
        items[handle] = rows[:limit] if limit else rows
        if shots:
            dev_file = path / "dev" / f"{handle}_dev.csv"
            if not dev_file.exists():
                raise CEvalError(f"{dev_file}: not found ({shots}-shot prompts take their examples from dev/)")
            dev[handle] = read_csv(dev_file, "dev", handle)
            files[str(dev_file)] = sha256_file(dev_file)
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


# ---- tokenization ----------------------------------------------------------------------------------------------
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
