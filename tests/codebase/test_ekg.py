"""EKG pieces: trimmed Otsu, the search (its steps, round_to, cached segments, checkpointed scores,
no retracing, resume in itself and in its stage), the memory bank's teachers and the KD loss."""

import collections
import json
import os

import numpy as np
import pytest
import tensorflow as tf

import nets
from codebase.artifacts import save_net
from codebase.config import make_config
from codebase.context import RunContext
from codebase.methods.ekg import method as ekg_method
from codebase.methods.ekg.memory_bank import build_memory_bank, pick_teachers
from codebase.methods.ekg.method import EKG, memory_bank_loss, search_subsets
from codebase.methods.ekg.search import GreedySearch, SearchState, keep_count, set_masks, trimmed_otsu
from codebase.pipeline import plan
from op_utils.losses import select_teachers
from tests.support.data import write_cifar10
from tests.support.nets import TwoConvBN, randomise
from utils.errors import ConfigError


def test_trimmed_otsu_splits_two_clusters():
    low = [1.0, 1.1, 1.2, 1.3, 1.4]
    high = [9.0, 9.1, 9.2, 9.3, 9.4]
    threshold = trimmed_otsu(low + high + [0.0, 100.0])  # the extremes are trimmed away
    assert 1.4 < threshold < 9.0
    assert trimmed_otsu([3.0, 1.0]) == 3.0  # too few gates: every gate is a candidate


def test_keep_count_follows_the_reference_mask():
    assert keep_count(1.0, 16) == 16
    assert keep_count(0.8, 16) == 13  # ranks 0..12 < 12.8
    assert keep_count(0.01, 16) == 1


def test_search_subsets_come_from_each_class():
    labels = np.repeat(np.arange(3), 10)
    train, val = search_subsets(labels, 4, 2)
    assert sorted(train) == [0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]
    assert sorted(val) == [8, 9, 18, 19, 28, 29]


def tiny_search(target=0.8, blocks=None, **kwargs):
    net = nets.build("ResNet-20", input_size=8, num_classes=4, **({} if blocks is None else dict(blocks=blocks)))
    randomise(net, seed=1)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(24, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 24)
    return GreedySearch(net, images, labels, target_rate=target, batch_size=16, **kwargs)


class StubScores:
    """Cheap stand-ins for a search's compiled `score` and `evaluate`, for tests of its host logic
    (candidates, steps, rates, the `round_to` lattice, resume); installed on `search` when made.

    Both are deterministic functions of the masks and the ensemble knowledge. A live channel
    scores a fixed importance perturbed by the knowledge, so channel orders change from step to
    step; masked channels score 0, as through the taps. Logits move with the importance each
    group keeps, and `J` adds their distance to the knowledge. A search that lost any part of its
    state (rates, orders, knowledge, members) therefore ends elsewhere. `calls` counts the calls.
    """

    def __init__(self, search, seed=0):
        rng = np.random.default_rng(seed)
        self.groups = search.groups
        self.importance = {k: rng.uniform(0.1, 1.0, g.size) for k, g in self.groups.items()}
        self.weight = {k: rng.uniform(0.5, 1.5) for k in self.groups}
        classes = search.net.groups["logits"].size
        self.direction = {k: rng.normal(size=(search.count, classes)) for k in self.groups}
        self.calls = collections.Counter()
        search.score, search.evaluate = self.score, self.evaluate

    def score(self, knowledge):
        self.calls["score"] += 1
        phase = float(np.abs(knowledge).sum())
        return {k: self.importance[k] * (1.0 + 0.5 * np.cos(phase + np.arange(g.size))) * g.mask_numpy()
                for k, g in self.groups.items()}

    def evaluate(self, knowledge, key=None):
        self.calls["evaluate"] += 1
        kept = {k: float((self.importance[k] * g.mask_numpy()).sum() / self.importance[k].sum())
                for k, g in self.groups.items()}
        logits = sum(kept[k] * self.direction[k] for k in self.groups).astype(np.float32)
        ce = sum(self.weight[k] * (1.0 - kept[k]) for k in self.groups)
        j = ce + 0.01 * float(np.mean((logits - knowledge) ** 2))
        return logits, 1.0 / (1.0 + ce), ce, j


def stubbed_search(target=0.8, **kwargs):
    """A tiny search with `StubScores`: nothing is traced or run on the net."""
    search = tiny_search(target, **kwargs)
    return search, StubScores(search)


TRACED_BLOCKS = [1, 1]


