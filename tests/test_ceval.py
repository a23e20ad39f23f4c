"""C-Eval runner, analysis, regression jobs and overlap guard.

The default tests use the original CEval-format fixture in tests/fixtures/ceval (no C-Eval data). Tests marked
``slow`` or needing ``GOLDSTICK_CEVAL_DIR`` (a folder with the real dev/ and val/ CSVs) are optional.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from goldstick.evaluation import ceval_data as cd
from goldstick.evaluation import ceval_overlap as co
from goldstick.evaluation import ceval_report as cr
from goldstick.evaluation import ceval_run as crun
from goldstick.evaluation import ceval_scoring as cs
from goldstick.evaluation import ceval_stats as cst
from goldstick.evaluation.ceval_jobs import JobError, load_job
from goldstick.quant.numerics import log_softmax

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "ceval"
REAL = os.environ.get("GOLDSTICK_CEVAL_DIR")
needs_real = pytest.mark.skipif(not REAL, reason="set GOLDSTICK_CEVAL_DIR to a folder with the real C-Eval CSVs")


# ---- subjects ----------------------------------------------------------------------------------------------------
def test_subject_table():
    assert len(cd.SUBJECTS) == 52
    counts = {c: len(cd.subjects_in(c)) for c in cd.CATEGORIES}
    assert counts == {"STEM": 20, "Social Science": 10, "Humanities": 11, "Other": 11}
    assert len(cd.HARD) == 8 and all(cd.SUBJECTS[h].category == "STEM" for h in cd.HARD)
    assert cd.SUBJECTS["computer_network"].chinese == "计算机网络"
    assert cd.SUBJECTS["high_school_physics"].hard and not cd.SUBJECTS["high_school_biology"].hard


def test_select_subjects():
    available = cd.available_subjects(FIXTURE, "val")
    assert available == ["computer_network", "high_school_mathematics", "middle_school_geography",
                         "modern_chinese_history", "basic_medicine"]
    assert cd.select_subjects(None, available) == available
    assert cd.select_subjects("stem", available) == ["computer_network", "high_school_mathematics"]
    assert cd.select_subjects("hard,social_science", available) == ["high_school_mathematics",
                                                                    "middle_school_geography"]
    assert cd.select_subjects(["Other", "computer_network"], available) == ["computer_network", "basic_medicine"]
    with pytest.raises(cd.CEvalError, match="not in the data"):
        cd.select_subjects("law", available)
    with pytest.raises(cd.CEvalError, match="unknown subject or category"):
        cd.select_subjects("astrology", available)


# ---- loader ------------------------------------------------------------------------------------------------------
def test_load_fixture_reads_strings_and_normalises_line_ends():
    data = cd.load_ceval(FIXTURE, "val", shots=5)
    assert data.subjects == cd.available_subjects(FIXTURE, "val")
    assert len(data.questions()) == 30 and all(len(v) == 5 for v in data.dev.values())
    for q in data.questions() + [d for rows in data.dev.values() for d in rows]:
        assert all(isinstance(x, str) for x in (q.id, q.question, q.answer, q.explanation, *q.options))
        assert "\r" not in q.question + q.explanation + "".join(q.options)
        assert q.answer in "ABCD"
    math = data.items["high_school_mathematics"]
    assert math[1].options == ("0.5", "0.25", "0.75", "1")
    assert math[5].question.count("\n") == 3 and math[5].question.startswith("阅读下面的计算过程：\n(1)")
    medicine = data.items["basic_medicine"]
    assert medicine[4].options[3] == "None"
    assert medicine[5].options == ("  20", "  28～32", "  36", "  40")  # leading spaces kept, as officially
    assert data.dev["computer_network"][0].explanation.startswith("1. 路由选择")
    assert "\n2. " in data.dev["computer_network"][0].explanation
    # the line on which each row starts, counting the multi-line record
    assert [q.line for q in math] == [2, 3, 4, 5, 6, 7]
    assert set(data.files) >= {str(FIXTURE / "val" / "computer_network_val.csv")}
    assert cd.load_ceval(FIXTURE, "val", limit=2).questions()[1].id == "1"
    assert len(cd.load_ceval(FIXTURE, "val", limit=2).questions()) == 10


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    return path


def test_loader_errors_name_file_and_line(tmp_path):
    bad = _write(tmp_path / "val" / "logic_val.csv", "id,question,A,B,C,D\n0,q,a,b,c,d\n")
    with pytest.raises(cd.CEvalError, match=r"logic_val\.csv:1: missing column\(s\) answer"):
        cd.read_csv(bad)
    bad = _write(tmp_path / "val" / "law_val.csv",
                 'id,question,A,B,C,D,answer\n0,"two\nlines",a,b,c,d,A\n1,q,a,b,c,d,E\n')
    with pytest.raises(cd.CEvalError, match=r"law_val\.csv:4: answer 'E' is not one of A, B, C, D"):
        cd.read_csv(bad)
    bad = _write(tmp_path / "val" / "marxism_val.csv", "id,question,A,B,C,D,answer\n0,q,a,b,c,A\n")
    with pytest.raises(cd.CEvalError, match=r"marxism_val\.csv:2: 6 fields, the header has 7"):
        cd.read_csv(bad)
    _write(tmp_path / "val" / "not_a_subject_val.csv", "id,question,A,B,C,D,answer\n")
    with pytest.raises(cd.CEvalError, match="unknown subject"):
        cd.load_ceval(tmp_path, "val")
    with pytest.raises(cd.CEvalError, match="not found"):
        cd.load_ceval(tmp_path / "nowhere", "val")
    test_rows = cd.read_csv(_write(tmp_path / "test" / "law_test.csv", "id,question,A,B,C,D\n0,q,a,b,c,d\n"))
    assert test_rows[0].answer == ""


# ---- prompt ------------------------------------------------------------------------------------------------------
ZERO_SHOT = (
    "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
    "TCP建立连接时使用____次握手。\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
)
FIVE_SHOT = (
    "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
    "在OSI参考模型中，负责路由选择的是____。\nA. 物理层\nB. 数据链路层\nC. 网络层\nD. 传输层\n答案：C\n\n"
    "IPv4地址的长度是____位。\nA. 16\nB. 32\nC. 64\nD. 128\n答案：B\n\n"
    "HTTP协议默认使用的TCP端口号是____。\nA. 21\nB. 25\nC. 80\nD. 110\n答案：C\n\n"
    "下列协议中，用于把域名解析为IP地址的是____。\nA. ARP\nB. DNS\nC. DHCP\nD. ICMP\n答案：B\n\n"
    "以太网交换机工作在OSI模型的____。\nA. 数据链路层\nB. 物理层\nC. 会话层\nD. 应用层\n答案：A\n\n"
    "TCP建立连接时使用____次握手。\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
)


def test_prompt_matches_the_official_template_byte_for_byte():
    data = cd.load_ceval(FIXTURE, "val", subjects="computer_network", shots=5)
    q = data.items["computer_network"][0]
    assert cd.build_prompt(q).encode("utf-8") == ZERO_SHOT.encode("utf-8")
    assert cd.build_prompt(q, data.dev["computer_network"]).encode("utf-8") == FIVE_SHOT.encode("utf-8")
    assert "答案：" in ZERO_SHOT and "：" == "\uff1a"  # the full-width colon, no space after it


# ---- scoring -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from goldstick.model.tokenizer import load_tokenizer
    from goldstick.testing.make_model import default_model_path

    return load_tokenizer(default_model_path())


class StubNet:
    """Returns chosen A-D logits at the last position of each row, found by the row's real (unpadded) tokens."""

    def __init__(self, table: dict[tuple, np.ndarray], letter_ids, vocab: int, pad_id: int):
        self.table, self.letter_ids, self.vocab, self.pad_id = table, letter_ids, vocab, pad_id
        self.calls = []

    def __call__(self, ids, mask):
        ids, mask = ids.asnumpy(), mask.asnumpy()
        self.calls.append(ids.shape)
        out = np.zeros(ids.shape + (self.vocab,), dtype=np.float32)
        for row in range(ids.shape[0]):
            real = mask[row].astype(bool)
            assert real[-1] and (real[np.argmax(real):]).all(), "expected left padding"
            assert (ids[row][~real] == self.pad_id).all()
            out[row, -1, self.letter_ids] = self.table[tuple(ids[row][real])]
        return out


