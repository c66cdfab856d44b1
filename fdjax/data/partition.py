"""Client partitions and the server's distillation (proxy) split.

Every partition is deterministic from its seed and uses each training example at most once: the
proxy split is held out first, and the clients share the rest without overlap. Schemes:

* ``"iid"``: a random permutation cut into near-equal parts.
* ``"dirichlet"``: for each class, its split among the clients drawn from Dirichlet(alpha) over
  the clients (Yurochkin et al., 2019; the recipe of FedMA, FedDF and flwr-datasets'
  ``DirichletPartitioner``); client sizes vary. Small alpha gives strongly skewed label mixes,
  large alpha approaches IID.
* ``"dirichlet_client"``: each client's label mix ``q ~ Dirichlet(alpha * p)``, ``p`` the overall
  label mix, and equal client sizes (Hsu et al., 2019). For the same alpha more skewed than
  ``"dirichlet"``: the concentration sums to alpha here, to ``alpha * clients`` there.
* ``"shards"``: examples sorted by label and cut into ``num_clients * shards_per_client`` shards,
  each client taking ``shards_per_client`` at random (McMahan et al., 2017).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fdjax.data.sources import ArrayDataset, DataError

SCHEMES = ("iid", "dirichlet", "dirichlet_client", "shards")


def _check_clients(num_examples: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if num_clients > num_examples:
        raise DataError(f"{num_clients} clients but only {num_examples} training examples: "
                        f"every client needs at least one; use fewer clients or more data")


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Near-equal random parts of ``range(num_examples)``."""
    _check_clients(num_examples, num_clients)
    order = np.random.default_rng(seed).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int
                        ) -> list[np.ndarray]:
    """Label-skewed parts: each class is split among clients by Dirichlet(alpha) shares.

    A client left empty by the draw takes one example from the largest client, so every client
    has data and the result stays deterministic.
    """
    labels = np.asarray(labels)
    _check_clients(len(labels), num_clients)
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    for client in range(num_clients):
        if not parts[client]:
            donor = max(range(num_clients), key=lambda c: len(parts[c]))
            parts[client].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def client_dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int
                               ) -> list[np.ndarray]:
    """Hsu et al.'s split: client ``k`` draws its label mix ``q_k ~ Dirichlet(alpha * p)``
    (``p`` the overall label mix), then its near-equal share of examples class by class from
    ``q_k``, without replacement.

    When a class runs out, a client's remaining draws go to the classes that are left, in
    proportion to its ``q_k``; so the last clients' mixes bend towards what remains, the price
    of using every example exactly once.
    """
    labels = np.asarray(labels)
    _check_clients(len(labels), num_clients)
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    prior = counts / counts.sum()
    sizes = [len(p) for p in np.array_split(np.arange(len(labels)), num_clients)]
    parts = []
    for size in sizes:
        mix = rng.dirichlet(float(alpha) * prior)
        taken = _draw_classes(rng, mix, np.asarray([len(p) for p in pools]), size)
        parts.append(np.sort(np.asarray(
            [i for c, k in enumerate(taken) for i in (pools[c].pop() for _ in range(k))],
            dtype=np.int64)))
    return parts


def _draw_classes(rng: np.random.Generator, mix: np.ndarray, supply: np.ndarray, size: int
                  ) -> np.ndarray:
    """How many examples of each class a client of ``size`` takes: multinomial draws from
    ``mix`` capped by ``supply``, what is left drawn again among the classes still there."""
    taken = np.zeros(len(supply), dtype=np.int64)
    while (need := size - taken.sum()) > 0:
        left = supply - taken
        weights = np.where(left > 0, mix, 0.0)
        if weights.sum() <= 0:  # the mix puts nothing on the classes left: take them evenly
            weights = (left > 0).astype(float)
        taken += np.minimum(rng.multinomial(need, weights / weights.sum()), left)
    return taken


