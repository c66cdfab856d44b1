"""Client sampling: which clients take part in a round, as in standard FL (FedAvg's fraction C).

How many take part is a setting (``clients.sample_fraction`` or ``clients.sample_count``, see
``fdjax.config.ClientsConfig.per_round``); which ones is drawn here.

A round's clients are drawn uniformly without replacement from a generator seeded by the run's
seed and the round number alone, so the draw never depends on message arrival order or on earlier
rounds, and every method of a comparison sees the same clients in its round ``r``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

#: Separates sampling's random stream from the data split's (seeded ``[seed, 1]``).
_STREAM = 0x5A3B1E


@dataclasses.dataclass(frozen=True)
class ClientSampler:
    """Draws ``per_round`` of ``num_clients`` clients for each round, seeded by ``seed``.

    Calling it with a round number returns the sorted client indices of that round.
    """

    num_clients: int
    per_round: int
    seed: int = 0

    def __call__(self, round_index: int) -> list[int]:
        if self.per_round >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng([self.seed, _STREAM, round_index])
        return sorted(rng.choice(self.num_clients, self.per_round, replace=False).tolist())