def test_answer_is_the_argmax_of_the_next_token_letter_logits(tokenizer):
    tok = tokenizer.tokenizer
    data = cd.load_ceval(FIXTURE, "val")
    questions = data.questions()
    requests, letters = cd.tokenize_requests(tok, questions, {}, 0, tokenizer.bos_id, max_len=1024)
    assert letters == [tok.token_to_id(x) for x in "ABCD"] and all(r.continuations is None for r in requests)
    assert all(r.ids[0] == tokenizer.bos_id and tok.decode(r.ids[1:]).endswith("答案：") for r in requests)
    rng = np.random.default_rng(0)
    chosen = rng.normal(size=(len(questions), 4)).astype(np.float32)
    chosen[0] = [0.0, 0.0, 5.0, 0.0]  # computer_network id 0: answer C
    chosen[1] = [9.0, 0.0, 0.0, 0.0]  # id 1: predicts A (wrong; answer C)
    table = {tuple(r.ids): chosen[i] for i, r in enumerate(requests)}
    assert len(table) == len(questions)
    net = StubNet(table, letters, vocab=tok.get_vocab_size(), pad_id=2)
    run = cs.evaluate_network(net, tok, data, 0, tokenizer.bos_id, pad_id=2, max_len=1024, label="stub",
                              batch_tokens=256, progress=False)
    assert len(net.calls) > 1  # several batches, rows reordered by length
    np.testing.assert_array_equal(run.scores, chosen.astype(np.float64))
    assert list(run.predictions[:2]) == [2, 0]
    answers = np.array(["ABCD".index(q.answer) for q in questions])
    np.testing.assert_array_equal(run.correct, chosen.argmax(1) == answers)
    np.testing.assert_allclose(run.probabilities.sum(1), 1.0)


