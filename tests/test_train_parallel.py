"""The training step under every parallelisation: FSDP2 and DDP over two gloo processes give the losses and
gradients of one process holding both batches; activation checkpointing, per-block compile, accumulation and
the chunked loss change nothing but memory and speed; float8 swaps the blocks' linears; MFU counts PaLM's FLOPs."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from cm3.model.config import CM3Config
from cm3.model.decoder import CM3
from cm3.model.parallelize import ParallelOptions, parallelize
from cm3.model.train_data import Batch
from cm3.model.train_step import TokenKinds, build_optimizer, train_step
from cm3.tokenizers.vocabulary import Vocabulary
from cm3.workflows.ray_cluster import free_port

VOCAB = Vocabulary(text_vocab_size=300, image_vocab_size=16)
CONFIG = CM3Config(vocab_size=VOCAB.size, n_layers=3, d_model=32, n_heads=2, max_seq_len=16, lr=1e-2,
                   grad_clip=1e9)  # no clipping: the gradients are compared as computed
STEPS = 3


def batches(rank: int, step: int, rows: int = 2) -> Batch:
    """Rank `rank`'s micro-batch of step `step`; the ranks' loss weights differ in total (a padded tail)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(VOCAB.text_offset, VOCAB.size, (rows, CONFIG.max_seq_len + 1), generator=g)
    weights = torch.ones(rows, CONFIG.max_seq_len)
    weights[:, CONFIG.max_seq_len - 4 * (rank + 1):] = 0
    return Batch(ids[:, :-1], ids[:, 1:], weights)


def joined(parts: list[Batch]) -> Batch:
    return Batch(*(torch.cat([getattr(b, name) for b in parts]) for name in ("inputs", "targets", "weights")))


def fresh_model() -> CM3:
    torch.manual_seed(0)
    return CM3(CONFIG)


def run_steps(forward, model, micro_batches_of, sync=None, process_group: bool = False,
              optimizer: torch.optim.Optimizer | None = None):
    """(loss per step, full gradients per step) of STEPS train_steps; gradients captured at the optimizer step."""
    optimizer = optimizer or build_optimizer(model, CONFIG)
    grads: list[dict] = []

    def capture(*_):
        grads.append({name: _full(p.grad).clone() for name, p in _named(model)})

    optimizer.register_step_pre_hook(capture)
    losses = [train_step(forward, optimizer, micro_batches_of(step), CONFIG.lr, CONFIG.grad_clip, TokenKinds(VOCAB),
                         sync=sync, process_group=process_group).loss for step in range(STEPS)]
    return losses, grads


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _named(model) -> list:
    """Parameters by their plain names (wrappers' prefixes removed)."""
    return [(name.replace("_checkpoint_wrapped_module.", ""), p) for name, p in model.named_parameters()]


def assert_same(a: tuple, b: tuple, exact: bool = False) -> None:
    (losses_a, grads_a), (losses_b, grads_b) = a, b
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(torch.tensor(losses_a), torch.tensor(losses_b), **tolerance)
    assert len(grads_a) == len(grads_b) == STEPS
    for step_a, step_b in zip(grads_a, grads_b):
        assert step_a.keys() == step_b.keys()
        for name in step_a:
            torch.testing.assert_close(step_a[name], step_b[name], **tolerance, msg=lambda m: f"{name}: {m}")


def single_process(ac_every: int = 0, micro: bool = False, compile_backend: str | None = None):
    model = fresh_model()
    parallel = parallelize(model, torch.device("cpu"), 1,
                           ParallelOptions("none", ac_every, compile_backend is not None,
                                           compile_backend=compile_backend or "inductor"))
    both = (lambda s: [batches(0, s), batches(1, s)]) if micro else (lambda s: [joined([batches(0, s), batches(1, s)])])
    return run_steps(parallel.forward, parallel.model, both)


def test_activation_checkpointing_full_and_every_second_block_change_nothing(torch_one_thread):
    plain = single_process()
    assert_same(single_process(ac_every=1), plain, exact=True)
    assert_same(single_process(ac_every=2), plain, exact=True)
    assert plain[0][-1] < plain[0][0]  # it trains


def test_gradient_accumulation_equals_one_large_batch(torch_one_thread):
    assert_same(single_process(micro=True), single_process())


