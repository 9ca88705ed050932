"""Per-client generator suites drawn from emberfl's counter-based streams.

``client_rng_suite(seed, cid, round)`` is a pure function of its three arguments: client
17's generators in round 3 are the same whether the client runs serially, in a thread or
in a worker process, and whatever clients ran before it. That is what makes emberfl's
runs bitwise identical across execution modes and parallelism.
"""

from __future__ import annotations

import random

import torch

from emberfl._checks import U64_MAX, check_int
from emberfl.reproducibility.snapshot import RNGSuite
from emberfl.rng import Purpose, numpy_generator, stream

__all__ = ["client_rng_suite"]


def client_rng_suite(
    seed: int, cid: int, round: int, *, purpose: int = Purpose.CLIENT_TRAINING
) -> RNGSuite:
    """Return the generators of client ``cid`` in round ``round``.

    All of them come from the stream ``(seed, purpose, client=cid, round=round)``:
    PyTorch's CPU (and CUDA) generators are seeded with ``Stream.torch_seed()``, Python's
    :class:`random.Random` with the stream's second and third 64-bit words, and NumPy's
    :class:`~numpy.random.Generator` continues the stream after its first four words.

    Args:
        seed: The experiment seed.
        cid: The client id.
        round: The round.
        purpose: The stream purpose; :attr:`emberfl.rng.Purpose.CLIENT_TRAINING` by default.

    Returns:
        A fresh :class:`RNGSuite`; the global random state is not touched.

    Raises:
        InvalidArgumentError: An argument that is not an unsigned 64-bit integer.
    """
    seed = check_int(seed, "seed", high=U64_MAX)
    cid = check_int(cid, "cid", high=U64_MAX)
    round = check_int(round, "round", high=U64_MAX)
    purpose = check_int(purpose, "purpose", high=U64_MAX)
    torch_seed = stream(seed, purpose=purpose, client=cid, round=round).torch_seed()
    numpy_rng = numpy_generator(seed, purpose=purpose, client=cid, round=round)
    words = numpy_rng.bit_generator.random_raw(4)
    python_seed = (int(words[1]) << 64) | int(words[2])
    torch_cuda = None
    if torch.cuda.is_available():
        torch_cuda = torch.Generator(device="cuda").manual_seed(torch_seed)
    return RNGSuite(
        python=random.Random(python_seed),
        numpy=numpy_rng,
        torch_cpu=torch.Generator(device="cpu").manual_seed(torch_seed),
        torch_cuda=torch_cuda,
    )