def test_merged_letter_falls_back_to_continuation_likelihood(tokenizer):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer.tokenizer.to_str())
    tok.add_tokens(["：A", "：B", "：C", "：D"])  # now "答案：A" is 答案 + "：A": the letter is not its own token
    merged = [tok.token_to_id(f"：{x}") for x in "ABCD"]
    data = cd.load_ceval(FIXTURE, "val", subjects="basic_medicine", limit=2)
    requests, _ = cd.tokenize_requests(tok, data.questions(), {}, 0, tokenizer.bos_id, max_len=1024)
    assert all(r.continuations == [[m] for m in merged] for r in requests)
    vocab = tok.get_vocab_size()
    weights = np.random.default_rng(1).normal(size=(vocab, vocab)).astype(np.float32)

    class TableNet:  # logits at a position depend only on the token there
        def __call__(self, ids, mask):
            return weights[ids.asnumpy()]

    run = cs.evaluate_network(TableNet(), tok, data, 0, tokenizer.bos_id, max_len=1024, progress=False)
    for i, r in enumerate(requests):
        lp = log_softmax(weights[r.ids[-1]].astype(np.float64))
        np.testing.assert_allclose(run.scores[i], lp[merged], rtol=1e-6)


def test_shared_prefix_scores_equal_whole_prompt_scores(tokenizer):
    """Prefilling a subject's header and shots once, then each question on a copy of that cache, gives the scores of
    running every prompt whole (to float rounding) and the same answers."""
    from goldstick.io.loader import load_model
    from goldstick.testing.make_model import default_model_path

    tok = tokenizer.tokenizer
    data = cd.load_ceval(FIXTURE, "val", subjects="computer_network,basic_medicine", shots=5)
    requests, letters = cd.tokenize_requests(tok, data.questions(), data.dev, 5, tokenizer.bos_id, max_len=None)
    plans = cs.shared_prefixes(requests)
    assert set(plans) == {"computer_network/5", "basic_medicine/5"}
    for rows, length in plans.values():
        prompts = [requests[r].ids for r in rows]
        assert all(p[:length] == prompts[0][:length] for p in prompts) and all(len(p) > length for p in prompts)
        assert length > 0.5 * min(len(p) for p in prompts)  # five shots: most of each prompt is shared
    net = load_model(default_model_path())
    shared = cs.score_requests(net, requests, letters, batch_tokens=600, progress=False, share_prefix=True)
    whole = cs.score_requests(net, requests, letters, batch_tokens=600, progress=False, share_prefix=False)
    assert np.abs(shared - whole).max() <= 1e-5 * np.abs(whole).max()
    np.testing.assert_array_equal(shared.argmax(1), whole.argmax(1))


def test_long_prompts_drop_shots_then_truncate(tokenizer):
    tok = tokenizer.tokenizer
    data = cd.load_ceval(FIXTURE, "val", subjects="computer_network", limit=1, shots=5)
    q = data.questions()
    full, _ = cd.tokenize_requests(tok, q, data.dev, 5, tokenizer.bos_id, max_len=None)
    limit = len(full[0].ids) - 1
    fewer, _ = cd.tokenize_requests(tok, q, data.dev, 5, tokenizer.bos_id, max_len=limit)
    assert fewer[0].shots == 4 and not fewer[0].truncated and len(fewer[0].ids) <= limit
    cut, _ = cd.tokenize_requests(tok, q, data.dev, 0, tokenizer.bos_id, max_len=10)
    assert cut[0].truncated and len(cut[0].ids) == 10 and cut[0].ids[0] == tokenizer.bos_id
    assert tok.decode(cut[0].ids[1:]).endswith("答案：")