def shard_partition(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int
                    ) -> list[np.ndarray]:
    """Each client gets ``shards_per_client`` label-sorted shards."""
    labels = np.asarray(labels)
    total = num_clients * shards_per_client
    _check_clients(len(labels), num_clients)
    if shards_per_client < 1 or total > len(labels):
        raise DataError(f"{num_clients} clients x {shards_per_client} shards needs at least "
                        f"{total} examples and shards_per_client >= 1 (have {len(labels)})")
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(labels)), labels))
    shards = np.array_split(order, total)
    assignment = rng.permutation(total).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in assignment]


def partition(labels: np.ndarray, num_clients: int, scheme: str = "iid", *, seed: int = 0,
              alpha: float = 0.5, shards_per_client: int = 2) -> list[np.ndarray]:
    """Indices of each client's examples under ``scheme`` (one of ``SCHEMES``)."""
    if scheme == "iid":
        return iid_partition(len(labels), num_clients, seed)
    if scheme == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, seed)
    if scheme == "dirichlet_client":
        return client_dirichlet_partition(labels, num_clients, alpha, seed)
    if scheme == "shards":
        return shard_partition(labels, num_clients, shards_per_client, seed)
    raise DataError(f"unknown partition scheme {scheme!r}; choose one of {list(SCHEMES)}")


def label_skew(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> float:
    """Mean total-variation distance between each client's label mix and the overall one.

    0 for perfectly balanced clients, approaching 1 when each client holds a class of its own.
    """
    labels = np.asarray(labels)
    overall = np.bincount(labels, minlength=num_classes) / len(labels)
    distances = []
    for part in parts:
        mix = np.bincount(labels[part], minlength=num_classes) / max(len(part), 1)
        distances.append(0.5 * np.abs(mix - overall).sum())
    return float(np.mean(distances))


@dataclasses.dataclass(frozen=True)
class FederatedData:
    """Training data split for a federated run.

    Attributes:
        clients: one dataset per client, disjoint.
        proxy: the server's distillation set, disjoint from every client's data (labels kept or
            dropped as asked); ``None`` when no proxy split was asked for.
        client_indices: each client's indices into the original training set.
        proxy_indices: the proxy's indices into the original training set.
    """

    clients: list[ArrayDataset]
    proxy: ArrayDataset | None
    client_indices: list[np.ndarray]
    proxy_indices: np.ndarray


def split_federated(train: ArrayDataset, num_clients: int, *, scheme: str = "iid",
                    proxy_size: int = 0, keep_proxy_labels: bool = False, seed: int = 0,
                    alpha: float = 0.5, shards_per_client: int = 2) -> FederatedData:
    """Holds out a proxy split for the server, then partitions the rest among clients.

    Args:
        train: the training set (must be labeled).
        num_clients: number of clients.
        scheme: client partition scheme (one of ``SCHEMES``).
        proxy_size: examples held out for server-side distillation (0 for none).
        keep_proxy_labels: keep the proxy's labels (for a cross-entropy term) or drop them.
        seed: seed of both the hold-out and the partition.
        alpha: Dirichlet concentration ("dirichlet", "dirichlet_client").
        shards_per_client: shards per client ("shards").
    """
    if train.labels is None:
        raise DataError(f"{train.name}: client partitions need a labeled training set")
    if proxy_size < 0 or proxy_size >= len(train):
        raise DataError(f"proxy_size must be in [0, {len(train)}) for {len(train)} training "
                        f"examples, got {proxy_size}")
    order = np.random.default_rng([seed, 1]).permutation(len(train))
    proxy_idx, rest = np.sort(order[:proxy_size]), np.sort(order[proxy_size:])
    parts = partition(train.labels[rest], num_clients, scheme, seed=seed, alpha=alpha,
                      shards_per_client=shards_per_client)
    client_idx = [rest[p] for p in parts]
    clients = [train.subset(idx, name=f"{train.name}/client{i}")
               for i, idx in enumerate(client_idx)]
    proxy = (train.subset(proxy_idx, keep_labels=keep_proxy_labels, name=f"{train.name}/proxy")
             if proxy_size else None)
    return FederatedData(clients, proxy, client_idx, proxy_idx)