def test_per_block_compile_matches_eager(torch_one_thread):
    """The GPU's per-block `torch.compile` (and the compiled loss kernel), traced whole-graph with AC inside it,
    on the CPU (aot_eager: the graph capture and autograd of the compiled path, without code generation)."""
    assert_same(single_process(ac_every=2, compile_backend="aot_eager"), single_process())
    model = fresh_model()
    parallelize(model, torch.device("cpu"), 1, ParallelOptions("none", 2, True, compile_backend="aot_eager"))
    assert sorted(model.state_dict()) == sorted(fresh_model().state_dict())  # wrappers keep the keys


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from cm3.model.train_checkpoint import gather_state

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for mode, ac_every, compiled in (("fsdp", 0, False), ("fsdp", 2, True), ("ddp", 0, False)):
        model = fresh_model()
        parallel = parallelize(model, torch.device("cpu"), world,
                               ParallelOptions(mode, ac_every, compiled, compile_backend="aot_eager"))
        assert parallel.fsdp == (mode == "fsdp")
        optimizer = build_optimizer(parallel.model, CONFIG)
        result = run_steps(parallel.forward, parallel.model, lambda s: [batches(rank, s)], parallel.sync, True,
                           optimizer)
        weights, _ = gather_state(parallel.model, optimizer)
        results[parallel.summary] = (*result, weights)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp2_and_ddp_over_two_gloo_workers_match_one_process(tmp_path):
    """Two CPU processes over gloo, each with its own half of the batch: FSDP2 (plain, and with activation
    checkpointing and per-block compile applied in torchtitan's order) and DDP give, step for step, the loss and
    the gradients of one process with the whole batch, and the weights gathered from the shards are the single
    process's weights."""
    out = tmp_path / "ranks.pt"
    torch.multiprocessing.spawn(_rank_main, args=(2, free_port(), str(out)), nprocs=2)
    results = torch.load(out, weights_only=True)
    reference_model = fresh_model()
    reference = run_steps(reference_model, reference_model, lambda s: [joined([batches(0, s), batches(1, s)])])
    assert sorted(results) == ["ddp over 2 workers", "fsdp over 2 workers",
                               "fsdp over 2 workers, activation checkpointing every 2nd block, compiled per block"]
    for key, (losses, grads, weights) in results.items():
        assert_same((losses, grads), reference)
        assert weights.keys() == reference_model.state_dict().keys(), key
        for name, value in reference_model.state_dict().items():
            torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5)  # Adam magnifies 1e-7s


def test_chunked_loss_equals_the_full_logits_loss():
    from cm3.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(3, 7, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets, loss_weights = torch.randint(0, 50, (3, 7)), torch.rand(3, 7)
    loss, ce = linear_cross_entropy(hidden, weight, targets, loss_weights, chunk=4)  # 21 positions: 6 chunks
    (2 * loss).backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    reference_ce = F.cross_entropy((hidden @ weight.T).flatten(0, 1), targets.flatten(), reduction="none")
    reference = (reference_ce * loss_weights.flatten()).sum()
    (2 * reference).backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(ce, reference_ce.view(3, 7))
    torch.testing.assert_close(grads, (hidden.grad, weight.grad))
    assert not ce.requires_grad
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 matmuls, fp32 softmax: as F.linear + cross_entropy
        low, _ = linear_cross_entropy(hidden, weight, targets, loss_weights, chunk=5)
        expected = (F.cross_entropy(F.linear(hidden, weight).flatten(0, 1).float(), targets.flatten(),
                                    reduction="none") * loss_weights.flatten()).sum()
    torch.testing.assert_close(low, expected, rtol=1e-3, atol=1e-3)


def test_the_decoders_training_loss_is_cm3_loss_of_its_logits():
    from cm3.model.objective import cm3_loss

    model, batch = fresh_model(), batches(1, 0)
    loss, ce = model(batch.inputs, targets=batch.targets, loss_weights=batch.weights / batch.weights.sum())
    torch.testing.assert_close(loss, cm3_loss(model(batch.inputs), batch.targets, batch.weights))
    assert ce.shape == batch.targets.shape


def test_float8_swaps_the_block_linears_and_still_trains(torch_one_thread):
    from torchao.float8.float8_linear import Float8Linear

    config = CM3Config(vocab_size=VOCAB.size, n_layers=2, d_model=64, n_heads=2, max_seq_len=16, lr=1e-2)
    torch.manual_seed(0)
    model = CM3(config)
    parallel = parallelize(model, torch.device("cpu"), 1, ParallelOptions("none", float8=True))
    assert "float8 linears" in parallel.summary
    linears = [m for m in model.blocks.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Float8Linear) for m in linears)
    optimizer = build_optimizer(model, config)
    batch = joined([batches(0, 0), batches(1, 0)])
    losses = [train_step(model, optimizer, [batch], config.lr, 1.0, TokenKinds(VOCAB)).loss for _ in range(4)]
    assert losses[-1] < losses[0]


def test_mfu_counts_palms_attention_flops():
    from cm3.model.config import num_parameters
    from cm3.model.train_metrics import LEGACY_ATTENTION_FLOPS, flops_per_token

    config = CM3Config.from_preset("350m")
    n = num_parameters(config, include_embeddings=False) + config.vocab_size * config.d_model
    assert flops_per_token(config, 4096) == 6 * n + 12 * 24 * 4096 * 1024
    assert flops_per_token(config, 4096) - flops_per_token(config, 4096, LEGACY_ATTENTION_FLOPS) \
        == 6 * 24 * 4096 * 1024


def test_the_attention_kernel_is_reported_and_runs():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from cm3.model.train_metrics import attention_backend

    name = attention_backend(CONFIG, torch.device("cpu"), torch.float32)
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]
    q = torch.randn(2, CONFIG.n_heads, 8, CONFIG.head_dim)
    with sdpa_kernel(backend):  # the reported kernel really serves this shape
        out = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, is_causal=True))