# ---- statistics and analysis -------------------------------------------------------------------------------------
def _run(label, questions, predictions, noise=0.0, seed=0):
    scores = np.full((len(questions), 4), -1.0)
    scores[np.arange(len(questions)), predictions] = 1.0
    scores += noise * np.random.default_rng(seed).normal(size=scores.shape)
    return cs.ModelRun(label=label, path=label, scores=scores, questions=questions)


def test_accuracy_summary_macro_and_question_weighted():
    qs = [cd.Question("computer_network", "val", str(i), "q", ("a", "b", "c", "d"), "A") for i in range(4)]
    qs += [cd.Question("high_school_mathematics", "val", str(i), "q", ("a", "b", "c", "d"), "A") for i in range(2)]
    qs += [cd.Question("law", "val", "0", "q", ("a", "b", "c", "d"), "A")]
    correct = np.array([1, 1, 1, 0, 0, 0, 1], dtype=bool)
    s = cs.accuracy_summary(qs, correct)
    assert s["subjects"] == {"computer_network": 75.0, "high_school_mathematics": 0.0, "law": 100.0}
    assert s["overall"] == pytest.approx((75 + 0 + 100) / 3)
    assert s["overall_question_weighted"] == pytest.approx(400 / 7)
    assert s["categories"] == {"STEM": 37.5, "Humanities": 100.0}
    assert s["hard"] == 0.0


def test_mcnemar_known_values():
    m = cst.mcnemar(10, 2)
    assert m["p_value"] == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert m["statistic"] == pytest.approx(49 / 12)
    assert cst.mcnemar(0, 0)["p_value"] == 1.0
    assert cst.mcnemar(5, 5)["p_value"] == pytest.approx(1.0)


def _report(float_pred, quant_pred, seed=0, samples=500):
    data = cd.load_ceval(FIXTURE, "val")
    qs = data.questions()
    runs = [_run("float", qs, float_pred, 0.1, 1), _run("q", qs, quant_pred, 0.1, 2)]
    requests = [cd.Request(ids=[0], shots=0, truncated=False) for _ in qs]
    return cst.build_report(data, runs, requests, shots=0, limit=None, max_len=1024, bootstrap_samples=samples,
                           seed=seed), runs


def test_comparison_identical_models_is_exactly_zero():
    answers = np.array(["ABCD".index(q.answer) for q in cd.load_ceval(FIXTURE, "val").questions()])
    data = cd.load_ceval(FIXTURE, "val")
    qs = data.questions()
    run = _run("float", qs, answers, 0.3)
    same = cs.ModelRun(label="same", path="x", scores=run.scores.copy(), questions=qs)
    report = cst.build_report(data, [run, same], [cd.Request([0], 0, False)] * len(qs), 0, None, 1024, 300, 0)
    c = report["comparisons"]["same"]
    assert c["delta_points"] == 0 and c["delta_ci"] == [0, 0] and c["flip_rate"] == 0
    assert c["flips"]["changed"] == 0 and c["mcnemar"]["p_value"] == 1.0 and c["kl"]["max"] == 0
    assert all(v["delta"] == 0 for v in c["subjects"].values())


def test_comparison_counts_flips_by_direction_and_bootstraps_reproducibly():
    qs = cd.load_ceval(FIXTURE, "val").questions()
    answers = np.array(["ABCD".index(q.answer) for q in qs])
    float_pred = answers.copy()
    float_pred[[6, 7]] = (answers[[6, 7]] + 1) % 4  # float wrong on two math questions
    quant = float_pred.copy()
    quant[[0, 1, 2]] = (answers[[0, 1, 2]] + 1) % 4  # computer_network: 3 correct -> wrong
    quant[6] = answers[6]  # math: wrong -> correct
    quant[7] = (answers[7] + 2) % 4  # math: wrong -> other wrong
    report, runs = _report(float_pred, quant)
    c = report["comparisons"]["q"]
    assert c["flips"] == {"changed": 5, "correct_to_wrong": 3, "wrong_to_correct": 1, "wrong_to_other_wrong": 1,
                          "correct_to_wrong_rate": pytest.approx(0.1),
                          "wrong_to_correct_rate": pytest.approx(1 / 30, abs=1e-6)}
    assert c["flip_rate"] == pytest.approx(5 / 30, abs=1e-6)
    assert c["subjects"]["computer_network"]["delta"] == pytest.approx(-50.0)
    assert c["subjects"]["high_school_mathematics"]["delta"] == pytest.approx(100 / 6, abs=1e-3)
    assert c["delta_points"] == pytest.approx((-50 + 100 / 6) / 5, abs=1e-3)
    assert c["categories"]["STEM"]["delta"] == pytest.approx((-50 + 100 / 6) / 2, abs=1e-3)
    assert c["hard"]["delta"] == pytest.approx(100 / 6, abs=1e-3)
    lo, hi = c["delta_ci"]
    assert lo <= c["delta_points"] <= hi and lo < hi
    assert c["mcnemar"]["b"] == 3 and c["mcnemar"]["c"] == 1
    assert c["kl"]["mean"] > 0 and c["most_damaged"][0] == "computer_network"
    m = report["models"]["float"]
    assert m["overall"] == pytest.approx(np.mean(list(m["subjects"].values())), abs=1e-3)
    again, _ = _report(float_pred, quant)
    assert again["comparisons"]["q"]["delta_ci"] == c["delta_ci"]
    other, _ = _report(float_pred, quant, seed=7)
    assert other["comparisons"]["q"]["delta_ci"] != c["delta_ci"]