@pytest.fixture(scope="module")
def traced():
    """One tiny search run for real, shared by the tests that need its compiled passes: tracing
    them is most of such a test's cost. Each test sets the masks it needs (`initial_state()`,
    `apply`); the search's BatchNorms never update their statistics, so nothing else carries over.

    On a CIFAR ResNet of two stages of one block (`TRACED_BLOCKS`): a stem, an identity block on the
    stem's stream, a stride-2 projection block opening a new stream, the head; four segments, with
    groups used by several of them. The compiled passes are per segment: ResNet-20's 11 cost three
    times as much to trace and run, and its other blocks repeat the same code paths.
    """
    return tiny_search(blocks=TRACED_BLOCKS)


@pytest.fixture(scope="module")
def whole_stubbed_search():
    """The uninterrupted stubbed search the resume tests compare with (deterministic, read only)."""
    return stubbed_search()[0].run()


def test_one_step_takes_the_lowest_objective_among_otsu_candidates(monkeypatch):
    search, _ = stubbed_search()
    state = search.initial_state()
    keys = search.keys
    known = {k: np.linspace(1, 2, search.groups[k].size) * (0.01 if k == keys[3] else 1.0) for k in keys}
    monkeypatch.setattr(search, "score", lambda knowledge: known)
    expected = search.candidates(known, state.rates)
    assert keys[3] in expected
    objective = {k: 1.0 + i for i, k in enumerate(keys)}
    objective[keys[5]] = 0.5  # the best J, but only if it is a candidate
    tried = []

    def fake_evaluate(knowledge, key=None):
        changed = [k for k in keys if search.groups[k].active() < search.groups[k].size]
        tried.append(changed[0])
        return np.ones_like(state.knowledge), 0.5, 1.0, objective[changed[0]]

    monkeypatch.setattr(search, "evaluate", fake_evaluate)

    def stop(state, info):
        raise StopIteration

    search.on_step = stop
    with pytest.raises(StopIteration):
        search.run(state)
    assert tried == expected
    best = min(expected, key=objective.get)
    assert state.rates[best] == pytest.approx(1.0 - search.coarse[best]) and state.step == 1
    assert state.members == 2  # the unpruned net and the accepted one form the ensemble
    assert all(state.rates[k] == 1.0 for k in keys if k != best)


def test_search_reaches_target_without_retracing(traced, monkeypatch):
    traces = []
    monkeypatch.setattr(traced, "on_step", lambda state, info: traces.append(traced.trace_count))
    final = traced.run()
    assert traced.flops_rate(final.rates) <= 0.8 < traced.flops_rate(final.history[-2][0])
    assert final.curves[-1][3] == pytest.approx(traced.flops_rate(final.rates))
    # Every compiled function is traced once, in the first step (or by an earlier test on this
    # search): the steps after it, with other widths everywhere, trace nothing.
    functions = len(traced._segment_fns) + len(traced._chunk_fns) + 1  # segments, score chunks, metrics
    assert final.step > 1 and traces == [functions] * final.step


class Interrupted(Exception):
    pass


@pytest.mark.parametrize("stop", [1, 4, "last"])
def test_search_resumes_after_the_last_saved_step(stop, whole_stubbed_search):
    whole = whole_stubbed_search
    stop = whole.step if stop == "last" else stop
    saved = []

    def interrupt(state, info):
        saved.append(json.dumps(state.to_json()))  # what EKG.search writes after every step
        if state.step == stop:
            raise Interrupted

    search, _ = stubbed_search()
    search.on_step = interrupt
    with pytest.raises(Interrupted):
        search.run()
    # A new search (a new process: fresh masks) continues from the saved state.
    search, stub = stubbed_search()
    steps = []
    search.on_step = lambda state, info: steps.append(state.step)
    resumed = search.run(SearchState.from_json(json.loads(saved[-1])))
    # Only the steps after the saved one ran (a restart would run them all and end in the same
    # place: the search is deterministic), and they continued its history and ensemble.
    assert steps == list(range(stop + 1, whole.step + 1)) and stub.calls["score"] == whole.step - stop
    assert resumed.step == whole.step and resumed.members == whole.members == whole.step + 1
    assert len(resumed.history) == whole.step + 1 and resumed.curves == whole.curves
    np.testing.assert_array_equal(resumed.knowledge, whole.knowledge)
    assert json.dumps(resumed.to_json()) == json.dumps(whole.to_json())  # rates, orders and history too
    assert search.widths(resumed.rates) == {k: g.active() for k, g in search.groups.items()}


