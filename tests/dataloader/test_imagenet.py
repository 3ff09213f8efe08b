"""ImageNet from TFRecord shards: order, labels, crops, sharding and bad shards."""
import numpy as np
import pytest
import tensorflow as tf

from dataloader import ImageNet, SideData, build_dataset
from dataloader.imagenet import IMAGENET_MEAN, IMAGENET_STD
from tests.support import data as fakes
from utils.errors import ConfigError, DataError

SMALL = {"image_size": 32, "resize_size": 36}


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    # 3 training shards x 5 records, 2 validation shards x 4 records, 40x50 / 50x40 JPEGs.
    return fakes.write_imagenet(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def dataset(fake):
    return ImageNet(fake.path, num_train=None, num_test=None, **SMALL)


def _batches(ds):
    return [tuple(t.numpy() for t in batch) for batch in ds]


def _write_shard(path, images, labels):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image, label in zip(images, labels):
            writer.write(fakes.imagenet_example(image, label))


def _normalised(rgb):
    return (np.asarray(rgb, np.float32) - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


def test_info_counts_records_unless_the_standard_shards_are_there(dataset, fake, tmp_path):
    info = dataset.info
    assert (info.num_train, info.num_test) == (15, 8)
    assert info.image_shape == (32, 32, 3) and info.num_classes == 1000
    # A subset of the shards (here 3 + 1) is counted by default: one epoch is one pass over it.
    default = build_dataset("ImageNet", fake.path).info
    assert (default.num_train, default.num_test, default.image_shape) == (15, 8, (224, 224, 3))
    # The standard 1024 + 128 shards give the official sizes without a shard being read.
    for split, count in (("train", 1024), ("validation", 128)):
        for i in range(count):
            (tmp_path / f"{split}-{i:05d}-of-{count:05d}").touch()
    standard = build_dataset("ImageNet", tmp_path).info
    assert (standard.num_train, standard.num_test) == (1281167, 50000)


def test_test_pipeline_is_in_shard_order_with_zero_based_labels(dataset, fake):
    batches = _batches(dataset.test(3))
    assert [len(y) for _, y in batches] == [3, 3, 2]
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, fake.test.labels)


def test_train_eval_yields_running_indices(dataset, fake):
    batches = _batches(dataset.train_eval(4))
    images, labels, index = (np.concatenate(parts) for parts in zip(*batches))
    assert index.dtype == np.int64
    np.testing.assert_array_equal(index, np.arange(15))
    np.testing.assert_array_equal(labels, fake.train.labels)
    assert images.shape == (15, 32, 32, 3)


def test_eval_crop_is_centred_and_normalised(tmp_path):
    image = np.zeros((40, 50, 3), np.uint8)
    image[:, 25:] = 200  # dark left half, bright right half
    uniform = np.full((50, 40, 3), (10, 120, 240), np.uint8)
    _write_shard(tmp_path / "validation-00000-of-00001", [image, uniform], [1, 1000])
    dataset = ImageNet(tmp_path, **SMALL)
    (images, labels), = _batches(dataset.test(2))
    np.testing.assert_array_equal(labels, [0, 999])
    dark, bright = _normalised([0, 0, 0]), _normalised([200, 200, 200])
    np.testing.assert_allclose(images[0, :, :14], np.broadcast_to(dark, (32, 14, 3)), atol=0.1)
    np.testing.assert_allclose(images[0, :, 18:], np.broadcast_to(bright, (32, 14, 3)), atol=0.1)
    np.testing.assert_allclose(images[1], np.broadcast_to(_normalised([10, 120, 240]), (32, 32, 3)), atol=0.1)


def test_label_offset_is_a_constructor_argument(fake):
    labels = np.concatenate([y for _, y in ImageNet(fake.path, label_offset=0, **SMALL).test(8)])
    np.testing.assert_array_equal(labels, fake.test.labels + 1)


def test_train_is_deterministic_per_seed_and_epoch(fake):
    first = _batches(ImageNet(fake.path, num_train=15, **SMALL).train(4, epoch=1, seed=3))
    try:
        tf.random.set_seed(99)  # the global seed must not matter
        second = _batches(ImageNet(fake.path, num_train=15, **SMALL).train(4, epoch=1, seed=3))
    finally:
        tf.random.set_seed(None)
    assert len(first) == len(second) == 15 // 4
    for (x1, y1), (x2, y2) in zip(first, second):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    x, y = first[0]
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and y.dtype == np.int32
    assert np.isfinite(x).all()


def test_other_epoch_changes_order_or_crops(dataset):
    e0 = _batches(dataset.train(15, epoch=0, seed=1))[0]
    e1 = _batches(dataset.train(15, epoch=1, seed=1))[0]
    assert sorted(e0[1]) == sorted(e1[1])  # the same 15 examples...
    assert not np.array_equal(e0[1], e1[1])  # ...in another order


def _crop_windows(images, height, width):
    """`(top, left, crop height, crop width, flipped)` of each training image of a coordinate image.

    The source image's red channel is `x * 255 / (width - 1)` and its green `y * 255 / (height - 1)`:
    a (resized) crop of it is linear in the output's columns and rows, so a line fitted through
    the inner columns (rows) gives the window's left edge (top) and width (height). Output
    column `j` of a crop `w` wide samples source column `left + (j + 0.5) * w / size - 0.5`.
    """
    size = images.shape[1]
    pixels = images * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    inner = np.arange(4, size - 4)  # away from the resize filter's clamped border
    centres = (inner + 0.5) / size
    windows = []
    for image in pixels:
        x = image[:, inner, 0].mean(0) * (width - 1) / 255.0  # source column seen by each output column
        y = image[inner, :, 1].mean(1) * (height - 1) / 255.0
        x_slope, x_start = np.polyfit(centres, x, 1)
        y_slope, y_start = np.polyfit(centres, y, 1)
        flipped = x_slope < 0
        if flipped:
            x_start, x_slope = x_start + x_slope, -x_slope
        windows.append((y_start + 0.5, x_start + 0.5, y_slope, x_slope, flipped))
    return np.array(windows)


def test_random_resized_crop_follows_the_documented_ranges(tmp_path):
    # Random-resized crop, as dataloader/imagenet_preprocess.py documents it (Inception's): a
    # window inside the image of 8% to all of its area and width / height 3/4 to 4/3, resized,
    # randomly flipped.
    height, width = 96, 128
    rows, cols = np.mgrid[0:height, 0:width]
    coordinates = np.stack([cols * 255.0 / (width - 1), rows * 255.0 / (height - 1), np.full(rows.shape, 128.0)], -1)
    count = 24
    _write_shard(tmp_path / "train-00000-of-00001", [np.round(coordinates).astype(np.uint8)] * count, [5] * count)
    dataset = ImageNet(tmp_path, **SMALL)
    (images, labels), = _batches(dataset.train(count, 0, 0))
    np.testing.assert_array_equal(labels, [4] * count)
    blue = images[..., 2] * IMAGENET_STD[2] + IMAGENET_MEAN[2]
    np.testing.assert_allclose(blue, 128, atol=5)  # JPEG round-off; normalised with ImageNet's mean and std
    top, left, crop_h, crop_w, flipped = _crop_windows(images, height, width).T
    slack = 1.5  # pixels: JPEG round-off and the fit
    assert np.all(top > -slack) and np.all(left > -slack), (top, left)
    assert np.all(top + crop_h < height + slack) and np.all(left + crop_w < width + slack), (top, left)
    area = crop_h * crop_w / (height * width)
    aspect = crop_w / crop_h
    assert np.all(area > 0.08 * 0.9) and np.all(area < 1.05), area
    assert np.all(aspect > 0.75 * 0.95) and np.all(aspect < 4 / 3 * 1.05), aspect
    # Random, not a fixed window: areas spread over the range, windows move, both flips occur.
    assert area.min() < 0.3 and area.max() > 0.6, area
    assert np.ptp(left) > 10 and np.ptp(top) > 10, (top, left)
    assert 0 < flipped.sum() < count


def test_file_sharding_gives_every_worker_the_same_step_count(dataset):
    steps = dataset.steps_per_epoch(2, num_shards=2)  # 15 // 4 = 3
    counts = [len(_batches(dataset.train(2, 0, 1, num_shards=2, shard_index=i))) for i in (0, 1)]
    assert counts == [steps, steps] == [3, 3]


def test_more_workers_than_files_falls_back_to_record_sharding(dataset, fake):
    # 4 workers, 3 files: every worker reads every file and keeps records i::4.
    labels = [
        np.concatenate([y for _, y in dataset.train(1, 0, 1, augment=False, num_shards=4, shard_index=i)])
        for i in range(4)
    ]
    assert [len(v) for v in labels] == [15 // 4] * 4
    assert len(set(np.concatenate(labels).tolist())) > 1


# ----- bad inputs -----------------------------------------------------------------------
def test_missing_folder_and_no_data_path(tmp_path):
    with pytest.raises(DataError, match="absent"):
        ImageNet(tmp_path / "absent")
    with pytest.raises(DataError, match="--data_path"):
        build_dataset("imagenet")


def test_folder_without_shards_names_folder_and_patterns(tmp_path):
    (tmp_path / "readme.txt").write_text("no shards here")
    with pytest.raises(DataError, match=rf"{tmp_path}.*train-\*-of-\*.*validation-\*-of-\*"):
        ImageNet(tmp_path)


def test_split_without_shards(tmp_path, fake):
    _write_shard(tmp_path / "validation-00000-of-00001", [np.zeros((8, 8, 3), np.uint8)], [1])
    dataset = ImageNet(tmp_path, **SMALL)
    with pytest.raises(DataError, match=rf"{tmp_path}.*train-\*-of-\*"):
        dataset.train(1, 0, 0)


def test_truncated_shard_is_named(tmp_path, fake):
    for name, path in fake.files.items():
        (tmp_path / name).write_bytes(path.read_bytes())
    bad = tmp_path / "train-00001-of-00003"
    bad.write_bytes(bad.read_bytes()[:100])
    dataset = ImageNet(tmp_path, **SMALL)
    dataset.check_shards("test")  # the validation shards are fine
    with pytest.raises(DataError, match="train-00001-of-00003.*truncated"):
        dataset.check_shards()
    with pytest.raises(DataError, match="train-00001-of-00003"):
        dataset.train_eval(4)  # checked before the pipeline is built
    with pytest.raises(DataError, match="train-00001-of-00003.*truncated"):
        dataset.count_records("train")


@pytest.mark.parametrize(
    "record, message",
    [
        (b"", "holds no records"),
        (b"not a tf.train.Example", "not an ImageNet tf.train.Example"),
    ],
)
def test_bad_first_record_is_named(tmp_path, record, message):
    path = tmp_path / "validation-00000-of-00001"
    with tf.io.TFRecordWriter(str(path)) as writer:
        if record:
            writer.write(record)
    with pytest.raises(DataError, match=f"validation-00000-of-00001.*{message}"):
        ImageNet(tmp_path).check_shards()


def test_bad_jpeg_and_label_are_named(tmp_path):
    path = tmp_path / "validation-00000-of-00001"
    example = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"not a jpeg"])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[3])),
    }))
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(example.SerializeToString())
    with pytest.raises(DataError, match="validation-00000-of-00001.*not a valid JPEG"):
        ImageNet(tmp_path).check_shards()
    _write_shard(path, [np.zeros((8, 8, 3), np.uint8)], [0])  # 0 - offset 1 = -1
    with pytest.raises(DataError, match=r"validation-00000-of-00001.*label 0 minus offset 1"):
        ImageNet(tmp_path).test(1)