# ---- report plots and the markdown around them ------------------------------------------------------------------
def _answers():
    return np.array(["ABCD".index(q.answer) for q in cd.load_ceval(FIXTURE, "val").questions()])


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_category_and_hard_kl_are_the_mean_over_their_questions():
    answers = _answers()
    report, runs = _report(answers, answers)  # same answers, different noise: every Δ is 0, the KL is not
    c = report["comparisons"]["q"]
    kl = cst.kl_divergence(runs[0].scores, runs[1].scores)
    subjects = [q.subject for q in runs[0].questions]
    stem = [i for i, s in enumerate(subjects) if cd.SUBJECTS[s].category == "STEM"]
    assert c["categories"]["STEM"]["kl_mean"] == pytest.approx(kl[stem].mean(), rel=1e-3)
    hard = [i for i, s in enumerate(subjects) if s in cd.HARD]
    assert c["hard"]["kl_mean"] == pytest.approx(kl[hard].mean(), rel=1e-3)
    assert c["subjects"]["basic_medicine"]["kl_mean"] == pytest.approx(
        kl[[i for i, s in enumerate(subjects) if s == "basic_medicine"]].mean(), rel=1e-3)
    assert c["kl"]["mean"] == pytest.approx(kl.mean(), rel=1e-3) and c["kl"]["mean"] > 0
    assert all(v["kl_mean"] > 0 for v in c["subjects"].values())  # small values keep significant digits


def test_no_loss_gives_a_note_not_empty_bars_and_a_kl_plot(tmp_path):
    answers = _answers()
    report, runs = _report(answers, answers)
    cst.gate_report(report)
    cr.write_report(report, runs, tmp_path)
    assert report["plots"] == ["categories.png", "subjects.png", "kl.png"]
    assert all((tmp_path / p).stat().st_size > 0 for p in report["plots"])
    md = (tmp_path / "ceval.md").read_text()
    assert "![kl.png](kl.png)" in md and "`kl.png`: KL(float‖quantized)" in md
    assert "Most damaged subjects: none. No subject lost accuracy: Δ = 0 in all 5 subjects." in md
    assert "Largest A–D KL (subjects, nats): `" in md and "| KL mean (nats) |" in md
    assert json.loads((tmp_path / "ceval.json").read_text())["plots"] == report["plots"]

    (ax,) = cr.plot_subjects(report).axes
    assert "No subject lost accuracy: Δ = 0 in all 5 subjects" in _texts(ax)
    assert not ax.containers and not ax.patches  # no bars at all, not zero-length ones

    fig = cr.plot_categories(report)
    assert any("Δ = 0 in every group" in t and "kl.png" in t for t in _texts(fig.axes[1]))

    top, bottom = cr.plot_kl(report).axes
    c = report["comparisons"]["q"]
    (bars,) = bottom.containers
    drawn = {label.get_text().split(" (")[0]: bar.get_width()
             for label, bar in zip(bottom.get_yticklabels(), bars.patches)}
    assert drawn == {s: pytest.approx(v["kl_mean"]) for s, v in c["subjects"].items()}
    assert list(drawn.values()) == sorted(drawn.values())  # the largest KL at the top
    (bars,) = top.containers
    names = [t.get_text() for t in top.get_xticklabels()]
    assert names == ["STEM", "Social Science", "Humanities", "Other", "Hard", "Overall"]
    heights = [b.get_height() for b in bars.patches]
    assert heights == pytest.approx([c["categories"][g]["kl_mean"] for g in names[:4]]
                                    + [c["hard"]["kl_mean"], c["kl"]["mean"]])


