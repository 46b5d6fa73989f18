"""Vocabulary-parallel logits over torch.distributed (gloo on CPU; the kernels under the
interpreter): 2 and 4 ranks spawned by the test itself, each holding a slice of the vocabulary.
Every rank's loss, metrics and gradient slice must equal the single-process result on the whole
vocabulary (tests/tp_workers.py), for both layouts, every level, the entropy bonus, temperature,
on-policy, uneven slices given by vocab_start, and the fused-linear head. Bad input on any rank
must raise on every rank, within a deadline (a rank left waiting in a collective would hang).
"""


import pytest
import torch
import tp_bad_input_workers
import tp_workers
from ranks import run_ranks

from opo_kernels import linear_chunks

pytestmark = pytest.mark.cpu_only  # CPU-side code / the interpreter (conftest.py)


CASES_2 = [
    ("padded", False, {"uncounted_differ": True, "mask_dtypes": (torch.bool, torch.float32)}),
    ("packed", False, {"level": "sequence", "entropy_coef": 0.05, "uncounted_differ": True}),
    ("padded", True, {"level": "token", "temperature": 0.7}),
    ("packed", True, {"coordinates": "log", "weights": "escort", "center_weights": True,
                      "on_policy": True}),
    ("padded", False, {"entropy_coef": 0.03, "on_policy": True, "temperature": 1.3}),
    ("packed", False, {"inplace_backward": True, "compute_entropy": True}),
    # the on-policy one-pass mode, in chunks of 2 rows (within sequences) and of 12 rows
    ("padded", True, {"on_policy": True, "vocab_parallel_one_pass": True, "chunk_bytes": 60,
                      "entropy_coef": 0.05, "temperature": 0.8}),
    ("packed", False, {"on_policy": True, "vocab_parallel_one_pass": True, "chunk_bytes": 300,
                       "inplace_backward": True, "level": "token"}),
]
CASES_4 = [
    ("padded", True, {"entropy_coef": 0.05, "level": "sequence",
                      "mask_dtypes": (torch.int64, torch.bfloat16, torch.bool, torch.uint8)}),
    ("packed", True, {"on_policy": True, "level": "token"}),
    ("padded", True, {"temperature": 0.8, "weights": "escort", "center_weights": True}),
    ("padded", True, {"on_policy": True, "vocab_parallel_one_pass": True, "chunk_bytes": 200,
                      "compute_entropy": True, "weights": "escort"}),
]


def test_two_ranks():
    run_ranks(tp_workers.logits_cases, 2, CASES_2)


def test_masked_slice():
    """The last rank's whole slice at −inf (a masked vocabulary), logits far below 0 (its
    slice must not put 0 into the global max: the others' sums would underflow): at
    temperature 1 and 0.1, general and on-policy, entropy included."""
    run_ranks(tp_workers.logits_cases, 2, [
        ("padded", False, {"masked_last_slice": -95.0, "compute_entropy": True}),
        ("packed", True, {"masked_last_slice": -20.0, "temperature": 0.1, "on_policy": True,
                          "entropy_coef": 0.05}),
        ("padded", False, {"masked_last_slice": -20.0, "temperature": 0.1, "on_policy": True,
                           "vocab_parallel_one_pass": True, "chunk_bytes": 60}),
    ])


def test_four_ranks():
    run_ranks(tp_workers.logits_cases, 4, CASES_4)


# (layout, options): the general mode with no logits kept (its backward cuts the rows: the
# 19-id vocabulary's slices are below the 24 counted rows), with 5 rows' logits kept (7·19/2
# ids -> 10 per slice, 4 bytes: 200 bytes), with all kept (the default budget); on-policy with
# chunks of 7 rows and with the budget's 5-row chunks (balanced: 5 chunks of 5, 5, 5, 5, 4)
FUSED_LINEAR_CASES = {
    "padded": [("padded", {"logits_budget": 0}), ("padded", {"logits_budget": 200}),
               ("padded", {"on_policy": True, "logits_budget": 200, "chunk_size": 1})],
    "packed": [("packed", {}), ("packed", {"logits_budget": 200, "entropy_coef": 0.0}),
               ("packed", {"on_policy": True, "logits_budget": 0})],
}


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_fused_linear_two_ranks(layout):
    run_ranks(tp_workers.fused_linear_cases, 2, FUSED_LINEAR_CASES[layout])


def test_fused_linear_two_ranks_vocabulary_blocks():
    """Slices of 34 and 33 ids > the 24 counted rows: each rank's backward cuts its slice into
    blocks of columns (chunk 7 -> 9 columns), the blocks' first ids offset by the slice's
    start; with no logits kept, and with 5 rows' kept (the blocks then cover the other 19)."""
    assert tp_workers.bounds(2, 67, uneven=True) == [0, 34, 67]
    assert linear_chunks.blocks_over_vocab(24, 33)
    assert linear_chunks.vocab_block_size(24, 33, 7) == 9
    run_ranks(tp_workers.fused_linear_cases, 2,
              [("padded", {"vocab": 67, "logits_budget": 0}),
               ("packed", {"vocab": 67, "logits_budget": 5 * 34 * 4})])