def test_round_to_keeps_every_width_a_multiple_and_stops_where_it_must():
    search, _ = stubbed_search(target=0.5, round_to=8)
    state = search.initial_state()
    # A fresh 16-channel group steps to 8 whatever its coarse step; an 8-channel one cannot shrink.
    stem = search.keys[0]
    assert search.groups[stem].size == 16 and search.next_rate(state.rates, stem) == 0.5
    assert search._lattice_step(stem, 0.5) is None
    final = search.run(state)
    widths = search.widths(final.rates)
    assert search.flops_rate(final.rates) <= 0.5
    assert all(w % 8 == 0 for w in widths.values()) and min(widths.values()) >= 8
    assert any(w < search.groups[k].size for k, w in widths.items())
    # 16 on 16/32/64-channel groups: the stage-1 groups cannot shrink, so 0.2 is out of reach.
    with pytest.raises(ConfigError, match="cannot go below .* with --search_round_to 16"):
        stubbed_search(target=0.2, round_to=16)[0].run()


def test_candidates_evaluated_from_cached_segments_match_a_full_pass(traced):
    search = traced
    state = search.initial_state()
    search.apply(state.rates, state.orders)
    search._run_segments(0, keep_cache=True)
    for key in search.keys:  # each group's first use: from the input, or from a cached segment input
        rates = dict(state.rates)
        rates[key] = search.next_rate(state.rates, key)
        search.apply(rates, state.orders)
        cached, full = search.evaluate(state.knowledge, key), search.evaluate(state.knowledge)
        np.testing.assert_allclose(cached[0], full[0], atol=1e-5)
        assert cached[3] == pytest.approx(full[3], rel=1e-5)


def test_pick_teachers_at_even_loss_levels():
    losses = [0.10, 0.50, 0.12, 0.31, 0.70, 0.29, 0.90]
    # levels 0.1, 0.26, 0.42, 0.58, 0.74 -> nearest unused: 0.10, 0.29, 0.50, 0.70 (0.50 is taken), 0.90
    assert pick_teachers(losses, 5) == [0, 5, 1, 4, 6]
    assert pick_teachers([0.3, 0.1], 5) == [1, 0]


def test_memory_bank_loss_by_hand():
    t = 4.0
    bank = np.array([[[2.0, 0.0, 1.5], [0.0, 1.0, 0.0], [-1.0, 0.0, -1.0]]], np.float32)  # [1, 3 classes, 3 teachers]
    bank = np.repeat(bank, 2, axis=0)
    student = np.array([[0.0, 0.0, 0.0], [0.5, 0.2, 0.1]], np.float32)

    def softmax(z):
        return np.exp(z) / np.exp(z).sum(-1, keepdims=True)

    def kl(a, b):
        p, q = softmax(a / t), softmax(b / t)
        return t * (p * (np.log(p) - np.log(q))).sum(-1)

    # Mean over two views of CE + KL_T(target || view), the target chosen on the views' mean
    # (select_teachers: tests/op_utils/test_losses.py).
    views = np.stack([student, student + 0.3], axis=1)  # [2, views, classes]
    model = lambda x, training: x  # noqa: E731  the "net" returns its input as logits
    loss_fn = memory_bank_loss(np.concatenate([bank, bank]), t)
    labels = np.array([0, 2])
    per_example, logits, extras = loss_fn(model, (tf.constant(views), tf.constant(labels), tf.constant([0, 3])), True)
    target = select_teachers(bank, views.mean(1), t).numpy()
    ce = [-np.log(softmax(views[:, v]))[np.arange(2), labels] for v in (0, 1)]
    kd = [kl(target, views[:, v]) for v in (0, 1)]
    np.testing.assert_allclose(per_example, (ce[0] + ce[1] + kd[0] + kd[1]) / 2, rtol=1e-5)
    np.testing.assert_allclose(logits, views.mean(1), rtol=1e-6)
    # A streamed bank: the batch carries the teachers' logits (float16 on disk) in place of the index.
    streamed, _, _ = memory_bank_loss(None, t)(model, (tf.constant(views), tf.constant(labels),
                                                      tf.constant(bank.astype(np.float16))), True)
    np.testing.assert_allclose(streamed, per_example, rtol=1e-3)


