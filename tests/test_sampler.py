"""Meta-distribution and Algorithm 1 sampling: correctness, determinism, slot equivalence, state."""
from __future__ import annotations

import numpy as np
import pytest

from soup_train.config import MetaConfig
from soup_train.data.sampler import MetaDistribution, MixSampler
from soup_train.data.shards import DomainShards
from soup_train.errors import ConfigError

K, W = 5, 9


def fake_shards() -> DomainShards:
    # window rows encode (domain, row) so draws can be decoded: token 0 = domain, token 1 = row
    arrays = []
    for d, n in enumerate([50, 20, 80, 10, 40]):
        rows = np.zeros((n, W), np.uint16)
        rows[:, 0], rows[:, 1] = d, np.arange(n)
        arrays.append(rows)
    return DomainShards([f"d{i}" for i in range(K)], W, arrays)


def test_meta_distribution_samples_the_simplex_with_bounded_support():
    shards = fake_shards()
    meta = MetaDistribution(MetaConfig(s_max=2, p_nat=0.2), shards.natural())
    rng = np.random.default_rng(0)
    hs = np.stack([meta.sample(rng) for _ in range(2000)])
    assert np.allclose(hs.sum(1), 1) and (hs >= 0).all()
    natural = np.isclose(hs, shards.natural()).all(1)
    assert 0.15 < natural.mean() < 0.25  # p_nat = 0.2
    assert ((hs[~natural] > 0).sum(1) <= 2).all()  # support size <= s_max
    assert set((hs[~natural] > 0).sum(1)) == {1, 2}


def test_fixed_h_is_validated_and_normalised():
    with pytest.raises(ConfigError, match="one weight per domain"):
        MetaDistribution(MetaConfig(fixed_h=(1.0, 1.0)), fake_shards().natural())
    meta = MetaDistribution(MetaConfig(fixed_h=(1, 1, 0, 0, 2)), fake_shards().natural())
    assert np.allclose(meta.sample(np.random.default_rng(0)), [0.25, 0.25, 0, 0, 0.5])


def test_algorithm1_draws_domains_with_probability_h():
    shards = fake_shards()
    sampler = MixSampler(shards, MetaDistribution(MetaConfig(), shards.natural()), seed=0, rank=0, grad_accum=1)
    h = np.array([0.5, 0.0, 0.3, 0.2, 0.0])
    domains = np.concatenate([sampler.batch(0, h, 100)[:, 0] for _ in range(40)])
    freq = np.bincount(domains, minlength=K) / len(domains)
    assert np.abs(freq - h).max() < 0.03  # 4000 draws: 3 sigma is about 0.024
    rows = sampler.batch(0, np.eye(K)[3], 500)
    assert set(rows[:, 1]) == set(range(10))  # uniform over the domain's 10 windows


def test_streams_are_deterministic_per_seed_and_rank_and_slots_match_across_world_sizes():
    shards = fake_shards()
    meta = MetaDistribution(MetaConfig(), shards.natural())
    draw = lambda s, m, n=3: [s.batch(m, np.full(K, 0.2), 4) for _ in range(n)]  # noqa: E731
    a, b = MixSampler(shards, meta, 7, 1, 2), MixSampler(shards, meta, 7, 1, 2)
    assert all((x == y).all() for x, y in zip(draw(a, 1), draw(b, 1)))
    assert np.allclose(a.next_h(), b.next_h())
    assert not (draw(MixSampler(shards, meta, 7, 0, 2), 0)[0] == draw(MixSampler(shards, meta, 8, 0, 2), 0)[0]).all()
    # rank 1 of 2 (accum 1) draws the same windows as slot 1 of one rank with accum 2
    two_ranks = MixSampler(shards, meta, 3, 1, 1)
    one_rank = MixSampler(shards, meta, 3, 0, 2)
    assert all((x == y).all() for x, y in zip(draw(two_ranks, 0), draw(one_rank, 1)))


def test_state_round_trip_continues_the_same_stream():
    shards = fake_shards()
    meta = MetaDistribution(MetaConfig(), shards.natural())
    s = MixSampler(shards, meta, 1, 0, 2)
    s.next_h(), s.batch(0, np.full(K, 0.2), 4)
    state = s.state_dict()
    expected = (s.next_h(), s.batch(1, np.full(K, 0.2), 4))
    t = MixSampler(shards, meta, 1, 0, 2)
    t.load_state_dict(state)
    got = (t.next_h(), t.batch(1, np.full(K, 0.2), 4))
    assert np.allclose(expected[0], got[0]) and (expected[1] == got[1]).all()