def test_too_large_a_batch_for_the_workers(dataset):
    with pytest.raises(ConfigError, match="exceeds the 15 training examples"):
        dataset.train(8, 0, 0, num_shards=2)


# ----- what a streamed EKG needs: labels, subsets, side data ----------------------------
def test_train_labels_and_shard_sizes_follow_natural_order(dataset, fake):
    assert dataset.train_shard_sizes() == [5, 5, 5]
    np.testing.assert_array_equal(dataset.train_labels(), fake.train.labels)
    assert not dataset.in_memory


def test_train_subset_reads_exactly_the_chosen_examples(dataset, fake):
    wanted = [11, 3, 0, 7]
    images, labels, index = (np.concatenate(t) for t in zip(*_batches(dataset.train_subset(wanted, 3))))
    np.testing.assert_array_equal(index, sorted(wanted))  # natural order
    np.testing.assert_array_equal(labels, fake.train.labels[sorted(wanted)])
    plain = {int(i): x for x, _, i in zip(*(np.concatenate(t) for t in zip(*_batches(dataset.train_eval(15)))))}
    for image, i in zip(images, index):
        np.testing.assert_allclose(image, plain[int(i)], atol=1e-6)  # inference preprocessing
    # Shuffled per epoch and split between two workers: equal shares, together a subset of it.
    parts = [np.concatenate([b[2] for b in _batches(dataset.train_subset(wanted + [12], 2, 1, 0, 2, k))])
             for k in range(2)]
    assert len(parts[0]) == len(parts[1]) == 2
    assert set(parts[0]).isdisjoint(parts[1]) and set(parts[0]) | set(parts[1]) <= set(wanted + [12])
    with pytest.raises(ConfigError, match="subset indices"):
        dataset.train_subset([15], 2)