def test_fused_linear_four_ranks():
    """On-policy, and the general mode with a budget of 5 rows of the widest slice: slices of
    5, 4, 6 and 4 ids, so a plan from ⌈19 / 4⌉ = 5 ids would keep 6 rows, 144 bytes of the
    widest rank's logits against a budget of 120 (the worker checks every rank's logits
    against the budget and one chunk)."""
    assert tp_workers.bounds(4, 19, uneven=True) == [0, 5, 9, 15, 19]
    run_ranks(tp_workers.fused_linear_cases, 4,
              [("packed", {"on_policy": True, "temperature": 0.8, "level": "sequence",
                           "logits_budget": 0}),
               ("padded", {"logits_budget": 5 * 6 * 4})])


def test_fused_linear_default_chunks_agree_on_uneven_slices():
    """The default chunk size, and the rows of a budget, come from the global V: slices of 10
    and 9 rows of the weight would otherwise round to chunks of 2 and 4 rows here (150 bytes
    of 4-byte logits), and the on-policy chunks' all-gathers would not pair up across the
    ranks."""
    run_ranks(tp_workers.fused_linear_cases, 2,
              [("padded", {"on_policy": True, "chunk_bytes": 150, "logits_budget": 0}),
               ("padded", {"on_policy": True, "chunk_size": 1, "logits_budget": 150})],
              deadline=240.0)


BAD_INPUT_CASES = ["label_outside_vocab", "inconsistent_vocab_start", "mismatched_rows",
                   "bad_argument_on_one_rank", "bad_option_on_one_rank",
                   "bad_chunk_size_on_one_rank", "labels_differ_on_one_rank",
                   "rewards_differ_on_one_rank", "mask_differs_on_one_rank",
                   "omega_rule_on_one_rank_tensor_on_other",
                   "option_differs_on_one_rank", "ref_logprobs_only_on_one_rank",
                   "chunk_size_differs_on_one_rank", "hidden_differs_on_one_rank",
                   "bad_logits_budget_on_one_rank", "logits_budget_differs_on_one_rank",
                   "inf_weight_on_one_rank",
                   "logits_dtype_differs_on_one_rank", "one_pass_differs_on_one_rank",
                   "deferred_error_pending_on_one_rank",
                   "linear_one_phase_differs_on_one_rank",
                   "linear_hidden_grad_differs_on_one_rank", "out_of_memory_on_one_rank",
                   "validate_differs_on_one_rank", "grad_to_base_with_process_group"]


def test_bad_input_raises_on_every_rank():
    """Each case in turn, on the same two ranks (see tp_bad_input_workers.bad_input_cases)."""
    run_ranks(tp_bad_input_workers.bad_input_cases, 2, BAD_INPUT_CASES, deadline=300.0)


def test_fingerprints_see_every_value_and_position():
    """The replicated-input fingerprint changes with one ulp, one flipped bool, a swap of two
    labels, and a shape; it is the same for a strided view and its contiguous copy."""
    from opo_kernels.tensor_parallel import fingerprints

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    labels = torch.randint(0, 100, (48,), generator=g)
    mask = torch.rand(6, 8, generator=g) < 0.5
    base = fingerprints({"x": x, "labels": labels, "mask": mask, "bf16": x.bfloat16()})
    ulp = x.clone()
    ulp[3, 5] = torch.nextafter(ulp[3, 5], torch.tensor(float("inf")))
    swapped = labels.clone()
    swapped[[4, 9]] = labels[[9, 4]]
    assert labels[4] != labels[9]
    flipped = mask.clone()
    flipped[2, 2] = ~flipped[2, 2]
    changed = fingerprints({"x": ulp, "labels": swapped, "mask": flipped,
                            "bf16": x.bfloat16().flip(0)})
    for name in base:
        assert changed[name] != base[name], name
    assert fingerprints({"x": x.view(8, 6)})["x"] != base["x"]  # same values, another shape
    view = torch.randn(8, 6, generator=g).t()  # a strided view
    assert fingerprints({"v": view}) == fingerprints({"v": view.contiguous()})


