"""Image-folder and CSV benchmark sources: label order, splits, shifts, and every error path.

Each test writes its own tiny tree of 8x8 PNGs into tmp_path. A pixel's red channel encodes
the image's identity so a test can tell which file a dataset item came from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.data import (
    ArrayImageDataset,
    Benchmark,
    DataError,
    EvalSet,
    FileImageDataset,
    ShiftSource,
    identity_groups,
    load_csv_split,
    load_imagefolder_benchmark,
    mapped_groups,
    ood_average,
    subset_groups,
)

CLASSES = ("zebra", "apple", "mango")  # deliberately NOT sorted: disk order is apple, mango, zebra


def _png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


def _tree(split_dir: Path, per_class: dict[str, int]) -> None:
    """split_dir/<folder>/img<i>.png; the red value of each image is 10 * class position + i."""
    for pos, (folder, n) in enumerate(per_class.items()):
        for i in range(n):
            _png(split_dir / folder / f"img{i}.png", 10 * pos + i)


def _benchmark_root(tmp_path: Path, n: int = 2, val: bool = True) -> Path:
    root = tmp_path / "bench"
    splits = ("train", "val", "test") if val else ("train", "test")
    for split in splits:
        _tree(root / split, {c: n for c in CLASSES})
    return root


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8


def _labels_by_folder(dataset: FileImageDataset) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for path, label in zip(dataset.paths, dataset.labels):
        out.setdefault(path.parent.name, set()).add(label)
    return out


# ---------------------------------------------------------------------------------------
# Label order, folder naming, splits
# ---------------------------------------------------------------------------------------


def test_labels_follow_classnames_not_disk_order(tmp_path):
    bench = load_imagefolder_benchmark(_benchmark_root(tmp_path), CLASSES, ["a photo of a {}."])
    assert bench.classnames == CLASSES
    for dataset in (bench.train, bench.val.dataset, bench.test.dataset):
        assert _labels_by_folder(dataset) == {"zebra": {0}, "apple": {1}, "mango": {2}}
    # Items decode to (transformed image, label): the zebra folder's first image has value 0.
    image, label = bench.train.with_transform(_to_tensor)[bench.train.labels.index(0)]
    assert label == 0 and image.shape == (3, 8, 8) and int(image.max()) < 10


def test_default_classnames_are_sorted_train_folders(tmp_path):
    bench = load_imagefolder_benchmark(_benchmark_root(tmp_path), None, None)
    assert bench.classnames == ("apple", "mango", "zebra")
    assert bench.templates == ("a photo of a {}.",)
    assert _labels_by_folder(bench.test.dataset) == {"apple": {0}, "mango": {1}, "zebra": {2}}


def test_index_named_folders(tmp_path):
    # ImageNetV2 style: folders "0", "1", "2" are indices into the class list.
    root = tmp_path / "v2"
    for split in ("train", "val", "test"):
        _tree(root / split, {"2": 1, "0": 2, "1": 1})
    bench = load_imagefolder_benchmark(root, CLASSES, None, folder_names="index")
    assert _labels_by_folder(bench.test.dataset) == {"0": {0}, "1": {1}, "2": {2}}


def test_val_fraction_split_is_deterministic_stratified_and_disjoint(tmp_path):
    root = _benchmark_root(tmp_path, n=10, val=False)
    first = load_imagefolder_benchmark(root, CLASSES, None, val_fraction=0.3, seed=7)
    again = load_imagefolder_benchmark(root, CLASSES, None, val_fraction=0.3, seed=7)
    other = load_imagefolder_benchmark(root, CLASSES, None, val_fraction=0.3, seed=8)
    train, val = set(first.train.paths), set(first.val.dataset.paths)
    assert not train & val and len(train | val) == 30
    assert first.val.dataset.labels.count(0) == 3  # round(0.3 * 10) per class
    assert first.val.dataset.paths == again.val.dataset.paths
    assert first.val.dataset.paths != other.val.dataset.paths
    # train_eval: the same training files under eval preprocessing, aligned by index.
    assert first.train_eval.paths == first.train.paths


def test_val_fraction_with_val_folder_is_ambiguous(tmp_path):
    root = _benchmark_root(tmp_path)
    _raises(lambda: load_imagefolder_benchmark(root, CLASSES, None, val_fraction=0.2), root / "val", "val_fraction")


def test_transforms_apply_per_split(tmp_path):
    tag = lambda name: (lambda image: name)  # noqa: E731
    bench = load_imagefolder_benchmark(
        _benchmark_root(tmp_path), CLASSES, None, train_transform=tag("train"), eval_transform=tag("eval")
    )
    assert bench.train[0][0] == "train"
    assert bench.train_eval[0][0] == bench.val.dataset[0][0] == bench.test.dataset[0][0] == "eval"


def test_recursive_listing_ignores_other_files(tmp_path):
    root = _benchmark_root(tmp_path)
    _png(root / "test" / "apple" / "nested" / "deep.PNG")  # upper-case extension, nested
    (root / "test" / "apple" / "notes.txt").write_text("not an image")
    (root / "test" / ".ipynb_checkpoints").mkdir()
    bench = load_imagefolder_benchmark(root, CLASSES, None)
    names = [p.name for p in bench.test.dataset.paths]
    assert "deep.PNG" in names and "notes.txt" not in names and len(names) == 7


# ---------------------------------------------------------------------------------------
# Shifts
# ---------------------------------------------------------------------------------------


def test_subset_shift_uses_id_class_order(tmp_path):
    shift_dir = tmp_path / "sketch"
    _tree(shift_dir, {"mango": 2, "zebra": 1})  # 2 of 3 classes, disk order mango, zebra
    bench = load_imagefolder_benchmark(_benchmark_root(tmp_path), CLASSES, None, {"sketch": ShiftSource(shift_dir)})
    sketch = bench.shifts["sketch"]
    # ID order is zebra (0), apple (1), mango (2) -> the subset is (zebra, mango) in that order.
    assert sketch.classnames == ("zebra", "mango")
    assert sketch.class_groups == ((0,), (2,))
    assert _labels_by_folder(sketch.dataset) == {"zebra": {0}, "mango": {1}}
    assert list(bench.eval_sets()) == ["id_val", "id_test", "sketch"]
    # The projection picks the ID columns of zebra and mango.
    assert torch.equal(sketch.project(torch.tensor([[1.0, 2.0, 3.0]])), torch.tensor([[1.0, 3.0]]))


def test_full_shift_gets_identity_groups(tmp_path):
    shift_dir = tmp_path / "v2"
    _tree(shift_dir, {"0": 1, "1": 1, "2": 1})
    source = ShiftSource(shift_dir, folder_names="index")
    bench = load_imagefolder_benchmark(_benchmark_root(tmp_path), CLASSES, None, {"v2": source})
    assert bench.shifts["v2"].class_groups == identity_groups(3)


def test_class_map_shift(tmp_path):
    shift_dir = tmp_path / "objectnet"
    _tree(shift_dir, {"fruit": 2, "animal": 1})
    class_map = {"animal": ["zebra"], "fruit": ["mango", "apple"]}
    bench = load_imagefolder_benchmark(
        _benchmark_root(tmp_path), CLASSES, None, {"objectnet": ShiftSource(shift_dir, class_map=class_map)}
    )
    objectnet = bench.shifts["objectnet"]
    assert objectnet.classnames == ("animal", "fruit")  # class_map order
    assert objectnet.class_groups == ((0,), (1, 2))
    assert _labels_by_folder(objectnet.dataset) == {"animal": {0}, "fruit": {1}}
    # fruit = max(apple, mango)
    assert torch.equal(objectnet.project(torch.tensor([[1.0, 5.0, 2.0]])), torch.tensor([[1.0, 5.0]]))


def test_csv_shift_with_names_indices_and_relative_paths(tmp_path):
    images = tmp_path / "csvshift" / "imgs"
    a, b, c = _png(images / "a.png", 1), _png(images / "b.png", 2), _png(tmp_path / "abs.png", 3)
    csv_path = tmp_path / "csvshift" / "list.csv"
    csv_path.write_text(f"path,label,extra\nimgs/a.png,mango,x\nimgs/b.png,0,y\n{c},mango,z\n")
    bench = load_imagefolder_benchmark(
        _benchmark_root(tmp_path), CLASSES, None, {"c": ShiftSource(csv_path, format="csv")}
    )
    shift = bench.shifts["c"]
    assert shift.classnames == ("zebra", "mango") and shift.class_groups == ((0,), (2,))
    assert shift.dataset.paths == (a, b, c)
    assert shift.dataset.labels == (1, 0, 1)


def test_load_csv_split_labels_index_the_given_classnames(tmp_path):
    _png(tmp_path / "x.png")
    (tmp_path / "l.csv").write_text("path,label\nx.png,apple\n")
    dataset, present = load_csv_split(tmp_path / "l.csv", CLASSES, None)
    assert present == ("apple",) and dataset.labels == (1,)
    image, label = dataset[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1


# ---------------------------------------------------------------------------------------
# Errors: DataError, one line, naming the offending path
# ---------------------------------------------------------------------------------------


def _raises(fn, *needles) -> str:
    with pytest.raises(DataError) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message
    return message


def test_missing_root(tmp_path):
    _raises(lambda: load_imagefolder_benchmark(tmp_path / "nope", CLASSES, None), tmp_path / "nope")


def test_missing_split_folder(tmp_path):
    root = _benchmark_root(tmp_path, val=False)
    _raises(lambda: load_imagefolder_benchmark(root, CLASSES, None), root / "val")


def test_no_class_folders(tmp_path):
    root = _benchmark_root(tmp_path)
    for p in (root / "test").iterdir():
        for f in p.iterdir():
            f.unlink()
        p.rmdir()
    _raises(lambda: load_imagefolder_benchmark(root, CLASSES, None), "no class folders", root / "test")


def test_empty_class_folder(tmp_path):
    root = _benchmark_root(tmp_path)
    for f in (root / "test" / "apple").iterdir():
        f.unlink()
    _raises(lambda: load_imagefolder_benchmark(root, CLASSES, None), root / "test" / "apple")


def test_folder_not_in_classnames(tmp_path):
    root = _benchmark_root(tmp_path)
    _png(root / "train" / "kiwi" / "k.png")
    _raises(lambda: load_imagefolder_benchmark(root, CLASSES, None), root / "train" / "kiwi")


def test_class_index_out_of_range(tmp_path):
    root = tmp_path / "v2"
    for split in ("train", "val", "test"):
        _tree(root / split, {"0": 1, "1": 1})
    _png(root / "test" / "3" / "x.png")
    _raises(lambda: load_imagefolder_benchmark(root, CLASSES, None, folder_names="index"), root / "test" / "3", "out of range")


def test_index_folders_need_classnames(tmp_path):
    root = tmp_path / "v2"
    _tree(root / "train", {"0": 1})
    _raises(lambda: load_imagefolder_benchmark(root, None, None, folder_names="index"), root / "train")


@pytest.mark.parametrize(
    "content, needle",
    [
        ("", "empty file"),
        ("file,class\nx.png,apple\n", "'path' and 'label'"),
        ("path,label\n", "no rows"),
    ],
)
def test_csv_header_errors(tmp_path, content, needle):
    csv_path = tmp_path / "s.csv"
    csv_path.write_text(content)
    _raises(lambda: load_csv_split(csv_path, CLASSES, None), csv_path, needle)


def test_csv_unknown_label_names_file_and_line(tmp_path):
    _png(tmp_path / "x.png")
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("path,label\nx.png,apple\nx.png,kiwi\n")
    _raises(lambda: load_csv_split(csv_path, CLASSES, None), f"{csv_path}:3", "'kiwi'")
    csv_path.write_text("path,label\nx.png,7\n")
    _raises(lambda: load_csv_split(csv_path, CLASSES, None), f"{csv_path}:2", "out of range")


def test_csv_missing_image_file(tmp_path):
    csv_path = tmp_path / "s.csv"
    csv_path.write_text("path,label\nmissing.png,apple\n")
    _raises(lambda: load_csv_split(csv_path, CLASSES, None), f"{csv_path}:2", tmp_path / "missing.png")


def test_missing_csv_file(tmp_path):
    source = ShiftSource(tmp_path / "none.csv", format="csv")
    _raises(lambda: load_imagefolder_benchmark(_benchmark_root(tmp_path), CLASSES, None, {"s": source}), tmp_path / "none.csv")


def test_missing_shift_folder(tmp_path):
    source = ShiftSource(tmp_path / "gone")
    _raises(lambda: load_imagefolder_benchmark(_benchmark_root(tmp_path), CLASSES, None, {"s": source}), tmp_path / "gone")


def test_class_map_unknown_id_class(tmp_path):
    shift_dir = tmp_path / "objectnet"
    _tree(shift_dir, {"fruit": 1})
    source = ShiftSource(shift_dir, class_map={"fruit": ["apple", "durian"]})
    _raises(
        lambda: load_imagefolder_benchmark(_benchmark_root(tmp_path), CLASSES, None, {"o": source}),
        shift_dir,
        "'durian'",
    )


def test_class_map_shift_folder_not_in_map(tmp_path):
    shift_dir = tmp_path / "objectnet"
    _tree(shift_dir, {"fruit": 1, "rock": 1})
    source = ShiftSource(shift_dir, class_map={"fruit": ["apple"]})
    _raises(lambda: load_imagefolder_benchmark(_benchmark_root(tmp_path), CLASSES, None, {"o": source}), shift_dir / "rock")


def test_corrupt_image_raises_when_read(tmp_path):
    root = _benchmark_root(tmp_path)
    bad = root / "test" / "apple" / "x.png"
    bad.write_bytes(b"not an image")
    bench = load_imagefolder_benchmark(root, CLASSES, None)  # listing does not open files
    index = bench.test.dataset.paths.index(bad)
    message = _raises(lambda: bench.test.dataset[index], f"cannot read image {bad}:")
    assert message.startswith("cannot read image")


def test_reserved_shift_name(tmp_path):
    shift_dir = tmp_path / "s"
    _tree(shift_dir, {"apple": 1})
    _raises(
        lambda: load_imagefolder_benchmark(_benchmark_root(tmp_path), CLASSES, None, {"id_test": ShiftSource(shift_dir)}),
        "reserved",
    )


def test_bad_template(tmp_path):
    _raises(lambda: load_imagefolder_benchmark(_benchmark_root(tmp_path), CLASSES, ["a photo"]), "'a photo'")


# ---------------------------------------------------------------------------------------
# Containers and helpers
# ---------------------------------------------------------------------------------------


def test_array_dataset():
    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    images[1] = 200
    dataset = ArrayImageDataset(images, np.array([2, 0, 1]))
    image, label = dataset[1]
    assert isinstance(image, Image.Image) and image.size == (4, 4) and label == 0
    tensor, _ = dataset.with_transform(_to_tensor)[1]
    assert tensor.shape == (3, 4, 4) and int(tensor.min()) == 200
    with pytest.raises(DataError, match="uint8"):
        ArrayImageDataset(images.astype(np.float32), np.array([0, 1, 2]))
    with pytest.raises(DataError, match="one entry per image"):
        ArrayImageDataset(images, np.array([0, 1]))


def test_group_helpers():
    assert identity_groups(3) == ((0,), (1,), (2,))
    with pytest.raises(DataError, match="'kiwi'"):
        subset_groups(CLASSES, ["apple", "kiwi"])
    with pytest.raises(DataError, match="'durian'"):
        mapped_groups(CLASSES, {"fruit": ["durian"]})
    with pytest.raises(DataError, match="no ID class"):
        mapped_groups(CLASSES, {"fruit": []})


def test_ood_average_is_unweighted_over_shifts():
    per_set = {"id_val": 0.9, "id_test": 0.8, "a": 0.5, "b": 0.7, "c": 0.3}
    assert ood_average(per_set, ["a", "b", "c"]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="'d'"):
        ood_average(per_set, ["a", "d"])
    with pytest.raises(ValueError, match="no shift sets"):
        ood_average(per_set, [])


def test_benchmark_validates_groups_against_id_classes():
    ident = identity_groups(3)
    val = EvalSet("id_val", [], CLASSES, ident)
    bad_shift = EvalSet("s", [], ("x",), ((5,),))
    with pytest.raises(DataError, match="refers to ID class 5"):
        Benchmark("b", CLASSES, ("a {}",), [], val, val, {"s": bad_shift})
    subset_val = EvalSet("id_val", [], ("zebra",), ((0,),))
    with pytest.raises(DataError, match="identity groups"):
        Benchmark("b", CLASSES, ("a {}",), [], subset_val, val)
