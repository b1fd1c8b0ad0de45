"""Stage 2's router fit (`router_train.train_router`): it starts at the group prior and
keeps the epoch of best recall on validation rows of whole samples it does not train
on, so a router that memorises its rows does not ship worse than the prior it started
from."""

from __future__ import annotations

import torch

from coral_vllm.training.router_train import recall_at_k, train_router, validation_rows

GROUPS, K, D = 16, 4, 64


def _rows(n: int, seed: int, informative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and group labels, frequent groups first (label ~ geometric). Informative:
    the label's one-hot is mixed into the first coordinates of h; else h is noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.distributions.Geometric(0.25).sample((n,)).long().clamp(max=GROUPS - 1)
    h = torch.randn(n, D, generator=g)
    if informative:
        h[:, :GROUPS] += 3 * torch.nn.functional.one_hot(labels, GROUPS)
    return h, labels


def test_epoch_zero_is_the_prior_alone():
    """No training: every row gets the k most frequent groups of the rows it fits on."""
    h, labels = _rows(2000, 0, informative=True)
    router, fit = train_router(h, labels, None, GROUPS, K, samples=torch.arange(len(h)),
                               epochs=0)
    fit_labels = labels[~validation_rows(torch.arange(len(h)), 0.1, 0)]
    top = torch.bincount(fit_labels, minlength=GROUPS).topk(K).indices.sort().values
    chosen = router.select(h, K).sort(dim=1).values
    assert fit["epoch_kept"] == 0 and (chosen == top).all()


def test_noise_features_keep_the_prior_not_the_memorised_router():
    """Features that say nothing about the label: a router of ~5k parameters fitted for
    many epochs on 2,000 rows memorises them and its validation recall (200 rows: with
    60, one lucky row let an early epoch edge past the prior) falls below the prior's;
    the fit keeps the prior (epoch 0), whose held-out recall it then has."""
    torch.manual_seed(0)
    h, labels = _rows(2000, 1, informative=False)
    held_h, held_labels = _rows(4000, 2, informative=False)
    router, fit = train_router(h, labels, None, GROUPS, K, samples=torch.arange(len(h)),
                               epochs=40, lr=3e-3, batch_size=64)
    assert fit["val_recall"][-1] < fit["val_recall"][0], fit   # it did overfit
    assert fit["epoch_kept"] == 0
    prior, _ = train_router(h, labels, None, GROUPS, K, samples=torch.arange(len(h)),
                            epochs=0)
    with torch.no_grad():
        assert recall_at_k(router(held_h), held_labels, K) == \
            recall_at_k(prior(held_h), held_labels, K)


def test_informative_features_train_past_the_prior_and_keep_the_best_epoch():
    h, labels = _rows(4000, 3, informative=True)
    held_h, held_labels = _rows(4000, 4, informative=True)
    router, fit = train_router(h, labels, None, GROUPS, K, samples=torch.arange(len(h)),
                               epochs=5, lr=3e-3, batch_size=128)
    assert fit["epoch_kept"] > 0 and len(fit["val_recall"]) == 6
    assert fit["val_recall"][fit["epoch_kept"]] == max(fit["val_recall"])
    prior, _ = train_router(h, labels, None, GROUPS, K, samples=torch.arange(len(h)),
                            epochs=0)
    with torch.no_grad():
        assert recall_at_k(router(held_h), held_labels, K) > \
            recall_at_k(prior(held_h), held_labels, K) + 0.05


def test_validation_takes_whole_samples_so_memorised_positions_do_not_count():
    """Rows laid out as stage 2 collects them: a batch's positions at drafting step 1,
    then the same positions at step 2 and 3 (same label, nearly the same feature), and
    features that say nothing beyond the position. Validating on the last rows would
    score positions trained on at an earlier step; by whole samples the fit sees that
    memorising does not generalise and keeps the prior."""
    torch.manual_seed(0)
    positions, steps = 300, 3
    h0, labels0 = _rows(positions, 5, informative=False)
    h = torch.cat([h0 + 0.05 * torch.randn_like(h0) for _ in range(steps)])
    labels = labels0.repeat(steps)
    samples = (torch.arange(positions) // 10).repeat(steps)   # 10 positions a sample
    val = validation_rows(samples, 0.1, 0)
    assert val.sum() == 3 * 10 * steps                         # 3 of 30 samples, all rows
    assert not set(samples[val].tolist()) & set(samples[~val].tolist())
    router, fit = train_router(h, labels, None, GROUPS, K, samples=samples, epochs=30,
                               lr=3e-3, batch_size=64)
    assert fit["val_samples"] == 3 and fit["epoch_kept"] == 0, fit