def test_gains_only_note_and_damaged_bars_only_for_losses():
    answers = _answers()
    float_pred = answers.copy()
    float_pred[6] = (answers[6] + 1) % 4
    gained, _ = _report(float_pred, answers)  # math: wrong -> correct; nothing lost
    note = "No subject lost accuracy: Δ ≥ 0 in all 5 subjects (1 gained)"
    assert cr.no_loss_note(gained["comparisons"]["q"]) == note
    assert f"Most damaged subjects: none. {note}." in cr.render_markdown(gained)
    assert note in _texts(cr.plot_subjects(gained).axes[0])

    quant = float_pred.copy()
    quant[[0, 1]] = (answers[[0, 1]] + 1) % 4  # computer_network loses, math (float wrong on 6) unchanged
    quant[18] = (answers[18] + 1) % 4  # modern_chinese_history loses less
    lost, _ = _report(float_pred, quant)
    c = lost["comparisons"]["q"]
    assert cr.no_loss_note(c) is None
    md = cr.render_markdown(lost)
    assert "Most damaged subjects: `computer_network` (-33.3), `modern_chinese_history` (-16.7)\n" in md
    from matplotlib.container import BarContainer

    (ax,) = cr.plot_subjects(lost).axes
    (bars,) = [b for b in ax.containers if isinstance(b, BarContainer)]
    assert [b.get_width() for b in bars.patches] == pytest.approx([-100 / 6, -100 / 3], abs=1e-3)
    assert all(b.get_width() < 0 for b in bars.patches) and not _texts(ax)
    assert "3 subject(s) did not" in ax.get_xlabel()


def test_legends_sit_outside_the_axes():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    answers = _answers()
    quant = answers.copy()
    quant[[0, 1, 2]] = (answers[[0, 1, 2]] + 1) % 4
    report, _ = _report(answers, quant)
    cst.gate_report(report)
    for fig in (cr.plot_categories(report), cr.plot_kl(report)):
        FigureCanvasAgg(fig).draw()
        assert all(ax.get_legend() is None for ax in fig.axes)
        (legend,) = fig.legends
        box = legend.get_window_extent()
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent()), "the legend covers an axes"
            assert not box.overlaps(ax.title.get_window_extent())
        labels = [t.get_text() for t in legend.get_texts()]
        assert "q" in labels
    labels = [t.get_text() for t in cr.plot_categories(report).legends[0].get_texts()]
    assert labels == ["float", "q", "chance (25)", "allowed drop"]


def test_identical_models_kl_plot_says_zero():
    answers = _answers()
    data = cd.load_ceval(FIXTURE, "val")
    run = _run("float", data.questions(), answers, 0.3)
    same = cs.ModelRun(label="same", path="x", scores=run.scores.copy(), questions=run.questions)
    report = cst.build_report(data, [run, same], [cd.Request([0], 0, False)] * len(answers), 0, None, 1024, 100, 0)
    top, bottom = cr.plot_kl(report).axes
    assert not top.containers and not bottom.containers
    assert "KL = 0 in every subject: the A–D distributions are identical" in _texts(bottom)
    assert any("KL = 0" in t for t in _texts(cr.plot_categories(report).axes[1]))


def _fake(delta, ci):
    return {"comparisons": {"q": {"delta_points": delta, "delta_ci": ci}}, "overlap": {}}


@pytest.mark.parametrize("delta,ci,rule,passed", [
    (-1.0, [-2.5, 0.5], "significant", True),  # within allowance, not significant
    (-2.5, [-4.0, -1.0], "point", False),  # point estimate exceeds
    (-1.5, [-2.6, -0.4], "point", True),
    (-1.5, [-2.6, -0.4], "significant", False),  # significant drop whose CI reaches past 2.0
    (-1.5, [-1.9, -0.4], "significant", True),  # significant but the CI stays within the allowance
    (-1.0, [-2.5, 0.5], "strict", False),  # cannot show the drop is within the allowance
    (-1.0, [-1.9, 0.5], "strict", True),
    (+0.5, [-0.5, 1.5], "significant", True),
])
def test_gate_rules(delta, ci, rule, passed):
    report = _fake(delta, ci)
    gate = cst.gate_report(report, 2.0, rule)
    assert gate["passed"] is passed and report["gate"] is gate
    assert gate["candidates"]["q"]["drop_points"] == pytest.approx(-delta)


def test_gate_fails_on_overlap_when_asked():
    report = _fake(0.0, [0.0, 0.0])
    report["overlap"] = {"q": {"status": "overlap"}}
    assert cst.gate_report(report, 2.0)["passed"]
    assert not cst.gate_report(report, 2.0, overlap_fails=True)["passed"]


