"""EKG pieces: score taps, trimmed Otsu, a search step, resume, teachers and the KD loss."""

import json

import numpy as np
import pytest
import tensorflow as tf

import nets
import train_cifar
from codebase.methods.ekg.memory_bank import build_memory_bank, pick_teachers
from codebase.methods.ekg.method import memory_bank_loss, search_subsets
from codebase.methods.ekg.search import GreedySearch, SearchState, keep_count, trimmed_otsu
from op_utils.losses import kl_t, select_teachers
from op_utils.taps import score_tap
from tests.dataloader.fakes import write_cifar10
from tests.nets.helpers import randomise
from utils.errors import ConfigError


def test_score_tap_is_identity_with_taylor_gradient():
    rng = np.random.default_rng(0)
    y = tf.constant(rng.normal(size=(4, 3, 3, 5)), tf.float32)
    w = tf.constant(rng.normal(size=(4, 3, 3, 5)), tf.float32)
    probe = tf.zeros([5])

    def loss(t):
        return tf.reduce_sum(w * t) + 0.01 * tf.reduce_sum(t ** 2)

    with tf.GradientTape() as tape:
        tape.watch(probe)
        out = score_tap(y, probe)
        value = loss(out)
    np.testing.assert_array_equal(out, y)
    score = tape.gradient(value, probe).numpy()
    # The score is |first-order change of the loss when the channel is zeroed|.
    for c in range(5):
        zeroed = y.numpy().copy()
        zeroed[..., c] = 0
        change = float(loss(y) - loss(tf.constant(zeroed)))
        quadratic = 0.01 * float(tf.reduce_sum(y[..., c] ** 2))
        assert score[c] == pytest.approx(abs(change + quadratic), rel=1e-4)


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


def tiny_search(target=0.8, **kwargs):
    net = nets.build("ResNet-20", input_size=8, num_classes=4)
    randomise(net, seed=1)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(24, 8, 8, 3)).astype(np.float32)
    labels = rng.integers(0, 4, 24)
    return GreedySearch(net, images, labels, target_rate=target, batch_size=16, **kwargs)


def test_one_step_takes_the_lowest_objective_among_otsu_candidates(monkeypatch):
    search = tiny_search()
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


def test_search_reaches_target_without_retracing_and_resumes(tmp_path):
    steps = []
    search = tiny_search(on_step=lambda state, info: steps.append(json.dumps(state.to_json())))
    final = search.run()
    assert search.flops_rate(final.rates) <= 0.8 < search.flops_rate(final.history[-2][0])
    traces = search.trace_count
    tiny_trace = tiny_search()
    tiny_trace.run(SearchState.from_json(json.loads(steps[0])))
    # Later steps trace nothing: every function is traced once per batch shape in the first step.
    assert tiny_trace.trace_count == traces
    assert final.curves[-1][3] == pytest.approx(search.flops_rate(final.rates))
    # Resume from the state saved after step 2: the search ends where the uninterrupted one did.
    resumed = tiny_search().run(SearchState.from_json(json.loads(steps[1])))
    assert resumed.rates == final.rates
    assert all(np.array_equal(resumed.orders[k], final.orders[k]) for k in final.orders)


def test_round_to_keeps_every_width_a_multiple_and_stops_where_it_must():
    search = tiny_search(target=0.5, round_to=8)
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
        tiny_search(target=0.2, round_to=16).run()


def test_candidates_evaluated_from_cached_segments_match_a_full_pass():
    search = tiny_search()
    state = search.initial_state()
    search.apply(state.rates, state.orders)
    search._run_segments(0, keep_cache=True)
    for key in search.keys[::3]:
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