def test_memory_bank_fills_a_float16_file_like_the_in_memory_bank(tmp_path):
    # Each bank traces its own forward pass: on a small net, as the bank does not depend on it.
    rng = np.random.default_rng(3)
    images = rng.normal(size=(10, 8, 8, 3)).astype(np.float32)
    net = TwoConvBN()
    randomise(net, seed=1)
    net.options.set(renorm=True)  # the search's convention for a net with BatchNorm
    groups = net.prunable_groups()
    full = ({k: 1.0 for k in groups}, {k: rng.permutation(g.size) for k, g in groups.items()})
    teachers = [full, ({k: 0.5 for k in groups}, full[1])]
    index = rng.permutation(10)  # each batch's logits land at its examples' rows
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(10, np.int32), index)).batch(5)
    in_memory = build_memory_bank(net, teachers, dataset, 10)
    on_disk = np.memmap(tmp_path / "bank.f16", np.float16, "w+", shape=(10, 4, 2))
    build_memory_bank(net, teachers, dataset, 10, out=on_disk)
    # The teachers run slimmed; they compute what the masked net computes under their masks.
    expected = np.zeros((10, 4, 2), np.float32)
    for t, (rates, orders) in enumerate(teachers):
        set_masks(groups, rates, orders)
        for begin in (0, 5):  # batch statistics, as in the search
            expected[index[begin:begin + 5], :, t] = net(images[begin:begin + 5], training=True).numpy()
    np.testing.assert_allclose(in_memory, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(in_memory[..., 0], in_memory[..., 1])
    np.testing.assert_allclose(on_disk, in_memory, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("chunks", ["one segment each", "three segments each"])
def test_checkpointed_scores_equal_one_tape_over_the_whole_net(chunks, traced):
    # A small cache keeps every third segment input: the score pass back-propagates a chunk of three
    # segments (the stem and both blocks), then the last chunk (the head).
    search = traced if chunks == "one segment each" else tiny_search(blocks=TRACED_BLOCKS, cache_mb=0.1)
    assert search.cached == (list(range(4)) if search is traced else [0, 3])
    state = search.initial_state()
    rates = {k: (0.5 if i % 2 else 1.0) for i, k in enumerate(search.keys)}
    search.apply(rates, state.orders)
    probes = list(search.probes.values())
    expected = {k: np.zeros(search.groups[k].size) for k in search.keys}
    begin = 0
    for images, labels in search.batches:
        end = begin + int(labels.shape[0])
        with tf.GradientTape() as tape:
            tape.watch(probes)
            logits = search.net(images, training=True, tap=search._tap)
            j = search._objective(logits, labels, tf.constant(state.knowledge[begin:end]))[1]
            loss = tf.reduce_sum(j) / float(search.batches[0][0].shape[0])
        for k, g in zip(search.keys, tape.gradient(loss, probes)):
            expected[k] += tf.convert_to_tensor(g).numpy()  # compact taps gather their probe
        begin = end
    got = search.score(state.knowledge)
    for k in search.keys:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-6)
    assert any(expected[k].any() for k in search.keys)


def test_score_drops_the_previous_cache_before_building_the_next(traced, monkeypatch):
    # Rebuilt beside the old one, two caches (350 MB each for ResNet-56 on 320 images) would be alive at once.
    search = traced
    state = search.initial_state()
    search.score(state.knowledge)
    alive = []
    run = search._run_segments

    def spy(start, keep_cache):
        if keep_cache:
            alive.append(search._cache)
        return run(start, keep_cache)

    monkeypatch.setattr(search, "_run_segments", spy)
    search.score(state.knowledge)
    assert alive == [None] and search._cache is not None


def ekg_stage_context(tmp_path, run, *flags):
    """The StepContext of `--method ekg` (and `flags`) on 40 fake CIFAR-10 images, its warm-up net
    saved in the step's folder: what the search and memory-bank stages read. On ResNet-8, the
    smallest registered CIFAR ResNet: the stages' logic (state files, steps, teachers) does not
    depend on the depth, and ResNet-20's loads and FLOPs bookkeeping cost twice as much."""
    data = tmp_path / "data"
    if not data.exists():
        write_cifar10(data, per_batch=8, num_test=4)
    flags = dict(zip(flags[::2], flags[1::2]))
    cfg = make_config({}, {"method": "ekg", "arch": "ResNet-8", "data_path": str(data / "cifar-10-batches-py"),
                           "train_path": str(run), "search_train_per_class": 2, "search_val_per_class": 2,
                           "search_batch_size": 16, "search_target_rate": 0.8,
                           **{k.lstrip("-"): int(v) for k, v in flags.items()}})
    [(step, _)] = [(s, m) for s, m in plan(cfg, RunContext(cfg)) if s.step.method == "ekg"]
    if not os.path.exists(step.path(ekg_method.WARM)):
        warm = nets.build("ResNet-8")
        randomise(warm, seed=1)
        save_net(warm, step.path(ekg_method.WARM))
    return step


def test_search_stage_resumes_after_the_last_saved_step(tmp_path, monkeypatch):
    record = {"steps": [], "scores": 0, "crash_after": None, "slimmed": None}

    class Stubbed(GreedySearch):
        """The stage's search on stubbed scoring, logging its steps; with `crash_after` k it dies
        in step k + 1, after `on_step` saved step k."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stub, on_step = StubScores(self), self.on_step

            def score(knowledge):
                if record["scores"] == record["crash_after"]:
                    raise Interrupted
                record["scores"] += 1
                return stub.score(knowledge)

            def logged(state, info):
                on_step(state, info)
                record["steps"].append(state.step)

            self.score, self.on_step = score, logged

    monkeypatch.setattr(ekg_method, "GreedySearch", Stubbed)
    # Slimming, BN re-estimation and evaluation are the pruning stages' (tested with them).
    monkeypatch.setattr(EKG, "save_pruned", lambda self, net, info: record.update(slimmed=(net.widths(), info)))

    def search_stage(run, crash_after=None):
        record.update(steps=[], scores=0, crash_after=crash_after, slimmed=None)
        step = ekg_stage_context(tmp_path, run)
        EKG(step).search()
        return json.loads(open(step.path(ekg_method.STATE)).read())

    whole = search_stage(tmp_path / "whole")
    total, widths, info = whole["step"], *record["slimmed"]
    assert whole["done"] and record["steps"] == list(range(1, total + 1)) and total > 4
    with pytest.raises(Interrupted):
        search_stage(tmp_path / "run", crash_after=3)
    saved = json.loads((tmp_path / "run" / "1-ekg" / ekg_method.STATE).read_text())
    assert saved["step"] == 3 and "done" not in saved and record["slimmed"] is None
    resumed = search_stage(tmp_path / "run")
    # The resumed stage ran only the steps after step 3 and ends in the uninterrupted run's state.
    assert record["steps"] == list(range(4, total + 1)) and record["scores"] == total - 3
    assert resumed == whole
    assert record["slimmed"][0] == widths and record["slimmed"][1]["search_steps"] == total


@pytest.mark.parametrize("ces, num_teacher, expected", [
    # The final sub-network has the lowest CE and would be teacher 0 if it were a candidate.
    ([0.2, 0.6, 0.4, 0.9, 0.1], 5, [0, 2, 1, 3]),
    # Levels 0.1, 0.367, 0.633 over the interim CEs pick the unpruned net (0.1), 0.3 and 0.7.
    ([0.1, 0.5, 0.3, 0.7, 0.2, 0.9, 0.05], 3, [0, 2, 3]),
    ([0.4], 5, [0]),  # a search that took no step: the unpruned net is the only teacher
])
def test_memory_bank_stage_teaches_with_the_interim_sub_networks_and_the_unpruned_one(
        tmp_path, monkeypatch, ces, num_teacher, expected):
    run = tmp_path / "run"
    step = ekg_stage_context(tmp_path, run, "--num_teacher", str(num_teacher))
    groups = nets.build("ResNet-8").prunable_groups()
    rng = np.random.default_rng(0)
    history = [({k: 1.0 - 0.05 * i for k in groups}, {k: rng.permutation(g.size) for k, g in groups.items()}, ce)
               for i, ce in enumerate(ces)]
    state = SearchState(dict(history[-1][0]), dict(history[-1][1]), np.zeros((20, 10), np.float32), len(ces),
                        len(ces) - 1, history, [])
    with open(step.path(ekg_method.STATE), "w") as f:
        json.dump({**state.to_json(), "done": True}, f)
    built = []

    def fake_bank(net, teachers, dataset, num_examples, out=None):
        built.append(teachers)
        return np.zeros((num_examples, 10, len(teachers)), np.float32)

    monkeypatch.setattr(ekg_method, "build_memory_bank", fake_bank)
    EKG(step).memory_bank()
    [teachers] = built
    assert len(teachers) == len(expected) and np.load(step.path(ekg_method.BANK)).shape == (40, 10, len(expected))
    for (rates, orders), i in zip(teachers, expected):
        assert rates == history[i][0] and all(np.array_equal(orders[k], history[i][1][k]) for k in groups)


def test_memory_banks_built_again_and_again_never_warn_of_retracing(caplog):
    # Each teacher is a new net traced once; TensorFlow must not count them as one function retracing
    # (a run's log, and the method smoke run's check, would show the warning).
    rng = np.random.default_rng(0)
    images = rng.normal(size=(10, 8, 8, 3)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(10, np.int32), np.arange(10))).batch(5)
    for seed in range(4):
        net = TwoConvBN()
        randomise(net, seed=seed)
        groups = net.prunable_groups()
        full = ({k: 1.0 for k in groups}, {k: np.arange(g.size) for k, g in groups.items()})
        build_memory_bank(net, [full, ({k: 0.5 for k in groups}, full[1])], dataset, 10)
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