# ---- overlap guard -----------------------------------------------------------------------------------------------
def test_overlap_guard(tmp_path, tokenizer):
    data = cd.load_ceval(FIXTURE, "val", shots=5)
    shipped = REPO / "calibration" / "mixed-zh-en.jsonl"
    clean = co.check_overlap({"source": str(shipped), "sha256": None}, data, tokenizer.tokenizer)
    assert clean["status"] == "clean" and clean["question_matches"] == 0
    q = data.items["modern_chinese_history"][2]
    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"text": "随便一段文字。"}, ensure_ascii=False) + "\n"
                     + json.dumps({"text": cd.build_prompt(q) + "B"}, ensure_ascii=False) + "\n", encoding="utf-8")
    hit = co.check_overlap({"source": str(calib)}, data, tokenizer.tokenizer)
    assert hit["status"] == "overlap" and hit["question_matches"] == 1
    assert hit["examples"] == ["modern_chinese_history/val/2"]
    banner = co.overlap_banner("quant", hit)
    assert "OVERLAP" in banner and "modern_chinese_history/val/2" in banner
    val_file = FIXTURE / "val" / "basic_medicine_val.csv"
    digest = hashlib.sha256(val_file.read_bytes()).hexdigest()
    same = co.check_overlap({"source": "/elsewhere/moved.csv", "sha256": digest}, data)
    assert same["status"] == "overlap" and same["same_file"] == [str(val_file.resolve())]
    folder = co.check_overlap({"source": str(FIXTURE)}, data)
    assert folder["status"] == "overlap" and len(folder["same_file"]) == 5 and folder["question_matches"] == 30
    assert co.check_overlap({"source": "somebody/ceval-calib"}, data)["status"] == "overlap"
    assert co.check_overlap({"source": "/no/such/file.jsonl"}, data)["status"] == "unchecked"
    assert co.check_overlap(None, data)["status"] == "none"
    shots = tmp_path / "shots.jsonl"
    shots.write_text(json.dumps({"text": data.dev["basic_medicine"][0].question},
                                ensure_ascii=False) + "\n", encoding="utf-8")
    info = co.check_overlap({"source": str(shots)}, data)
    assert info["status"] == "clean" and info["shot_matches"] == 1


# ---- end to end on the embedded tiny model -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_dir():
    from goldstick.testing.make_model import default_model_path

    return default_model_path()


def test_cli_float_against_itself(tmp_path, float_dir, capsys):
    from goldstick.cli import main

    out = tmp_path / "report"
    code = main(["ceval", "--model", str(float_dir), "--quantized", f"again={float_dir}", "--data", str(FIXTURE),
                 "--split", "val", "--shots", "0", "--subjects", "computer_network,hard,Other", "--limit", "3",
                 "--out", str(out), "--allowed-drop", "2", "--bootstrap", "200", "--no-progress"])
    assert code == 0
    report = json.loads((out / "ceval.json").read_text())
    assert report["settings"]["subjects"] == ["computer_network", "high_school_mathematics", "basic_medicine"]
    assert report["settings"]["n_questions"] == 9 and report["settings"]["questions_scored_by_continuation"] == 0
    f, again = report["models"]["float"], report["models"]["again"]
    assert f["subjects"] == again["subjects"] and set(f["subjects"]) == set(report["settings"]["subjects"])
    assert f["overall"] == pytest.approx(np.mean(list(f["subjects"].values())), abs=1e-3)
    c = report["comparisons"]["again"]
    assert c["delta_points"] == 0 and c["flip_rate"] == 0 and c["kl"]["max"] == 0
    assert report["gate"]["passed"]
    assert all((out / p).stat().st_size > 0 for p in ("categories.png", "subjects.png", "kl.png"))
    assert report["plots"] == ["categories.png", "subjects.png", "kl.png"]
    md = (out / "ceval.md").read_text()
    assert "## `again` against `float`" in md and "Gate: PASSED" in md
    assert "![kl.png](kl.png)" in md and "No subject lost accuracy: Δ = 0 in all 3 subjects" in md
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 9
    assert "again vs float: delta +0.00" in capsys.readouterr().out