def _side(tmp_path, count, shape=(2,)):
    # Record k holds k in every entry: the batches tell which example each record came with.
    values = np.repeat(np.arange(count, dtype=np.float16)[:, None], int(np.prod(shape)), 1).reshape(count, *shape)
    path = tmp_path / "side.f16"
    values.tofile(path)
    return SideData(str(path), shape, "float16")


@pytest.mark.parametrize("num_shards", [1, 2, 4])  # 4 workers > 3 files: record sharding
def test_side_records_stay_with_their_examples(dataset, fake, tmp_path, num_shards):
    side = _side(tmp_path, 15, (2, 3))
    seen = []
    for k in range(num_shards):
        for images, labels, extra in _batches(dataset.train(2, 1, 5, num_shards=num_shards, shard_index=k,
                                                            views=2, side=side)):
            assert images.shape == (2, 2, 32, 32, 3) and extra.shape == (2, 2, 3) and extra.dtype == np.float16
            index = extra[:, 0, 0].astype(int)
            np.testing.assert_array_equal(labels, fake.train.labels[index])
            seen.extend(index)
    if num_shards == 1:
        assert len(set(seen)) == 14  # 15 records, batches of 2, the last one dropped


def test_two_views_are_two_augmentations_of_one_image(dataset):
    images, _ = next(iter(dataset.train(4, 0, 3, views=2)))
    one, _ = next(iter(dataset.train(4, 0, 3)))
    np.testing.assert_allclose(images[:, 0], one)  # view 0 is the single-view stream
    assert not np.allclose(images[:, 0], images[:, 1])


def test_side_file_of_the_wrong_size_is_named(dataset, tmp_path):
    side = _side(tmp_path, 14)
    with pytest.raises(DataError, match="side.f16: expected 15 records"):
        dataset.train(2, 0, 0, side=side)