@pytest.mark.parametrize("chunk", [1, 5, 7, 16, 48, 10**6])
def test_fingerprints_do_not_depend_on_the_hashing_chunk(chunk, monkeypatch):
    """Hashed slice by slice (bounded temporaries for the fused-linear hidden states): the same
    value for every chunk size, with chunks smaller than a row, of a few rows, and whole; for
    0-dim, 1-D, 3-D (a row of the first dimension above the chunk: split further), strided
    and empty tensors."""
    from opo_kernels import tensor_parallel

    g = torch.Generator().manual_seed(1)
    cube = torch.randn(4, 3, 5, generator=g)
    tensors = {"scalar": torch.tensor(2.5), "labels": torch.randint(0, 9, (13,), generator=g),
               "cube": cube, "strided": cube.transpose(0, 2)[:, ::2],
               "bf16": cube.bfloat16(), "mask": cube > 0, "empty": torch.zeros(3, 0)}
    monkeypatch.setattr(tensor_parallel, "_HASH_CHUNK", chunk)
    got = tensor_parallel.fingerprints(tensors)
    for name, t in tensors.items():  # the definition, in Python integers, element by element
        bits = t.contiguous().reshape(-1)
        if bits.is_floating_point():
            bits = bits.view({2: torch.int16, 4: torch.int32}[bits.element_size()])
        expected = sum(_splitmix(b + i * 0x9E3779B97F4A7C15)
                       for i, b in enumerate(bits.long().tolist(), 1)) % 2**64
        expected -= 2**64 if expected >= 2**63 else 0  # as a signed int64
        assert got[name] == f"shape {list(t.shape)}, fingerprint {expected}", name


def _splitmix(z: int) -> int:
    """splitmix64's finalizer on z mod 2^64, in Python integers."""
    z %= 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def test_fingerprints_have_no_blind_spot():
    """The former hash (a position-weighted sum modulo a prime p) missed a change at every
    position whose weight was 0 mod p (flat index 16,148,838 of a 4608 x 4096 hidden) and a
    change of a value's bit pattern by p (rewards 0.5 and 1.9999996 were "the same")."""
    from opo_kernels.tensor_parallel import fingerprints

    p = 16_777_213
    zero_weight = (-pow(40503, -1, p)) % p - 1
    a = torch.zeros(zero_weight + 7, dtype=torch.bfloat16)
    b = a.clone()
    b[zero_weight] = 3.0
    assert fingerprints({"x": a}) != fingerprints({"x": b})
    r0 = torch.tensor([0.5, 0.25, 1.0])
    r1 = r0.clone()
    r1.view(torch.int32)[0] += p
    assert fingerprints({"r": r0}) != fingerprints({"r": r1})


@pytest.mark.parametrize("shape, chunk", [((4, 5, 3), 2), ((4, 5, 3), 5), ((4, 5, 3), 12),
                                          ((4, 5, 3), 100), ((7, 3), 3), ((7, 3), 1),
                                          ((0, 5, 3), 2), ((3, 0, 3), 2), ((2, 4, 0), 3)])
def test_one_pass_pieces_cover_every_row_once_in_order(shape, chunk):
    """The one-pass mode's chunks of rows: views of the logits (no copy), at most ``chunk``
    rows each, in order, every row exactly once at its global index; a padded chunk splits a
    sequence only when it cannot hold one, else holds whole sequences."""
    from opo_kernels.vocab_parallel import one_pass_chunk_rows, row_pieces

    full = torch.arange(torch.Size(shape).numel() or 1, dtype=torch.float32)
    logits = full[:torch.Size(shape).numel()].view(shape)
    rows = torch.arange(torch.Size(shape[:-1]).numel()).view(shape[:-1])
    seen = []
    for piece, start in row_pieces(logits, chunk):
        assert piece.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
        n = torch.Size(piece.shape[:-1]).numel()
        assert 1 <= n <= chunk, (piece.shape, chunk)
        if logits.dim() == 3 and chunk >= shape[1]:
            assert piece.dim() == 3  # whole sequences
        flat = logits.reshape(-1, shape[-1]) if shape[-1] else None
        if flat is not None:
            assert torch.equal(piece.reshape(-1, shape[-1]), flat[start:start + n])
        seen.extend(range(start, start + n))
    assert seen == rows.reshape(-1).tolist()
    # sized from ⌈V / ranks⌉ of the global V (the same on ranks holding 10 and 9 of 19)
    assert one_pass_chunk_rows(19, 2, 4) == 16 * 2**20 // (10 * 4)
    assert one_pass_chunk_rows(151936, 8, 2) == 16 * 2**20 // (18992 * 2)
    assert one_pass_chunk_rows(10**9, 1, 4) == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_nccl_two_gpus():
    run_ranks(tp_workers.logits_cases, 2, CASES_2, "nccl")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_nccl_one_rank():
    """A group of one rank on one GPU: the compiled forward-partials, combine and backward
    kernels and both modes' chunking on CUDA (the collectives are trivial), against the
    single-process loss computed in the same process."""
    run_ranks(tp_workers.logits_cases, 1, CASES_2, "nccl")


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_operation_counts(layout):
    """General mode: the forward kernel, ONE all-gather and the combine kernel, the epilogue,
    the backward kernel (+ the tickets' memset and autograd's seed). One-pass mode: the same
    three launches and one all-gather per chunk of rows, nothing else per chunk."""
    run_ranks(tp_workers.operation_counts, 2, layout)


def test_a_rank_outside_the_group():
    run_ranks(tp_workers.not_a_member, 3)