def test_select_teachers_and_kd_loss_by_hand():
    t = 4.0
    bank = np.array([[[2.0, 0.0, 1.5], [0.0, 1.0, 0.0], [-1.0, 0.0, -1.0]]], np.float32)  # [1, 3 classes, 3 teachers]
    bank = np.repeat(bank, 2, axis=0)
    student = np.array([[0.0, 0.0, 0.0], [0.5, 0.2, 0.1]], np.float32)

    def kl(a, b):
        p, q = np.exp(a / t) / np.exp(a / t).sum(-1, keepdims=True), np.exp(b / t) / np.exp(b / t).sum(-1, keepdims=True)
        return t * (p * (np.log(p) - np.log(q))).sum(-1)

    top = bank[:, :, 0]
    d_student = kl(top, student).sum()
    d_teachers = [kl(top, bank[:, :, k]).sum() for k in range(3)]
    chosen = [k for k in range(3) if d_teachers[k] < d_student]
    expected_target = bank[:, :, chosen].mean(-1)
    np.testing.assert_allclose(select_teachers(bank, student, t), expected_target, rtol=1e-5)
    np.testing.assert_allclose(kl_t(top, student, t), kl(top, student), rtol=1e-5)

    # The memory-bank loss: mean over two views of CE + KL_T(target || view).
    views = np.stack([student, student + 0.3], axis=1)  # [2, views, classes]
    model = lambda x, training: x  # noqa: E731  the "net" returns its input as logits
    loss_fn = memory_bank_loss(np.concatenate([bank, bank]), t)
    labels = np.array([0, 2])
    per_example, logits, extras = loss_fn(model, (tf.constant(views), tf.constant(labels), tf.constant([0, 3])), True)
    target = select_teachers(bank, views.mean(1), t).numpy()
    ce = [-np.log(np.exp(views[:, v]) / np.exp(views[:, v]).sum(-1, keepdims=True))[np.arange(2), labels] for v in (0, 1)]
    kd = [kl(target, views[:, v]) for v in (0, 1)]
    np.testing.assert_allclose(per_example, (ce[0] + ce[1] + kd[0] + kd[1]) / 2, rtol=1e-5)
    np.testing.assert_allclose(logits, views.mean(1), rtol=1e-6)
    # A streamed bank: the batch carries the teachers' logits (float16 on disk) in place of the index.
    streamed, _, _ = memory_bank_loss(None, t)(model, (tf.constant(views), tf.constant(labels),
                                                      tf.constant(bank.astype(np.float16))), True)
    np.testing.assert_allclose(streamed, per_example, rtol=1e-3)


def test_memory_bank_fills_a_float16_file_like_the_in_memory_bank(tmp_path):
    search = tiny_search()
    state = search.initial_state()
    teachers = [(state.rates, state.orders), ({k: 0.5 for k in search.keys}, state.orders)]
    images = np.random.default_rng(3).normal(size=(10, 8, 8, 3)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images, np.zeros(10, np.int32), np.arange(10))).batch(4)
    in_memory = build_memory_bank(search, teachers, dataset, 10)
    on_disk = np.memmap(tmp_path / "bank.f16", np.float16, "w+", shape=(10, 4, 2))
    build_memory_bank(search, teachers, dataset, 10, out=on_disk)
    assert in_memory.shape == (10, 4, 2) and not np.allclose(in_memory[..., 0], in_memory[..., 1])
    np.testing.assert_allclose(on_disk, in_memory, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ekg", "l1", "random"])
def test_pruning_pipeline_smoke(method, tmp_path):
    data = write_cifar10(tmp_path / "data", per_batch=16, num_test=8).path
    run = tmp_path / "run"
    args = ["--method", method, "--arch", "ResNet-20", "--data_path", str(data), "--train_path", str(run),
            "--baseline_epoch", "1", "--train_epoch", "1", "--steps_per_epoch", "1", "--batch_size", "8",
            "--val_batch_size", "8", "--search_batch_size", "16", "--search_train_per_class", "4",
            "--search_val_per_class", "2", "--search_target_rate", "0.85",
            "--num_replicas", "2" if method == "ekg" else "1"]
    results = train_cifar.main(args)
    assert results["ekg_flops"] <= 0.85 * results["full_ekg_flops"] + 1
    widths = json.loads((run / "trained_params.arch.json").read_text())["widths"]
    assert widths == results["widths"]
    if method == "ekg":
        bank = np.load(run / "knowledge.npy")
        assert bank.shape == (80, 10, 5)
        assert json.loads((run / "stages.json").read_text())[-1] == "test"


@pytest.mark.parametrize("cache_mb", [1024, 0.001])
def test_checkpointed_scores_equal_one_tape_over_the_whole_net(cache_mb):
    # cache_mb=0.001 caches only every few segment inputs: chunks of several segments.
    search = tiny_search(cache_mb=cache_mb)
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


def test_score_drops_the_previous_cache_before_building_the_next():
    # Rebuilt beside the old one, two caches (350 MB each for ResNet-56 on 320 images) would be alive at once.
    search = tiny_search()
    state = search.initial_state()
    search.score(state.knowledge)
    alive = []
    run = search._run_segments

    def spy(start, keep_cache):
        if keep_cache:
            alive.append(search._cache)
        return run(start, keep_cache)

    search._run_segments = spy
    search.score(state.knowledge)
    assert alive == [None] and search._cache is not None
