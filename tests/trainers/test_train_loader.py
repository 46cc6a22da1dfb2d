"""The training loader: loader processes change how fast images arrive, never which
images or which random crops a step sees."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from orchestrator.run.trials import loader_workers
from orchestrator.spec.types import ResourcesSpec
from trainers.data.benchmark import ArrayImageDataset, FileImageDataset
from trainers.train_loop import (EpochBatches, Hooks, OptimConfig, SeededSamples, ShardedBatches,
                                 sample_seed, train)

# A random crop and flip: what open_clip's training augmentation draws, in small
AUGMENT = transforms.Compose([transforms.RandomResizedCrop(8, scale=(0.3, 1.0)),
                              transforms.RandomHorizontalFlip(), transforms.ToTensor()])


class LinearTask:
    """The smallest task the loop trains: a linear classifier on flattened 8x8 images."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = nn.Linear(3 * 8 * 8, 4)

    def trainable_parameters(self):
        return self.model.parameters()

    def loss(self, images, labels):
        return nn.functional.cross_entropy(self.model(images.flatten(1)), labels)

    def train_mode(self):
        self.model.train()


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(24):
        path = folder / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return FileImageDataset(paths, [i % 4 for i in range(24)], AUGMENT)


def trained(dataset, num_workers: int, epochs: int = 2) -> tuple[dict, list[float]]:
    task = LinearTask()
    losses = []
    hooks = Hooks(on_epoch_end=lambda epoch, metrics, state: losses.append(metrics["train_loss"]),
                  progress=False, num_workers=num_workers)
    cfg = OptimConfig(lr=1e-2, epochs=epochs, batch_size=5, warmup_steps=1, seed=3)
    train(task, dataset, cfg, torch.device("cpu"), hooks)
    return task.model.state_dict(), losses


@pytest.mark.e2e   # loader processes are subprocesses
def test_loader_processes_change_nothing_a_step_sees(image_files):
    """Random crops drawn per (seed, epoch, index): two loader processes train exactly the
    model the training process alone trains, the same loss every epoch."""
    alone, losses_alone = trained(image_files, num_workers=0)
    shared, losses_shared = trained(image_files, num_workers=2)
    assert losses_shared == losses_alone
    for key in alone:
        assert torch.equal(shared[key], alone[key]), key


def test_augmentation_draws_differ_by_epoch_and_sample_and_repeat_exactly(image_files):
    batches = EpochBatches(len(image_files), 5, seed=3)
    samples = SeededSamples(image_files)
    first = [samples[key][0] for key in next(iter(batches))]
    again = [samples[key][0] for key in next(iter(batches))]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    batches.set_epoch(1)
    key = next(iter(batches))[0]
    index = key[1]
    other_epoch = samples[key][0]
    same_epoch_zero = samples[(sample_seed(3, 0, index), index)][0]
    assert not torch.equal(other_epoch, same_epoch_zero)    # a new crop each epoch
    state = torch.get_rng_state()
    samples[key]
    assert torch.equal(torch.get_rng_state(), state)        # the trainer's RNG untouched


def test_every_sample_once_per_epoch_in_the_same_order_as_before(image_files):
    batches = EpochBatches(24, 5, seed=3)
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        indices = [[i for _, i in batch] for batch in batches]
        assert indices == ShardedBatches(24, 5, 3 * 100_003 + epoch).batches
        assert sorted(i for b in indices for i in b) == list(range(24))


def test_loader_workers_default_to_the_trials_cpus_for_files_and_none_for_arrays(image_files):
    arrays = ArrayImageDataset(np.zeros((4, 8, 8, 3), np.uint8), np.arange(4))
    assert loader_workers(ResourcesSpec(cpus_per_trial=8), image_files) == 7
    assert loader_workers(ResourcesSpec(cpus_per_trial=1), image_files) == 0
    assert loader_workers(ResourcesSpec(cpus_per_trial=8), arrays) == 0
    assert loader_workers(ResourcesSpec(cpus_per_trial=8, loader_workers=3), arrays) == 3
    with pytest.raises(ValueError, match="loader_workers must be >= 0"):
        ResourcesSpec(loader_workers=-1)