def test_job_reports_overlap_loudly_and_fails_when_asked(tmp_path, float_dir, capsys):
    from goldstick.cli import main

    # a "quantized" checkpoint: the float files plus a report.json whose calibration holds an evaluated question
    quant = tmp_path / "quant"
    quant.mkdir()
    for f in float_dir.iterdir():
        (quant / f.name).symlink_to(f)
    question = cd.load_ceval(FIXTURE, "val", subjects="middle_school_geography").questions()[3]
    calib = quant / "calib.jsonl"  # a relative source resolves against the checkpoint folder too
    calib.write_text(json.dumps({"text": "复习题：" + question.question}, ensure_ascii=False) + "\n", encoding="utf-8")
    (quant / "report.json").write_text(json.dumps({"calibration": {"source": "calib.jsonl", "sha256": None}}))
    job = tmp_path / "job.yaml"
    job.write_text(f"name: overlap-check\nmodel: {float_dir}\nquantized: {{leaky: quant}}\n"
                   f"data: {FIXTURE}\nsubjects: [middle_school_geography]\nlimit: 4\nbootstrap_samples: 100\n"
                   f"overlap: fail\nout: {tmp_path / 'out'}\n", encoding="utf-8")
    assert load_job(job).quantized == {"leaky": str(tmp_path / "quant")}
    code = main(["ceval", str(job), "--no-progress", "--no-plots"])
    captured = capsys.readouterr()
    assert code == 3
    assert "CALIBRATION / EVALUATION OVERLAP for 'leaky'" in captured.err
    report = json.loads((tmp_path / "out" / "ceval.json").read_text())
    assert report["overlap"]["leaky"]["examples"] == ["middle_school_geography/val/3"]
    assert not report["gate"]["passed"] and "overlap" in report["gate"]["candidates"]["leaky"]["reason"]
    assert report["comparisons"]["leaky"]["delta_points"] == 0
    assert "WARNING: CALIBRATION / EVALUATION OVERLAP" in (tmp_path / "out" / "ceval.md").read_text()
    # with overlap: warn the same job passes (the drop is 0) and still warns loudly
    job.write_text(job.read_text().replace("overlap: fail", "overlap: warn"), encoding="utf-8")
    assert main(["ceval", str(job), "--no-progress", "--no-plots"]) == 0
    assert "CALIBRATION / EVALUATION OVERLAP for 'leaky'" in capsys.readouterr().err


# ---- job files ---------------------------------------------------------------------------------------------------
def test_shipped_jobs_parse(monkeypatch):
    monkeypatch.delenv("GOLDSTICK_CEVAL_DIR", raising=False)
    jobs = sorted((REPO / "eval").glob("*.yaml"))
    assert jobs, "eval/ ships at least one job"
    for path in jobs:
        job = load_job(path)
        assert job.recipe or job.quantized
        assert Path(job.data).resolve() == FIXTURE.resolve() or job.data == os.environ.get("GOLDSTICK_CEVAL_DIR")
    monkeypatch.setenv("GOLDSTICK_CEVAL_DIR", "/some/ceval")
    assert load_job(REPO / "eval" / "default-model.yaml").data == "/some/ceval"


def test_job_validation(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("recipe: x\nallowed_dorp: 2\n")
    with pytest.raises(JobError, match="unknown key.*allowed_dorp"):
        load_job(bad)
    bad.write_text("recipe: x\nshots: 7\n")
    with pytest.raises(JobError, match="shots"):
        load_job(bad)
    bad.write_text("recipe: x\ngate: lenient\n")
    with pytest.raises(JobError, match="gate"):
        load_job(bad)
    bad.write_text("model: default\n")
    with pytest.raises(JobError, match="no quantized checkpoint and no recipe"):
        load_job(bad)
    bad.write_text("recipe: x\ndata: ${GOLDSTICK_TEST_UNSET_VAR}\n")
    with pytest.raises(JobError, match="GOLDSTICK_TEST_UNSET_VAR is not set"):
        load_job(bad)


# ---- the real C-Eval data (optional) -----------------------------------------------------------------------------
@needs_real
def test_real_data_loads():
    val = cd.load_ceval(REAL, "val", shots=5)
    assert len(val.items) == 52 and len(val.questions()) == 1346
    assert sum(len(v) for v in val.dev.values()) == 260
    assert sum(len(v) for k, v in val.items.items() if k in cd.HARD) == 152
    assert all("\r" not in q.question for q in val.questions())
    import csv

    for subject, shots in val.dev.items():  # five-shot takes the dev rows in file order
        with open(Path(REAL) / "dev" / f"{subject}_dev.csv", encoding="utf-8", newline="") as f:
            assert [q.id for q in shots] == [row["id"] for row in csv.DictReader(f)][:5]


@needs_real
@pytest.mark.slow
def test_real_val_float_against_itself(tmp_path, float_dir):
    report = crun.run_ceval(float_dir, [("again", str(float_dir))], data=REAL, split="val", shots=0,
                          out=tmp_path, bootstrap_samples=500, progress=False, plots=False)
    f = report["models"]["float"]
    assert f["n_subjects"] == 52 and f["n_questions"] == 1346
    assert f["overall"] == pytest.approx(np.mean(list(f["subjects"].values())), abs=1e-3)
    c = report["comparisons"]["again"]
    assert c["delta_points"] == 0 and c["flips"]["changed"] == 0
